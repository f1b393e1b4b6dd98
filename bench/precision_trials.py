"""What bfloat16 training does to a search's trials (`optimize --precision bfloat16`), measured: the
control (the trial recipe, nothing pruned) and the uniform filter ladder trained with the trial
recipe in float32 and in bfloat16, from one dense checkpoint. Per run: validation accuracy, the drop
paired image by image with the control of its own precision (± its standard error), and seconds.
The question a user asks: do bfloat16 trials judge plans as float32 trials do, for how much less?

Usage: taskset -c 1 python bench/precision_trials.py [--model resnet56] [--dataset fashion-mnist]
       [--trial-data 0.1] [--trial-epochs 1+3] [--rates 0.3 0.5 0.7] [--seed 0]
Run alone on a core: the seconds are part of the answer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from arms import uniform_plan  # noqa: E402
from common import case_name, dense_checkpoint, record  # noqa: E402

from sparsesearch import search  # noqa: E402
from sparsesearch.admm import run_admm  # noqa: E402
from sparsesearch.plan import Plan  # noqa: E402
from sparsesearch.runtime import set_threads  # noqa: E402
from sparsesearch.train import paired_drop, percent  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--trial-data", type=float, default=0.1)
    parser.add_argument("--trial-epochs", default="1+3")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--seed", type=int, default=0, help="of training (its order of batches); another seed "
                        "says how far two runs of one precision differ")
    args = parser.parse_args()
    set_threads(1)
    admm_epochs, retrain_epochs = search.parse_epochs(args.trial_epochs)
    config = search.SearchConfig(model=args.model, dataset=args.dataset,
                                 checkpoint=dense_checkpoint(args.model, args.dataset, ""),
                                 admm_epochs=admm_epochs, retrain_epochs=retrain_epochs, trial_data=args.trial_data,
                                 seed=args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        built = search.build(config, torch.device("cpu"), tmp, notify=print)
        plans = {"control": Plan({})} | {f"filter {r:g}": uniform_plan(built, r) for r in args.rates}
        for precision in PRECISIONS:  # the control first: each plan's drop is paired with its precision's
            admm = replace(replace(config, precision=precision).admm(), rungs=())  # trained to the end, as the control
            control = None
            for label, plan in plans.items():
                result = run_admm(built.fresh_model(), built.trial_data, plan, admm, built.device, built.deps)
                control = result.val_correct if control is None else control
                drop, se = paired_drop(control, result.val_correct)
                rows.append({"plan": label, "precision": precision, "val %": round(percent(result.val_correct), 2),
                             "drop vs control": round(drop, 2), "± SE": round(se, 2),
                             "seconds": round(result.seconds)})
                print(rows[-1], flush=True)
    for row in rows:
        other = next(r for r in rows if r["plan"] == row["plan"] and r["precision"] == "float32")
        row["time vs float32"] = round(row["seconds"] / other["seconds"], 2)
    record(f"precision_trials-{case_name(args.model, args.dataset)}{f'-seed{args.seed}' if args.seed else ''}", rows,
           f"{args.model} on {args.dataset}: the control and the uniform filter ladder, each trained with the trial "
           f"recipe ({args.trial_epochs} epochs on {args.trial_data:g} of the training split, validated on the whole "
           f"validation split) in float32 and under bfloat16 autocast, from the committed dense checkpoint, seed "
           f"{args.seed}, 1 thread. "
           "Drops are paired image by image with the control of the same precision.")


if __name__ == "__main__":
    main()
