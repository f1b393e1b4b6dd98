"""vgg16-bn plans by stage (filter rates per output resolution, the linear stage last), predicted by the
shipped profile and timed beside the dense model (b1, b8, 1 thread): do predictions hold at the 0.95 rates
the space offers where the profile timed them? Run from the repository root, alone, pinned:

    taskset -c 1 python bench/runs/vgg16-bn-top-rate/stage_plans.py 0.8/0.8/0.9/0.95/0.95/0 ...
"""
import sys
import tempfile

import optuna
import torch
from optuna.trial import FixedTrial

sys.path.insert(0, "bench")
sys.path.insert(0, ".")
from sparsesearch.runtime import set_threads  # noqa: E402

set_threads(1)
from arms import dense_checkpoint, plan_timed, predicted  # noqa: E402

from sparsesearch import search  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


def main() -> None:
    config = search.SearchConfig(model="vgg16-bn", dataset="fashion-mnist",
                                 checkpoint=dense_checkpoint("vgg16-bn", "fashion-mnist"), trial_data=0.1)
    with tempfile.TemporaryDirectory() as tmp:
        built = search.build(config, torch.device("cpu"), tmp, notify=lambda *a: None)
        search.record(optuna.create_study(directions=["maximize", "maximize"]), built)
        space = built.space
        print("max_rate", built.max_rate, "stages", list(space.stages))
        for spec in sys.argv[1:]:
            params = space.even()
            for stage, rate in zip(space.stages, map(float, spec.split("/"))):
                params[f"type:{stage}"] = "filter" if "filter" in space.choices(stage) else space.choices(stage)[0]
                params[f"rate:{stage}"] = rate
            plan = space.suggest(FixedTrial(params))
            row = {"predicted": predicted(built, plan), **plan_timed(built, plan)}
            print(spec, {k: round(v, 2) for k, v in row.items()}, flush=True)


if __name__ == "__main__":
    main()
