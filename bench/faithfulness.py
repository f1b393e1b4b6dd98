"""Do cheap trials rank plans as full training does? (issue 14: multi-fidelity must be faithful)

For one case (model, dataset, dense checkpoint), N plans spread over the predicted speedups of the
search space (random plans, one per speedup quantile) are each trained twice from the dense weights:
at the search's trial fidelity (`--trial-data`, `--trial-epochs`, with its rungs) and at the full
budget (`export`'s ADMM+retrain epochs on the whole training split). Reported: the Spearman rank
correlation of the full validation accuracy with the cheap trial's final accuracy and with each
rung's probe accuracy, over all plans and over the pairs of plans predicted within 10% of each
other's speedup (the ladder compares a plan only with plans about as fast: there ranking is hard).

Each plan's results are kept in bench/results/faithfulness-CASE.state.json as they finish: a
killed run (or a later session) goes on where it stopped, and a run at another trial fidelity
trains only the cheap side, reusing the plans and their full-budget results. The state records the
dense weights' hash and refuses others: the dense model (bench/checkpoints/CASE/dense.pt, committed;
`sparsesearch train --out` makes one) is what every result starts from.
Usage: python bench/faithfulness.py --model lenet5 --dataset fashion-mnist [--plans 12]
       [--trial-data 0.1] [--trial-epochs 1+3] [--full-epochs 10+5] [--device cpu]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import optuna
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, case_name, dense_checkpoint, record  # noqa: E402

from sparsesearch import search  # noqa: E402
from sparsesearch.admm import run_admm  # noqa: E402
from sparsesearch.files import write_json  # noqa: E402
from sparsesearch.plan import Plan  # noqa: E402
from sparsesearch.profiler import predict_latency  # noqa: E402
from sparsesearch.runtime import set_threads  # noqa: E402

CANDIDATES = 400  # random plans drawn to pick N spread over predicted speedup
NEAR = 0.10  # plans "about as fast": predicted speedups within 10%


def spread_plans(built: search.Search, n: int, seed: int = 0) -> list[tuple[dict, float]]:
    """N random plans of the space (predicted at least as fast as dense), one per speedup quantile."""
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=seed))
    drawn = []
    for _ in range(CANDIDATES):
        plan = built.space.suggest(study.ask())
        if plan.layers:
            speedup = built.dense_ms / predict_latency(built.latency, built.model, built.input_shape, plan).total_ms
            if speedup >= 1:
                drawn.append((plan, speedup))
    drawn.sort(key=lambda p: p[1])
    picks = [drawn[round(i * (len(drawn) - 1) / (n - 1))] for i in range(n)]
    return [(plan.to_dict()["layers"], speedup) for plan, speedup in picks]


def train(built: search.Search, layers: dict, cheap: bool, full_epochs: tuple[float, float]) -> dict:
    """One plan trained from the dense weights at the trial fidelity (with rungs) or the full budget."""
    plan = Plan.from_dict({"layers": layers}, "bench")
    rungs: list[float] = []
    config = built.config.admm() if cheap else replace(built.config.admm(*full_epochs), rungs=())
    data = built.trial_data if cheap else built.data
    result = run_admm(built.fresh_model(), data, plan, config, built.device, built.deps,
                      on_rung=lambda r: rungs.append(r.acc))
    return {"val_acc": result.accuracy["final_val"], "rungs": rungs, "seconds": round(result.seconds, 1)}


def correlations(rows: list[dict]) -> dict[str, float]:
    """Spearman of full accuracy with each cheap signal, over all plans and over near pairs (concordance)."""
    full = [r["full"]["val_acc"] for r in rows]
    signals = {"cheap final": [r["cheap"]["val_acc"] for r in rows]}
    for k in range(len(rows[0]["cheap"]["rungs"])):
        signals[f"rung {k + 1}"] = [r["cheap"]["rungs"][k] for r in rows]
    out = {}
    near = [(i, j) for i, j in itertools.combinations(range(len(rows)), 2)
            if abs(rows[i]["speedup"] / rows[j]["speedup"] - 1) <= NEAR and full[i] != full[j]]
    for name, values in signals.items():
        out[f"spearman {name}"] = round(float(spearmanr(values, full).statistic), 3)
        agree = [(values[i] - values[j]) * (full[i] - full[j]) > 0 for i, j in near]
        out[f"near pairs ordered alike, {name}"] = round(sum(agree) / len(agree), 3) if agree else None
    out["near pairs"] = len(near)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--checkpoint", default="", help="dense weights (default bench/checkpoints/CASE/dense.pt)")
    parser.add_argument("--plans", type=int, default=12)
    parser.add_argument("--trial-data", type=float, default=0.1)
    parser.add_argument("--trial-epochs", default="1+3")
    parser.add_argument("--full-epochs", default="10+5")
    parser.add_argument("--types", default="filter,channel,shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed: another seed's full runs give the noise ceiling")
    args = parser.parse_args()
    set_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    admm_epochs, retrain_epochs = search.parse_epochs(args.trial_epochs)
    full_epochs = search.parse_epochs(args.full_epochs, "--full-epochs")
    case = case_name(args.model, args.dataset)
    checkpoint = dense_checkpoint(args.model, args.dataset, args.checkpoint)
    config = search.SearchConfig(model=args.model, dataset=args.dataset, checkpoint=checkpoint,
                                 types=tuple(args.types.split(",")), admm_epochs=admm_epochs,
                                 retrain_epochs=retrain_epochs, trial_data=args.trial_data, seed=args.seed)
    seeded = f", seed {args.seed}" if args.seed else ""
    fidelity = f"{args.trial_data:g} of the data, {args.trial_epochs} epochs{seeded}"
    path = RESULTS / f"faithfulness-{case}.state.json"
    with tempfile.TemporaryDirectory() as tmp:
        built = search.build(config, torch.device(args.device), tmp, notify=print)
        state = json.loads(path.read_text()) if path.is_file() else {
            "plans": spread_plans(built, args.plans), "full_epochs": args.full_epochs, "full": {}, "cheap": {},
            "dense_sha256": built.weights_sha256}
        if state["full_epochs"] != args.full_epochs:
            sys.exit(f"{path} holds plans trained at --full-epochs {state['full_epochs']}; pass that, or delete it")
        if state.get("dense_sha256") != built.weights_sha256:
            sys.exit(f"{path} holds plans trained from other dense weights than {checkpoint}; pass those, or delete it")
        cheap = state["cheap"].setdefault(fidelity, {})
        state.setdefault("work", {})[fidelity] = search.trial_share(config, full_epochs)
        replicates = state.setdefault("replicates", {}) if args.seed else {}
        full_runs = replicates.setdefault(str(args.seed), {}) if args.seed else state["full"]
        for i, (layers, _) in enumerate(state["plans"]):
            for done, is_cheap in ((full_runs, False), (cheap, True)):
                if str(i) not in done:
                    done[str(i)] = train(built, layers, is_cheap, full_epochs)
                    write_json(path, state)
                    print(i, "cheap" if is_cheap else "full", done[str(i)], flush=True)
    full = [state["full"][str(i)] for i in range(len(state["plans"]))]
    table = [{"plan": i, "predicted speedup": round(speedup, 3), "full val %": round(full[i]["val_acc"], 2),
              "full s": full[i]["seconds"]} for i, (_, speedup) in enumerate(state["plans"])]
    lines = []
    for name, runs in state["cheap"].items():
        rows = [{"speedup": speedup, "full": full[i], "cheap": runs[str(i)]}
                for i, (_, speedup) in enumerate(state["plans"])]
        stats = correlations(rows)
        mean_s = sum(r["cheap"]["seconds"] for r in rows) / len(rows)
        work = state.get("work", {}).get(name)  # the machine-free cost: seconds here depend on what ran beside
        lines.append(f"{name} ({'' if work is None else f'{work:.1%} of a full run in training images, '}"
                     f"{mean_s:.1f} s per trial, {mean_s / (sum(f['seconds'] for f in full) / len(full)):.1%} "
                     f"of a full run in seconds): " + "; ".join(f"{k} {v}" for k, v in stats.items()))
        for row, r in zip(table, rows):
            row[f"{name}: val %"] = round(r["cheap"]["val_acc"], 2)
            row.update({f"{name}: rung {k + 1} %": round(v, 2) for k, v in enumerate(r["cheap"]["rungs"])})
    spread = max(f["val_acc"] for f in full) - min(f["val_acc"] for f in full)
    for seed, runs in state.get("replicates", {}).items():  # the full budget again, another training seed
        again = [runs[str(i)]["val_acc"] for i in range(len(full))]
        ceiling = spearmanr(again, [f["val_acc"] for f in full]).statistic
        lines.append(f"noise ceiling: the full budget trained again with seed {seed} ranks the plans at Spearman "
                     f"{ceiling:.3f} against seed 0 (no trial fidelity can agree with one run of the full budget much "
                     "more than two such runs agree with each other)")
        for row, value in zip(table, again):
            row[f"full val % (seed {seed})"] = round(value, 2)
    summary = (f"{args.model} on {args.dataset}: {len(full)} random plans ({args.types}) spread over predicted "
               f"speedup, each trained from the dense weights at the full budget ({state['full_epochs']} epochs, whole "
               f"training split; full accuracies span {spread:.2f} points) and at each trial fidelity below (rungs on "
               f"the 1,000-image validation probe); accuracy on the whole validation split. {args.device}, "
               f"{torch.get_num_threads()} threads. Rank agreement with the full budget, per trial fidelity:\n\n"
               + "\n".join(f"- {line}" for line in lines))
    print(record(f"faithfulness-{case}", table, summary))


if __name__ == "__main__":
    main()
