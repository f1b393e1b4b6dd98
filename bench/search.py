"""The search against its controls: best measured speedup within 0.5 and 1.0 points of accuracy.

For each case (digits-cnn/digits, lenet5/Fashion-MNIST), in one run on one machine:
(a) the study (TPE, starting from the uniform baselines) at budget N trials;
(b) the uniform baselines alone (filter 30/50/70%, the study's first trials);
(c) random search over the same space at the same budget N, without the baselines.
Every feasible Pareto trial and every baseline is compacted and timed beside its masked dense model
(`report.measure_front`), so all speedups are measured, not predicted. Accuracy is validation
accuracy (the objective); the constraint is 1.0 point.

Run alone (`make bench`): another busy process on the same cores distorts the timings.
Usage: python bench/search.py [--budget N] [CASE ...]   (cases: digits, fashion)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, record  # noqa: E402

from sparsesearch import report, search, space, storage  # noqa: E402

CASES = {  # model, dataset, ADMM+retrain epochs per trial
    "digits": ("digits-cnn", "digits", (1.0, 3.0)),
    "fashion": ("lenet5", "fashion-mnist", (0.5, 1.0)),
}
DROPS = (0.5, 1.0)


def arm(built: search.Search, name: str, storage_dir: Path, budget: int, sampler: str) -> tuple[optuna.Study, float]:
    built.config.sampler = sampler
    study = storage.open_study(name, f"sqlite:///{storage_dir / f'{name}.db'}", True,
                              search.make_sampler(built.config, 0), space.LadderPruner())
    built.artifacts = str(storage_dir / name)
    search.record(study, built)
    start = time.perf_counter()
    search.run(built, study, search.Budget(trials=budget), baselines=sampler != "random")
    report.measure_front(built, study)
    return study, time.perf_counter() - start


def rows_for(case: str, label: str, rows: list[dict], trials: int, seconds: float) -> dict:
    out: dict = {"case": case, "arm": label}
    for drop in DROPS:
        best = report.best_within(rows, drop)
        out[f"speedup_within_{drop}"] = round(best["measured_speedup"], 3) if best else None
        out[f"trial_within_{drop}"] = best["trial"] if best else None
        out[f"val_acc_within_{drop}"] = round(best["val_acc"], 2) if best else None
    return {**out, "trials": trials, "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=int, default=30)
    parser.add_argument("cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    device, rows = torch.device("cpu"), []
    for case in args.cases:
        model, dataset, (admm_epochs, retrain_epochs) = CASES[case]
        config = search.SearchConfig(model=model, dataset=dataset, admm_epochs=admm_epochs,
                                     retrain_epochs=retrain_epochs)
        with tempfile.TemporaryDirectory() as tmp:
            built = search.build(config, device, Path(tmp) / "artifacts", notify=print)
            studied, seconds = arm(built, f"{case}-tpe", Path(tmp), args.budget, "tpe")
            data = report.pareto(studied)
            rows.append(rows_for(case, f"study (TPE) @ {args.budget}", data["pareto"], args.budget, seconds))
            rows.append(rows_for(case, "uniform baselines", data["baselines"], len(data["baselines"]), 0.0))
            report.plot_pareto(studied, RESULTS / f"search-{case}.png")
            randomised, seconds = arm(built, f"{case}-random", Path(tmp), args.budget, "random")
            rows.append(rows_for(case, f"random search @ {args.budget}", report.pareto(randomised)["pareto"],
                                 args.budget, seconds))
        print(rows[-3:])
    summary = (f"Best measured speedup (dense latency / compacted latency, batch 1, {torch.get_num_threads()} threads, "
               f"median of interleaved rounds) among trials within 0.5 and 1.0 points of the validation accuracy of each study's "
               f"control (the dense model trained with the trial recipe), for the study (TPE, starts with the uniform baselines), the uniform filter baselines "
               f"(30/50/70%), and random search over the same space (no baselines), each at {args.budget} trials. "
               f"Trials: {', '.join(f'{c}: {CASES[c][2][0]:g} ADMM + {CASES[c][2][1]:g} retrain epochs' for c in args.cases)}. "
               f"Empty cells: no trial of that arm came within the drop. Plots: search-CASE.png.")
    print(record("search", rows, summary))


if __name__ == "__main__":
    main()
