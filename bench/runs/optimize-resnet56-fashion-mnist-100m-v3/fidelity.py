"""How faithful a trial is to a full run, for plans that remove residual branches and plans that do
not: resnet56 plans whose full-run drops (0+6 epochs on the whole split) are known, trained again at
trial fidelity with another training seed (`--seed 1`) or on a larger share of the split
(`--trial-data 0.25`), each drop paired image by image with the control trained the same way.

    taskset -c 1 python bench/runs/optimize-resnet56-fashion-mnist-100m-v3/fidelity.py \
        --seed 1 --out bench/runs/optimize-resnet56-fashion-mnist-100m-v3/fidelity-seed1.json SPEC...

SPEC as depth_plans.py takes them (uniform:RATE, REMOVED/PER/STAGE:RATES/PER/STAGE:LEAN, trial:N,
random:N). Finished plans in --out are not run again. Run from the repository root.
"""
import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import depth_plans  # noqa: E402  (sets 1 thread, the bench path)

import optuna  # noqa: E402
import torch  # noqa: E402
from arms import admm_trained, dense_checkpoint  # noqa: E402

from sparsesearch import search, seeds  # noqa: E402
from sparsesearch.plan import Plan  # noqa: E402


def paired(control: list[int], plan: list[int]) -> tuple[float, float]:
    """The drop in points against the control on the same images, and its standard error."""
    diff = [a - b for a, b in zip(control, plan)]
    mean = sum(diff) / len(diff)
    var = sum((d - mean) ** 2 for d in diff) / (len(diff) - 1)
    return 100 * mean, 100 * math.sqrt(var / len(diff))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trial-data", type=float, default=0.1)
    parser.add_argument("--epochs", default="0+4")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("specs", nargs="*")
    args = parser.parse_args()
    config = search.SearchConfig(model="resnet56", dataset="fashion-mnist", seed=args.seed,
                                 checkpoint=dense_checkpoint("resnet56", "fashion-mnist"), trial_data=args.trial_data)
    scanned = optuna.load_study(study_name="resnet56-fashion-mnist-2h-v2",
                                storage="sqlite:///bench/runs/optimize-resnet56-fashion-mnist-2h-v2/study.db")
    found = seeds.Scan.from_attrs(scanned.user_attrs["sensitivity"])
    out = json.loads(args.out.read_text()) if args.out.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        built = search.build(config, torch.device("cpu"), tmp, notify=lambda *a: None)
        search.record(optuna.create_study(directions=["maximize", "maximize"]), built)
        built.space.robustness, built.space.removal_drop = seeds.robustness(found), found.removed
        for spec in ["control", *args.specs]:
            if spec in out:
                continue
            plan = Plan({}) if spec == "control" else depth_plans.plan_of(built, found, spec)
            _, raw = admm_trained(built, plan, None, None, search.parse_epochs(args.epochs))
            row = {"val": 100 * raw["val_correct"].float().mean().item(), "seconds": raw["seconds"],
                   "correct": raw["val_correct"].int().tolist()}
            if spec != "control":
                row["drop"], row["se"] = paired(out["control"]["correct"], row["correct"])
            out[spec] = row
            print(spec, {k: round(v, 2) for k, v in row.items() if k != "correct"}, flush=True)
            args.out.write_text(json.dumps(out))


if __name__ == "__main__":
    main()
