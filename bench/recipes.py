"""ADMM or one-shot pruning, as the recipe of trials and of full runs, and the weight-norm seeds.

The trial recipe `1+3` spends one epoch on ADMM (the dense network pulled toward its projection) and
three retraining the hard-pruned one; `0+4` prunes by magnitude at once and spends all four on the
slim network (`compact.slimmed`), a fraction of the cost at high rates. This runs plans of one case
(the uniform filter plans of the study's space, and `seeds.norm_params`) with the recipes asked for,
at trial fidelity (`--trial-data` of the training split; the drop paired with the arms' control,
the trial recipe with nothing pruned: bench/runs/arms-CASE/control.journal) or as full runs (the
whole split; the drop paired with the dense model), and with `--time` times each plan compacted
beside the dense model as `bench/arms.py` does (1 thread, one core, batch 1 and 8) if a full run
trained it.

Usage: taskset -c 1 python bench/recipes.py --model vgg16-bn --runs uniform:0.7:0+4:trial norm:0.9:0+6:full
       [--time]
Each run is FAMILY:RATE:EPOCHS:FIDELITY (family uniform, norm, or stages with one filter rate per stage, e.g.
stages:0.8/0.8/0.85/0.9/0.9:0+6:full; fidelity trial or full). A uniform or norm RATE may add how many of each
stage's removable slots go, e.g. norm:0.9+0/1/1/1/1 (vgg16-bn: a 3x3 conv collapsed in each stage but the
first); stages too. A fifth field K runs the plan again at another seed (seed + K x 1000, as `finalize`
replicates a close call). Finished runs
are kept in bench/runs/recipes-CASE/results.json and not run again; a full run resumes from its last
epoch (`*.resume.pt`, out of git). Runs of one case may train side by side (one per core), each adding its
rows; time alone on a core: seconds and speedups are part of the answer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import optuna
import torch

sys.path.insert(0, str(Path(__file__).parent))
from arms import RUNS, admm_trained, plan_timed, predicted, save, scored  # noqa: E402
from common import case_name, dense_checkpoint, record  # noqa: E402

from sparsesearch import search, seeds, storage  # noqa: E402
from sparsesearch.admm import resume_files  # noqa: E402
from sparsesearch.files import read_json  # noqa: E402
from sparsesearch.plan import LayerSparsity, Plan  # noqa: E402
from sparsesearch.runtime import machine, set_threads  # noqa: E402
from sparsesearch.sparsity import REMOVED, SparsityType  # noqa: E402
from sparsesearch.train import percent  # noqa: E402

FAMILIES = ("uniform", "norm", "stages")
FIDELITIES = ("trial", "full")
COLUMNS = ("family", "rate", "epochs", "fidelity", "replicate", "predicted", "drop", "se", "test drop", "seconds")


def plan_of(built: search.Search, family: str, rate: str) -> Plan:
    """The family's plan at `rate` in the study's space (aligned as a trial's). `stages` takes a filter
    rate per stage of the per-stage space, in its order, above the space's MAX_RATE too: where the
    accuracy cliff lies, beyond what a study can draw."""
    space = built.space
    rate, _, removals = rate.partition("+")  # RATE+C1/C2/...: remove so many of each unit's removable slots
    counts = dict(zip(space.removable, map(int, removals.split("/")))) if removals else {}
    if family == "stages":
        rates = dict(zip(space.stages, map(float, rate.split("/"))))
        layers = {n: LayerSparsity(SparsityType.FILTER, r) for stage, r in rates.items() if r > 0
                  for s in space.stages[stage] for n in s.layers}
        layers |= {n: LayerSparsity(SparsityType.FILTER, REMOVED) for unit, count in counts.items()
                   for s in space.cheapest_removals(space.removable[unit])[:count] for n in s.layers}
        return Plan(layers).aligned(space.by_name.values(), space.steps)
    params = (space.uniform_params(SparsityType.FILTER, float(rate)) if family == "uniform"
              else seeds.norm_params(space, built.model, float(rate)))
    return space.suggest(optuna.trial.FixedTrial(params | {f"remove:{unit}": c for unit, c in counts.items()}))


def trained(built: search.Search, plan: Plan, epochs: str, full: bool, resume: Path, replicate: int = 0) -> dict:
    """`plan` trained from the dense weights with `epochs` (ADMM+RETRAIN), scored as a trial or a full
    run (`replicate` k > 0: again at another seed, as `finalize` runs a close call again)."""
    given = search.parse_epochs(epochs)
    row = scored(built, admm_trained(built, plan, given if full else None, resume if full else None, given,
                                     replicate)[1], full)
    if full:
        row["test drop"] = built.dense["test"] - row.pop("test")
    return {k: row[k] for k in ("drop", "se", "seconds", "test drop") if k in row}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vgg16-bn")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--trial-data", type=float, default=0.1)
    parser.add_argument("--runs", nargs="*", default=[],
                        help="FAMILY:RATE:EPOCHS:FIDELITY[:K], e.g. norm:0.8:0+4:trial")
    parser.add_argument("--time", action="store_true", help="time every plan a full run trained (on this CPU) "
                        "not timed yet")
    args = parser.parse_args()
    set_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    case = case_name(args.model, args.dataset)
    folder = RUNS / f"recipes-{case}"
    folder.mkdir(parents=True, exist_ok=True)
    results = folder / "results.json"
    state: dict = read_json(results, "the recipes' results") if results.is_file() else {}
    config = search.SearchConfig(model=args.model, dataset=args.dataset,
                                 checkpoint=dense_checkpoint(args.model, args.dataset), trial_data=args.trial_data)
    with tempfile.TemporaryDirectory() as tmp:
        built = search.build(config, torch.device("cpu"), tmp, notify=print)
        holder = storage.open_study("control", f"journal:///{RUNS / f'arms-{case}' / 'control.journal'}", True)
        search.control(built, holder, wait=True)  # an arms run may be training it
        built.removable = built.find_removable()  # today's, not what the control's study recorded long ago
        built.offer(built.withheld)
        for spec in args.runs:
            family, rate, epochs, fidelity, *again = spec.split(":")
            replicate = int(again[0]) if again else 0
            if family not in FAMILIES or fidelity not in FIDELITIES:
                raise SystemExit(f"--runs {spec}: FAMILY is one of {FAMILIES}, FIDELITY one of {FIDELITIES}")
            if spec in state:
                continue
            plan = plan_of(built, family, rate)
            resume = folder / f"{spec.replace(':', '-').replace('/', '_')}.resume.pt"
            row = {"family": family, "rate": rate if family == "stages" or "+" in rate else float(rate),
                   "epochs": epochs,
                   "fidelity": fidelity, "replicate": replicate, "predicted": predicted(built, plan),
                   **trained(built, plan, epochs, fidelity == "full", resume, replicate)}
            for path in resume_files(resume):
                path.unlink(missing_ok=True)
            state[spec] = row
            save(results, state)  # with the rows another run of the case wrote meanwhile
            print(spec, {k: round(v, 2) for k, v in row.items() if isinstance(v, float)}, flush=True)
        if args.time:
            cpu = machine()["processor"]
            for spec, row in state.items():  # the plans a full run trained: what would ship
                if row["fidelity"] == "full" and cpu not in row.get("timed", {}):
                    plan = plan_of(built, row["family"], str(row["rate"]))
                    row.setdefault("timed", {})[cpu] = plan_timed(built, plan)
                    save(results, state)
                    print(spec, row["timed"][cpu], flush=True)
        control = percent(built.reference)
    speeds = sorted({k for row in state.values() for t in row.get("timed", {}).values() for k in t})
    rows = [{k: row.get(k, "") for k in COLUMNS} | {k: next(iter(row.get("timed", {}).values()), {}).get(k, "")
                                                     for k in speeds}
            for row in sorted(state.values(), key=lambda r: (r["fidelity"], r["family"], str(r["rate"]), r["epochs"]))]
    if rows:
        record(f"recipes-{case}", rows,
               f"{args.model} on {args.dataset} (dense {built.dense['val']:.2f}% val, {built.dense['test']:.2f}% "
               f"test; control, the trial recipe with nothing pruned, {control:.2f}% val). Trials on "
               f"{args.trial_data:g} of the training split, drop paired with the control; full runs on all of it, "
               "drop paired with the dense model. EPOCHS: ADMM+RETRAIN (0+N: magnitude pruning at once, then N "
               "epochs on the slim network). `predicted`: the study's latency model; speedups measured compacted "
               "beside the dense model, 1 thread, one core, median of interleaved rounds (first CPU timed). Rows "
               "accumulate over runs (bench/runs/recipes-CASE/results.json); the command is the last run's.")


if __name__ == "__main__":
    main()
