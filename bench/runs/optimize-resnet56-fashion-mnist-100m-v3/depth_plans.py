"""resnet56 plans that remove residual branches and prune filters (the family the sensitivity seeds
now start from), beside uniform ones: trained (trial fidelity 0+4, or a full run at EPOCHS) or,
with --time, compacted and timed beside dense (batch 1 and 8, 1 thread). Removal order: the v2
study's sensitivity scan. The logs here came from this script's two earlier forms (one per mode,
same setup and plans); run from the repository root, nothing else running when timing.

    python bench/runs/optimize-resnet56-fashion-mnist-100m-v3/depth_plans.py [--time] SPEC...

SPEC: uniform:RATE, seed:RATE (`seeds.seeded_params`), or REMOVED/PER/STAGE:RATES/PER/STAGE:LEAN[:EPOCHS],
e.g. 6/6/6:0.5/0.5/0.5/0:1:0+6 (RATES includes the linear stage); with --time also trial:N (the
100-minute study's trial N), v4:N and v5:N (the 110-minute studies on a quarter of the data) and random:N
(trial N of the one-shot resnet56 arms' random search).
"""
import json
import sys
import tempfile

import optuna
import torch
from optuna.trial import FixedTrial

sys.path.insert(0, "bench")
sys.path.insert(0, ".")
from sparsesearch.runtime import set_threads  # noqa: E402

set_threads(1)
from arms import RUNS, dense_checkpoint, plan_timed, predicted  # noqa: E402
from recipes import trained  # noqa: E402

from sparsesearch import search, seeds, storage  # noqa: E402
from sparsesearch.plan import Plan  # noqa: E402

HERE = "bench/runs/optimize-resnet56-fashion-mnist-100m-v3"
STUDIES = {"trial": ("resnet56-fashion-mnist-100m-v3", f"sqlite:///{HERE}/study.db"),
           "v4": ("resnet56-fashion-mnist-110m-v4",
                  "sqlite:///bench/runs/optimize-resnet56-fashion-mnist-110m-v4/study.db"),
           "v5": ("resnet56-fashion-mnist-110m-v5",
                  "sqlite:///bench/runs/optimize-resnet56-fashion-mnist-110m-v5/study.db"),
           "random": ("random", f"journal:///{RUNS / 'arms-resnet56-fashion-mnist-0+4-0+6' / 'random.journal'}")}

optuna.logging.set_verbosity(optuna.logging.WARNING)


def params_of(built: search.Search, found: seeds.Scan, spec: str) -> dict:
    space = built.space
    if spec.startswith(("uniform:", "seed:")):
        family, rate = spec.split(":")
        return (space.uniform_params(built.baseline_kind, float(rate)) if family == "uniform"
                else seeds.seeded_params(space, found, float(rate)))
    removed, rates, lean = spec.split(":")[:3]
    params = space.even() | {"lean": float(lean)}
    for unit, n in zip(space.removable, map(int, removed.split("/"))):
        params[f"remove:{unit}"] = n
    for stage, rate in zip(space.stages, map(float, rates.split("/"))):
        params[f"type:{stage}"] = "filter" if "filter" in space.choices(stage) else space.choices(stage)[0]
        params[f"rate:{stage}"] = rate
    return params


def plan_of(built: search.Search, found: seeds.Scan, spec: str) -> Plan:
    """The plan a SPEC names: a study's trial as it trained, or the space's plan of its parameters."""
    family, _, number = spec.partition(":")
    if family in STUDIES:
        study = storage.open_study(STUDIES[family][0], STUDIES[family][1], False)
        return Plan.from_dict({"layers": study.get_trials(False)[int(number)].user_attrs["plan"]}, spec)
    return built.space.suggest(FixedTrial(params_of(built, found, spec)))


def main() -> None:
    timing = "--time" in sys.argv
    specs = [a for a in sys.argv[1:] if a != "--time"]
    config = search.SearchConfig(model="resnet56", dataset="fashion-mnist",
                                 checkpoint=dense_checkpoint("resnet56", "fashion-mnist"), trial_data=0.1)
    scanned = optuna.load_study(study_name="resnet56-fashion-mnist-2h-v2",
                                storage="sqlite:///bench/runs/optimize-resnet56-fashion-mnist-2h-v2/study.db")
    found = seeds.Scan.from_attrs(scanned.user_attrs["sensitivity"])
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        built = search.build(config, torch.device("cpu"), tmp, notify=lambda *a: None)
        search.record(optuna.create_study(directions=["maximize", "maximize"]), built)  # removable slots, steps
        built.space.robustness, built.space.removal_drop = seeds.robustness(found), found.removed
        if not timing:
            holder = storage.open_study("control", f"journal:///{RUNS / 'arms-resnet56-fashion-mnist' / 'control.journal'}",
                                        True)
            search.control(built, holder, wait=True)
        for spec in specs:
            plan = plan_of(built, found, spec)
            if timing:
                row = plan_timed(built, plan)
            else:
                epochs = (spec.split(":") + ["0+4"])[3] if not spec.startswith(("uniform:", "seed:")) else "0+4"
                full = epochs != "0+4"
                resume = RUNS / f"depth-{spec.replace(':', '-').replace('/', '_')}.resume.pt"
                row = trained(built, plan, epochs, full, resume if full else None)
            out[spec] = {"predicted": predicted(built, plan), **row}
            print(spec, {k: round(v, 2) for k, v in out[spec].items()}, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
