"""ADMM vs one-shot magnitude pruning, same retraining budget, for filter/shape/irregular at 50/70/90%.

One-shot is ADMM with no ADMM epochs (hard prune from the dense weights, then masked retraining), so
both arms share every line of code but the regulariser. A third arm gives one-shot the ADMM epochs as
extra retraining, so ADMM is also compared at equal total epochs.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import record  # noqa: E402

from sparsesearch import data  # noqa: E402
from sparsesearch.admm import ADMMConfig, run_admm  # noqa: E402
from sparsesearch.layers import trace  # noqa: E402
from sparsesearch.plan import Plan  # noqa: E402
from sparsesearch.runtime import set_threads  # noqa: E402
from sparsesearch.sparsity import SparsityType  # noqa: E402
from sparsesearch.train import TrainConfig, default_checkpoint, prepare, train_dense  # noqa: E402

CPU = torch.device("cpu")
CASES = {  # model, dataset, ADMM config (epochs sized so the whole run takes ~15 min on 2 cores)
    "digits": ("digits-cnn", "digits", ADMMConfig(admm_epochs=10, admm_interval=0.25, retrain_epochs=5)),
    "fashion": ("lenet5", "fashion-mnist", ADMMConfig(admm_epochs=3, admm_interval=0.075, retrain_epochs=1)),
}


def dense_checkpoint(model: str, dataset: str) -> Path:
    path = default_checkpoint(model, dataset)
    if not path.is_file():
        train_dense(model, dataset, TrainConfig(epochs=data.info(dataset).epochs), CPU, path)
    return path


def run(model_name: str, dataset: str, weights: Path, kind: SparsityType, rate: float, config: ADMMConfig) -> dict:
    model, ds = prepare(model_name, dataset, weights=weights)
    plan = Plan.uniform(trace(model, ds.input_shape), kind, rate)
    result = run_admm(model, ds, plan, config, CPU)
    return result.accuracy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    set_threads(2)
    rows = []
    for case in args.cases:
        model, dataset, config = CASES[case]
        weights = dense_checkpoint(model, dataset)
        arms = {"admm": config, "one-shot": replace(config, admm_epochs=0),
                "one-shot+": replace(config, admm_epochs=0, retrain_epochs=config.admm_epochs + config.retrain_epochs)}
        for kind in (SparsityType.FILTER, SparsityType.SHAPE, SparsityType.IRREGULAR):
            for rate in (0.5, 0.7, 0.9):
                row = {"model": model, "dataset": dataset, "type": kind.value, "rate": rate}
                for arm, cfg in arms.items():
                    acc = run(model, dataset, weights, kind, rate, cfg)
                    row["dense_%"] = round(acc["dense"], 2)
                    row[f"{arm}_pruned_%"] = round(acc["hard_pruned"], 2)
                    row[f"{arm}_final_%"] = round(acc["final"], 2)
                rows.append(row)
                print(row, flush=True)
    budget = "; ".join(f"{m}: ADMM {c.admm_epochs} ep (interval {c.admm_interval}) + retrain {c.retrain_epochs} ep"
                       for m, _, c in (CASES[k] for k in args.cases))
    summary = (f"Test accuracy (%) after hard pruning (`_pruned`) and after masked retraining (`_final`). "
               f"admm = ADMM then retrain; one-shot = magnitude prune then the same retraining; one-shot+ = "
               f"one-shot retrained for ADMM's epochs too. Budgets: {budget}. Uniform plan over all prunable "
               f"layers (filter skips the classifier). Seed 0, 2 threads.")
    print(record("admm_vs_oneshot", rows, summary))


if __name__ == "__main__":
    main()
