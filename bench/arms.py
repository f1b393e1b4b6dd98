"""The search against what a user would pick instead, at equal compute (issue 14, section 3).

For one case (model, dataset, dense checkpoint), four arms, each trained at the search's trial
fidelity (`--trial-data`, `--trial-epochs`; accuracy on the whole validation split, paired with
one control, the dense model trained with the trial recipe and nothing pruned, as `optimize` does):
  study          `optimize` as a user runs it: TPE, uniform baselines, sensitivity seeds, fidelity
                 ladder, types withheld where predicted no faster;
  uniform        the uniform filter ladder 10..90%, each with the same ADMM + retraining recipe;
  torch-pruning  Torch-Pruning's own global pruning (group L2-norm importance, `global_pruning`) at
                 ratios 10..90%, then plain fine-tuning for the same epochs;
  random         random search in the study's space (no baselines, no seeds; its sensitivity scan,
                 which the space's `lean` needs, is run and counted), with the ladder;
  calibrated     the study as a user runs `optimize` twice with `finalize` between: the study's
                 trials up to half its compute, then the rest at the trial limit (`search.trial_limit`)
                 that the study's finals of those trials support, recorded as the exports finalize
                 writes (the full runs are not counted in its compute, as no arm's finals are);
  promoted       `optimize --max-acc-drop LIMIT` (the `--finalize` limit) as it runs now: the study with
                 the full runs its bisection asks for promoted between its trials (`Promoted`: as much
                 time as its trials' compute at most), each the arm's final as it ends, so the trials
                 after it are judged at the limit they support (not counted in its compute either).
A ladder stops once two rates in a row lose more than STOP points (no higher rate can then be
picked). The two searches run until their trials' summed training seconds, at the pace of the
case's fastest worker (`spent`), reach `--compute` (carried over sessions: the studies are
journal files under bench/runs/arms-CASE/, text that git keeps). Then each arm's fastest plan
within 0.5 and 1.0 points of the control (predicted speedup for the searches, the largest rate or
ratio for the ladders) is trained again at the full budget (`--full-epochs` on the whole training
split); there its drop is against the dense model. Its network, compacted, is timed beside the
dense model at batch 1 and 8 (1 thread, interleaved rounds, median ratio; built from the dense
weights, see `timed`; each CPU's timings apart), which `--no-time` defers to a later run on a quiet
core (`--no-final` then times what is trained and not yet timed on this CPU, and trains no final;
`--retime` times again what this CPU timed before). Every stage's results are written as they
finish to bench/runs/arms-CASE/results.json: a killed run, or a later session, goes on; a final's
training (hours) goes on from its last ADMM period or epoch while its machine lives
(`final-*.resume.pt`, out of git). Then more of the study's front (`--spread`: until 12 plans in
all are retrained) is trained and timed the same way. More workers on a case (`--no-picks`: the
spread only, on another core) share its finals out: each final is held by a lock while trained, and
each keeps the others' results; a plan on two arms' fronts is trained once (`twin`). With the
picks, these are the plans over which the drops at trial fidelity and at the full budget are
ranked against each other (the faithfulness of cheap trials on this network, issue 14 section 1).
`--finalize LIMIT` then bisects each arm's front (at trial fidelity, any drop) with full runs, as
`sparsesearch finalize` does, for its fastest plan within LIMIT retrained: every final of any stage
counts. Every arm's predicted speedups (the ladders' and the searches' trials') are recomputed
with the current profile on every run: sessions land on different CPUs, and the picks and the plot
must price all arms on the one device the finals are timed on.

Usage: python bench/arms.py --model resnet56 --dataset fashion-mnist [--checkpoint PATH (default
       bench/checkpoints/CASE/dense.pt)]
       [--trial-data 0.1] [--trial-epochs 1+3] [--full-epochs 4+2] [--compute 2h] [--arms ...]
       [--train-threads 1] [--no-time] [--no-final] [--retime] [--no-picks] [--spread 12] [--finalize 0.5]
Another `--trial-epochs` or `--full-epochs` than the defaults is a case of its own (bench/runs/
arms-CASE-TRIAL-FULL/, results arms-CASE-TRIAL-FULL.md): `0+4` trials prune by magnitude at once and
train the slim network (bench/results/recipes-*.md). Run alone, pinned (taskset -c 1): the final
timings need a quiet core. With `--train-threads 2`
(the finals' training on both cores of a 2-core machine), run it unpinned: the
timings then pin themselves to the last core. `--no-time` lets the finals train beside other work.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import math
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from itertools import combinations
from pathlib import Path

import numpy as np
import optuna
import torch
from scipy.stats import spearmanr
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, case_name, dense_checkpoint, record  # noqa: E402

from sparsesearch import report, search, storage  # noqa: E402
from sparsesearch.admm import apply_masks, prune_masks, resume_files, run_admm  # noqa: E402
from sparsesearch.compact import verified_compact  # noqa: E402
from sparsesearch.files import write_json  # noqa: E402
from sparsesearch.finalize import REPLICATES, Promotion, bisect, close_call  # noqa: E402
from sparsesearch.plan import LayerSparsity, Plan  # noqa: E402
from sparsesearch.profiler import predict_latency  # noqa: E402
from sparsesearch.profiler.timing import compare  # noqa: E402
from sparsesearch.runtime import LAYOUTS, in_layout, machine, set_threads  # noqa: E402
from sparsesearch.space import LadderPruner  # noqa: E402
from sparsesearch.sparsity import SparsityType  # noqa: E402
from sparsesearch.train import Snapshot, TrainConfig, correct, fit, paired_drop, percent  # noqa: E402

LADDER = tuple(round(0.1 * i, 1) for i in range(1, 10))
DROPS = (0.5, 1.0)
STOP = 2 * max(DROPS)  # a ladder stops once two rates in a row lose more: higher ones cannot qualify
BATCHES = (1, 8)
RUNS = Path(__file__).parent / "runs"
CALIBRATED, COPIED, PROMOTED = "calibrated", "copied_trials", "promoted"
SEARCHES = ("study", "random", CALIBRATED, PROMOTED)
PROMOTED_SHARE = 0.5  # of the promoted arm's run, its full runs: as much time again as its trials' compute
SPENT = "spent"  # results.json: each search arm's `spent` when it reached the compute, final: paces shift as
# workers join (one-shot trials train the slim network, so a worker's pace depends on its plans too)
LADDERS = ("uniform", "torch-pruning")


# --- the arms at trial fidelity -------------------------------------------------------------------


def searched(built: search.Search, arm: str, folder: Path, compute_s: float, control: dict,
             full_epochs: str, limit: float, adopt: Callable[[optuna.Study, int, search.ExportResult], None],
             done: bool) -> optuna.Study:
    """The study (or random search) arm, run on until its training reaches `compute_s` (`spent`, checked
    after every trial), unless `done` (it reached it before: `SPENT`); a new one is judged against the
    arms' one `control` (a study attr), not a control of its own. The promoted arm is `optimize
    --max-acc-drop LIMIT` with its full runs between trials (`Promoted`), each handed to `adopt`."""
    random = arm == "random"
    built.config = replace(built.config, sampler="random" if random else "tpe",
                           max_acc_drop=limit if arm == PROMOTED else max(DROPS))
    if arm == CALIBRATED and not (folder / f"{arm}.journal").is_file():
        halved(folder, compute_s, full_epochs)
    study = storage.open_study(arm, f"journal:///{folder / f'{arm}.journal'}", True, None, LadderPruner())
    if not study.trials:
        study.set_user_attr(search.CONTROL, control)
    study.sampler = search.make_sampler(built.config, len(study.trials))
    search.record(study, built)
    promote = None
    if arm == PROMOTED:
        full = search.parse_epochs(full_epochs, "--full-epochs")
        promote = Promoted(built, limit, full, folder / "exports", PROMOTED_SHARE,
                           search.full_run_cost(built, *full).seconds,
                           on_done=lambda n, result: adopt(study, n, result),
                           horizon_s=compute_s / (1 - PROMOTED_SHARE))
    if not done and spent(study, folder) < compute_s:
        search.run(built, study, search.Budget(), baselines=not random,
                   should_stop=lambda: spent(study, folder) >= compute_s, promote=promote)
    return study


@dataclass
class Promoted(Promotion):
    """The promoted arm's full runs: `PROMOTED_SHARE` of a run whose trials train for the case's
    compute (`horizon_s`, the two together), as `optimize --budget` holds them in its duration. The
    arm's run has no duration of its own (it stops on `spent`), and its full runs are finals, as
    every arm's, outside the compute compared. A run resumed after a kill counts its own full runs
    only, as a resumed `optimize` does."""

    horizon_s: float = 0.0

    def due(self, study: optuna.Study, total_s: float, left_s: float) -> bool:
        return super().due(study, self.horizon_s, math.inf)


def adopted(built: search.Search, study: optuna.Study, number: int, result: search.ExportResult | Exception,
            state: dict, studies: dict[str, optuna.Study]) -> tuple[str, dict] | None:
    """A promoted full run as the arm's final (key, row), so the case's bisection goes on from it; a
    run that diverged is none (the arm's bisection then retrains the plan as a final)."""
    if not isinstance(result, search.ExportResult):
        return None
    studies[PROMOTED] = study
    r = next(r for r in report.exported(study)
             if r["trial"] == number and Path(r["path"]) == result.metrics.parent.resolve())
    pick = next(c for c in candidates(built, PROMOTED, state, studies) if c["trial"] == number)
    metrics = json.loads(result.metrics.read_text())
    return f"{PROMOTED} front {pick['label']}", {
        "pick": pick, "seconds": metrics["seconds"], "val": built.dense["val"] - r["val_drop"], "drop": r["val_drop"],
        "se": r["val_drop_se"], "test drop": r["test_drop"]}


def halved(folder: Path, compute_s: float, full_epochs: str) -> None:
    """Start the `calibrated` arm: the study's finished trials until they spent half of `compute_s`,
    and, as the exports `finalize` records, the study's finals of those trials (the full runs a user
    would have run between two `optimize` calls). How many trials it took is its `COPIED` attr."""
    source = storage.open_study("study", f"journal:///{folder / 'study.journal'}", True)
    state = json.loads((folder / "results.json").read_text())
    copied: list[optuna.trial.FrozenTrial] = []
    for t in source.get_trials(False):  # in order, so each keeps its number (its finals' "trial N")
        if not t.state.is_finished() or spent_on(copied, folder) >= compute_s / 2:
            break
        copied.append(t)
    study = storage.open_study(CALIBRATED, f"journal:///{folder / f'{CALIBRATED}.journal'}", True)
    for key, value in source.user_attrs.items():
        study.set_user_attr(key, value)
    study.add_trials(copied)
    study.set_user_attr(COPIED, len(copied))
    for key, r in state.get("final", {}).items():
        if arm_of(key) == "study" and r["pick"]["trial"] < len(copied):
            study.set_user_attr(report.export_key(study, r["pick"]["trial"], full_epochs, r.get("replicate", 0)), {
                "val_drop": r["drop"], "val_drop_se": r["se"], "test_drop": r["test drop"], "epochs": full_epochs})


def past_reach(rows: dict[str, dict]) -> bool:
    """Whether a ladder's two highest rates so far both lost more than STOP points."""
    drops = [rows[r]["drop"] for r in sorted(rows, key=float)]
    return len(drops) >= 2 and min(drops[-2:]) > STOP


def paces(folder: Path) -> dict[str, float]:
    """Each worker's (process's) median seconds per complete trial, over the searches' journals. A
    complete trial is the same work whatever its plan (the masked model trains at full size), so this
    is the speed of the machine the worker ran on, and of what ran beside it."""
    times: dict[str, list[float]] = {}
    for arm in SEARCHES:
        if (path := folder / f"{arm}.journal").is_file():
            for t in storage.open_study(arm, f"journal:///{path}", True).get_trials(
                    False, states=(optuna.trial.TrialState.COMPLETE,)):
                times.setdefault(t.user_attrs.get("worker", ""), []).append(t.user_attrs["train_seconds"])
    return {worker: statistics.median(seconds) for worker, seconds in times.items()}


def spent(study: optuna.Study, folder: Path) -> float:
    """Training seconds of the study's trials (stopped ones too) and of its sensitivity scan, each at
    the pace of the fastest worker of the case (`paces`): the arms ran over sessions, on different
    CPUs and beside other jobs (resnet56's study trials took 460-560 s on one day, 285-307 s on
    the next), and equal compute means equal work at one machine's speed."""
    scan = study.user_attrs.get("sensitivity", {}).get("seconds", 0.0)
    return spent_on(search.trained_trials(study), folder, scan)


def spent_on(trials: list[optuna.trial.FrozenTrial], folder: Path, scan: float = 0.0) -> float:
    """`spent` of these trials (the study's trained ones) and a scan of `scan` seconds."""
    pace = paces(folder)
    fastest = min(pace.values(), default=1.0)

    def scale(trial: optuna.trial.FrozenTrial) -> float:
        return fastest / pace.get(trial.user_attrs.get("worker", ""), fastest)

    return scan * (scale(trials[0]) if trials else 1.0) + sum(t.user_attrs.get("train_seconds", 0.0) * scale(t)
                                                            for t in trials)


def uniform_plan(built: search.Search, rate: float) -> Plan:
    """The study's own uniform filter plan at `rate` (aligned to the profile's steps as its are)."""
    return built.space.suggest(optuna.trial.FixedTrial(built.space.uniform_params(SparsityType.FILTER, rate)))


def admm_trained(built: search.Search, plan: Plan, full: tuple[float, float] | None,
                 resume: Path | None = None, trial: tuple[float | None, float | None] = (None, None),
                 replicate: int = 0) -> tuple[nn.Module, dict]:
    """`plan` trained from the dense weights with the search's recipe, at trial fidelity (`trial`
    ADMM+RETRAIN epochs, by default the search's) or `full` (resumable at `resume`: a full run
    outlasts a session; `replicate` k > 0: again at another seed, as `search.export_trial` does)."""
    model = built.fresh_model()
    config = built.config.admm(*trial) if full is None else replace(
        built.config.admm(*full), test=True, rungs=(), seed=built.config.seed + replicate * search.REPLICATE_SEEDS)
    result = run_admm(model, built.trial_data if full is None else built.data, plan, config, built.device, built.deps,
                      resume=resume)
    return model.cpu().eval(), {"val_correct": result.val_correct, "seconds": result.seconds,
                                **({"test": result.accuracy["final"]} if full else {})}


def torch_pruned(built: search.Search, ratio: float) -> nn.Module:
    """The dense model pruned by Torch-Pruning's global group-norm pruning at `ratio` (classifier kept)."""
    import torch_pruning as tp

    model = built.fresh_model().eval()
    example = torch.randn(1, *built.input_shape)
    classifier = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2), global_pruning=True,
                         pruning_ratio=ratio, ignored_layers=[classifier]).step()
    return model


def tp_plan(built: search.Search, pruned: nn.Module) -> Plan:
    """What Torch-Pruning kept, as a filter plan of the dense model (layer by layer, by name)."""
    dense = dict(built.model.named_modules())
    return Plan({name: LayerSparsity(SparsityType.FILTER, 1 - m.weight.shape[0] / dense[name].weight.shape[0])
                 for name, m in pruned.named_modules()
                 if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.shape[0] < dense[name].weight.shape[0]})


def ladder_plan(built: search.Search, arm: str, rate: float) -> Plan:
    """A ladder arm's plan at `rate`: the study's uniform filter plan, or what Torch-Pruning keeps."""
    return uniform_plan(built, rate) if arm == "uniform" else tp_plan(built, torch_pruned(built, rate))


def trial_plan(study: optuna.Study, number: int) -> Plan:
    return Plan.from_dict({"layers": study.trials[number].user_attrs["plan"]}, f"trial {number}")


def predicted(built: search.Search, plan: Plan) -> float:
    return built.dense_ms / predict_latency(built.latency, built.model, built.input_shape, plan).total_ms


def fine_tuned(built: search.Search, model: nn.Module, full: tuple[float, float] | None,
               resume: Path | None = None, replicate: int = 0) -> tuple[nn.Module, dict]:
    """Torch-Pruning's recipe: plain fine-tuning of the pruned model for the arm's epochs (resumable
    from its last epoch at `resume`; `replicate` as `admm_trained` takes it)."""
    epochs = sum(full or (built.config.admm_epochs, built.config.retrain_epochs))
    data = built.trial_data if full is None else built.data
    config = TrainConfig(epochs, lr=0.01, seed=built.config.seed + replicate * search.REPLICATE_SEEDS,
                         layout=built.config.train_layout)
    snapshot = resume and Snapshot(resume, {"config": asdict(config), "data": data.describe(),
                                            "shapes": [list(v.shape) for v in model.state_dict().values()]})
    history = fit(model, data, config, built.device, snapshot=snapshot, validate=False)
    model = model.cpu().eval()
    out = {"val_correct": correct(model, built.data.val, torch.device("cpu")), "seconds": history.seconds}
    if full is not None:
        out["test"] = percent(correct(model, built.data.test, torch.device("cpu")))
    return model, out


def scored(built: search.Search, raw: dict, full: bool) -> dict:
    """A plan's drop, paired image by image: at trial fidelity with the control, at full budget with the dense model."""
    reference, val = (built.dense_correct, built.dense["val"]) if full else (built.reference, percent(built.reference))
    drop, se = paired_drop(reference, raw.pop("val_correct"))
    return {**raw, "val": val - drop, "drop": drop, "se": se}


# --- the final stage ------------------------------------------------------------------------------


def measured(dense: nn.Module, compacted: nn.Module, shape: tuple[int, ...]) -> dict[str, float]:
    """Speedups timed at 1 thread on one core (the last the process may use), whatever threads the
    training before used (`--train-threads`): NCHW, as the arms were priced, and channels-last (both
    models in it), as a CPU deployment may run them."""
    set_threads(1)
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {max(cores)})  # this thread: at 1 thread torch computes on the caller
    try:
        out = {}
        for layout in LAYOUTS:
            models = {"dense": in_layout(copy.deepcopy(dense), layout), "pruned": in_layout(copy.deepcopy(compacted),
                                                                                             layout)}
            for batch in BATCHES:
                t = compare(models, in_layout(torch.randn(batch, *shape), layout), rounds=20, reference="dense")
                out[f"speedup b{batch}{'' if layout == 'contiguous' else ' ' + layout}"] = 1 / t["pruned"].relative
        return out
    finally:
        os.sched_setaffinity(0, cores)


def candidates(built: search.Search, arm: str, state: dict, studies: dict[str, optuna.Study]) -> list[dict]:
    """Each arm's plans at trial fidelity: label, drop, and how fast (predicted speedup, or the ratio)."""
    if arm in studies:
        return [{"label": f"trial {t.number}", "trial": t.number, "drop": t.user_attrs["acc_drop"],
                 "speed": predicted(built, trial_plan(studies[arm], t.number)),
                 "seconds": t.user_attrs.get("train_seconds")}
                for t in studies[arm].get_trials(False, states=(optuna.trial.TrialState.COMPLETE,))]
    return [{"label": f"{arm} {rate}", "rate": float(rate), "drop": row["drop"], "speed": row["speed"]}
            for rate, row in state[arm].items()]


def pick_plan(built: search.Search, arm: str, pick: dict, studies: dict[str, optuna.Study]) -> Plan:
    return uniform_plan(built, pick["rate"]) if arm == "uniform" else trial_plan(studies[arm], pick["trial"])


def final(built: search.Search, arm: str, pick: dict, studies: dict[str, optuna.Study],
          full: tuple[float, float], resume: Path, replicate: int = 0) -> dict:
    """The picked plan trained at the full budget (hours: resumable at `resume` while the machine lives)."""
    if arm == "torch-pruning":
        raw = fine_tuned(built, torch_pruned(built, pick["rate"]), full, resume, replicate)[1]
    else:
        raw = admm_trained(built, pick_plan(built, arm, pick, studies), full, resume, replicate=replicate)[1]
    row = scored(built, raw, full=True)
    row["test drop"] = built.dense["test"] - row.pop("test")
    return row


def timed(built: search.Search, arm: str, pick: dict, studies: dict[str, optuna.Study]) -> dict:
    """The pick's compacted network timed beside the dense model, built from the dense weights: the
    plan's projection (or Torch-Pruning's pruning) keeps as many filters, channels and columns per
    layer as the trained final, and no kernel's latency depends on the weights' values. So any
    machine can time every final of a case side by side (`--retime`), without the finals' weights
    (hours of training each; vgg16-bn's are 60 MB, out of git, and gone with a session's machine).
    Each CPU's timings are kept apart (a final's `timed`, by CPU): sessions land on an Intel Xeon or an
    AMD EPYC, whose speedups for one plan differ (vgg16-bn's study pick: 4.16x against 2.90x, batch 1)."""
    if arm == "torch-pruning":
        return measured(built.fresh_model().eval(), torch_pruned(built, pick["rate"]).eval(), built.input_shape)
    return plan_timed(built, pick_plan(built, arm, pick, studies))


def plan_timed(built: search.Search, plan: Plan) -> dict[str, float]:
    """`plan` projected onto the dense weights, compacted and timed beside the dense model (`measured`)."""
    model = built.fresh_model()
    apply_masks(model, prune_masks(model, plan, built.deps))
    compacted = verified_compact(model, plan, built.input_shape, built.config.model).model
    return measured(built.fresh_model().eval(), compacted.eval(), built.input_shape)


def arm_of(key: str) -> str:
    """The arm of a final's key: "ARM within DROP" (a pick) or "study front trial N" (`spread`)."""
    return key.split(" within")[0].split(" front ")[0]


def retrained(built: search.Search, arm: str, pick: dict, studies: dict[str, optuna.Study],
              full: tuple[float, float], resume: Path, threads: int, state: dict, replicate: int = 0) -> dict:
    """A final's row: the pick trained at the full budget (`final`; `replicate` k > 0: its k-th run
    again at another seed), its resume files then removed; or the row of a final already trained
    with the same plan and seed (`twin`)."""
    if found := twin(built, arm, pick, studies, state, replicate):
        return found
    set_threads(threads)
    row = {"pick": pick, "replicate": replicate, **final(built, arm, pick, studies, full, resume, replicate)}
    for path in resume_files(resume):
        path.unlink(missing_ok=True)
    return row


def twin(built: search.Search, arm: str, pick: dict, studies: dict[str, optuna.Study], state: dict,
         replicate: int = 0) -> dict | None:
    """The row of a final trained with the same plan and recipe as `pick`, marked `trained by` its
    key: one plan is often on two fronts (the study's uniform baselines are the ladder's rates; both
    of an arm's limits may pick it), and a full run costs half an hour to hours. Plans are the same
    where they prune the dense weights alike (rates that keep as many filters: 0.5 and 0.55 of 16)."""
    def masks(arm: str, pick: dict) -> dict[str, torch.Tensor]:
        return prune_masks(built.fresh_model(), pick_plan(built, arm, pick, studies), built.deps)

    def same(their_arm: str, their_pick: dict) -> bool:
        if "torch-pruning" in (arm, their_arm):
            return arm == their_arm and pick["rate"] == their_pick["rate"]
        theirs = masks(their_arm, their_pick)
        return theirs.keys() == wanted.keys() and all(torch.equal(theirs[k], wanted[k]) for k in wanted)

    wanted = masks(arm, pick) if arm != "torch-pruning" else {}
    return next(({**row, "pick": pick, "trained by": key} for key, row in state.get("final", {}).items()
                 if (arm_of(key) in studies or arm_of(key) in LADDERS) and row.get("replicate", 0) == replicate
                 and same(arm_of(key), row["pick"])), None)


def spread(built: search.Search, state: dict, studies: dict[str, optuna.Study], n: int) -> list[dict]:
    """Plans of the study's front at trial fidelity (most speed, least drop; the next front where it
    has too few), spread over predicted speedup, to retrain beside the arms' picks until `n` plans in
    all are: chosen once (`state["spread"]`), so that a resumed run trains the same ones."""
    done = {(arm_of(key), r["pick"]["label"]) for key, r in state.get("final", {}).items()}
    plans = {c["label"]: c for c in candidates(built, "study", state, studies)}
    if "spread" not in state:
        left, pool = [c for c in plans.values() if ("study", c["label"]) not in done], []
        while left and len(pool) < n - len(done):  # peel the fronts
            front = nondominated(left)
            pool += front
            left = [c for c in left if c not in front]
        pool.sort(key=lambda c: c["speed"])
        k = min(max(n - len(done), 0), len(pool))
        state["spread"] = list(dict.fromkeys(pool[round(i * (len(pool) - 1) / max(k - 1, 1))]["label"]
                                             for i in range(k)))
    return [plans[label] for label in state["spread"]]


def nondominated(plans: list[dict]) -> list[dict]:
    """The plans no other one beats in both speed and drop at trial fidelity, each (speed, drop) once:
    two trials that tie in both trained one network (rates that keep as many filters), as
    `sparsesearch finalize`'s front keeps one of them."""
    front = [c for c in plans if not any(o["speed"] >= c["speed"] and o["drop"] <= c["drop"]
                                         and (o["speed"], o["drop"]) != (c["speed"], c["drop"]) for o in plans)]
    return [c for i, c in enumerate(front) if all((o["speed"], o["drop"]) != (c["speed"], c["drop"]) for o in front[:i])]


def finalized(built: search.Search, arm: str, state: dict, studies: dict[str, optuna.Study],
              limit: float) -> tuple[dict | None, dict | None, int]:
    """Where `sparsesearch finalize`'s bisection of the arm's front (at trial fidelity, slowest first)
    stands on the finals trained so far, any stage's: the fastest plan within `limit` retrained (its
    final; the runs' mean where a close call was run again, timed as its first), the plan to retrain
    next (None once settled), and which run of it that is (0: its first; k: its k-th replicate, as
    `sparsesearch finalize` runs a close call at the bisection's edge again, `finalize.close_call`)."""
    front = sorted(nondominated(candidates(built, arm, state, studies)), key=lambda c: c["speed"])
    finals = state.get("final", {}).items()
    ours = [r for key, r in finals if arm == CALIBRATED and arm_of(key) == "study"  # its first trials are the study's
            and r["pick"]["trial"] < studies[arm].user_attrs[COPIED]] + [r for key, r in finals if arm_of(key) == arm]
    by_run: dict[str, dict[int, dict]] = {}
    for r in ours:  # an arm's own final over the study's of the same plan and seed (its twin)
        by_run.setdefault(r["pick"]["label"], {})[r.get("replicate", 0)] = r
    runs = {label: {**report.mean_run(list(found.values()), "drop", "se"), "timed": found[min(found)].get("timed", {})}
            for label, found in by_run.items()}
    close = {label for label, r in runs.items() if len(r["drops"]) < REPLICATES
             and close_call({"val_drop": r["drop"], "val_drop_se": r["se"]}, limit, 0.5)}
    prices = {c["label"]: c.get("seconds") for c in front}  # a study arm's trials, as `finalize` prices them
    best, probe = bisect([c["label"] for c in front], {c["label"]: runs[c["label"]]["drop"] <= limit
                                                       for c in front if c["label"] in runs},
                         cost=prices if all(prices.values()) else None, close=close)
    return (runs.get(best), next((c for c in front if c["label"] == probe), None),
            len(runs[probe]["drops"]) if probe in runs else 0)


def merged(results: Path, state: dict) -> dict:
    """`state` with what another worker on the case wrote meanwhile (`--no-picks`, a second worker on
    the spread, another arm): every row of a stage (a final, a ladder's rate) this one does not hold.
    Merged whole stages let two ladder arms run side by side overwrite each other's later rates."""
    disk = json.loads(results.read_text()) if results.is_file() else {}  # written atomically: whole
    for key, value in disk.items():
        if isinstance(value, dict) and isinstance(state.get(key), dict):
            for row, found in value.items():
                state[key].setdefault(row, found)
        else:
            state.setdefault(key, value)
    return state


def save(results: Path, state: dict) -> None:
    """Write the case's state, merged with the other workers' under a lock, so that neither loses a final."""
    with open(Path(tempfile.gettempdir()) / f"{results.parent.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        write_json(results, merged(results, state))


@contextmanager
def claimed(resume: Path) -> Iterator[bool]:
    """Whether this worker holds the final trained at `resume`: a lock kept while it trains and
    released when its process ends, however, so that workers on one case share out its plans."""
    with open(Path(tempfile.gettempdir()) / f"{resume.parent.name}-{resume.stem}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def trained(results: Path, state: dict, key: str, resume: Path, train: Callable[[], dict]) -> bool:
    """The final `key` trained (`train`) and saved, unless another worker trains it now or has done
    so; whether this worker trained it."""
    with claimed(resume) as mine:
        if mine and key not in merged(results, state).setdefault("final", {}):
            state["final"][key] = train()
            save(results, state)
            print(key, state["final"][key], flush=True)
            return True
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("--trial-data", type=float, default=0.1)
    parser.add_argument("--trial-epochs", default="1+3")
    parser.add_argument("--full-epochs", default="4+2", help="the dense resnet56 trained 8 epochs here; 4+2 "
                        "fine-tunes for 3/4 of that (10+5 would take ~4 h per plan at 1 thread)")
    parser.add_argument("--compute", default="2h", help="training time of each search arm, summed over its trials")
    parser.add_argument("--arms", nargs="+", default=["study", "uniform", "torch-pruning", "random"])
    parser.add_argument("--final", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--time", action=argparse.BooleanOptionalAction, default=True,
                        help="time the trained finals (--no-time: train only, and time them later on a quiet core)")
    parser.add_argument("--retime", action="store_true", help="time again the finals this CPU timed before (a "
                        "run disturbed by other load)")
    parser.add_argument("--picks", action=argparse.BooleanOptionalAction, default=True, help="train each arm's "
                        "picks within 0.5 and 1.0 (--no-picks: only the spread, more workers on the case beside "
                        "one that trains the picks; no two train one plan, and all keep each other's finals)")
    parser.add_argument("--spread", type=int, default=12, help="after the picks, retrain more of the study's front "
                        "(trial fidelity) until this many plans in all are retrained: cheap trials' faithfulness "
                        "on this network needs plans spread over the front, and the picks all sit near the limits")
    parser.add_argument("--finalize", type=float, default=None, metavar="LIMIT", help="after the spread, bisect "
                        "each arm's front at the full budget as `sparsesearch finalize` does, for its fastest plan "
                        "within LIMIT points retrained (reusing every final trained so far)")
    parser.add_argument("--train-threads", type=int, default=1, help="threads for the finals' training (the "
                        "search arms train at 1: their compute is wall-clock); timings run at 1 on one core")
    args = parser.parse_args()
    set_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    admm_epochs, retrain_epochs = search.parse_epochs(args.trial_epochs)
    full = search.parse_epochs(args.full_epochs, "--full-epochs")
    compute_s = search.parse_budget(args.compute).seconds
    case = case_name(args.model, args.dataset)
    if (args.trial_epochs, args.full_epochs) != (parser.get_default("trial_epochs"), parser.get_default("full_epochs")):
        case += f"-{args.trial_epochs}-{args.full_epochs}"  # another recipe: arms, journals and results of its own
    folder = RUNS / f"arms-{case}"
    results = folder / "results.json"
    state = json.loads(results.read_text()) if results.is_file() else {}
    config = search.SearchConfig(model=args.model, dataset=args.dataset,
                                 checkpoint=dense_checkpoint(args.model, args.dataset, args.checkpoint),
                                 admm_epochs=admm_epochs, retrain_epochs=retrain_epochs, trial_data=args.trial_data)
    cpu = machine()["processor"]
    with tempfile.TemporaryDirectory() as tmp:
        built = search.build(config, torch.device("cpu"), tmp, notify=print)
        holder = storage.open_study("control", f"journal:///{folder / 'control.journal'}", True)
        search.control(built, holder, wait=True)  # another arm's process may be training it
        control = holder.user_attrs[search.CONTROL]
        print(f"control (trial recipe, nothing pruned): {control['val']:.2f}% val", flush=True)
        studies = {}

        def adopt(study: optuna.Study, number: int, result: search.ExportResult) -> None:
            if found := adopted(built, study, number, result, state, studies):
                merged(results, state).setdefault("final", {})[found[0]] = found[1]
                save(results, state)
                print(*found, flush=True)

        for arm in args.arms:
            if arm in SEARCHES:
                studies[arm] = searched(built, arm, folder, compute_s, control, args.full_epochs,
                                        args.finalize or min(DROPS), adopt, arm in state.get(SPENT, {}))
                search.control(built, holder)  # each study set the arms' reference again: the same one
                if arm not in state.setdefault(SPENT, {}) and spent(studies[arm], folder) >= compute_s:
                    state[SPENT][arm] = spent(studies[arm], folder)
                    save(results, state)
                print(arm, f"{state[SPENT].get(arm, spent(studies[arm], folder)):.0f} s of training (at the "
                      f"fastest worker's pace) in {len(studies[arm].trials)} trials", flush=True)
                continue
            for rate in LADDER:
                if past_reach(state.setdefault(arm, {})):
                    break
                if str(rate) not in state[arm]:
                    raw = (admm_trained(built, uniform_plan(built, rate), None)[1] if arm == "uniform"
                           else fine_tuned(built, torch_pruned(built, rate), None)[1])
                    state[arm][str(rate)] = scored(built, raw, full=False)
                    save(results, state)
                    print(arm, rate, state[arm][str(rate)], flush=True)
            for rate, row in state[arm].items():  # every row, earlier sessions' too: by today's profile
                row["speed"] = predicted(built, ladder_plan(built, arm, float(rate)))
            save(results, state)
        if args.final:
            for drop in DROPS if args.picks else ():  # every arm's pick within 0.5 first: the goal's comparison soonest
                for arm in args.arms:
                    key = f"{arm} within {drop}"
                    within = [c for c in candidates(built, arm, state, studies) if c["drop"] <= drop]
                    if key in state.setdefault("final", {}) or not within:
                        continue
                    pick = max(within, key=lambda c: c["speed"])
                    resume = folder / f"final-{arm}-{drop}.resume.pt"
                    trained(results, state, key, resume, lambda: retrained(
                        built, arm, pick, studies, full, resume, args.train_threads, state))
            for pick in spread(built, state, studies, args.spread) if "study" in studies else ():
                resume = folder / f"final-study-front-{pick['trial']}.resume.pt"
                trained(results, state, f"study front {pick['label']}", resume,
                        lambda: retrained(built, "study", pick, studies, full, resume, args.train_threads, state))
            while args.finalize is not None:  # until no arm's bisection asks for a final nobody trains
                merged(results, state)
                ran = False
                for arm in args.arms:
                    _, pick, again = finalized(built, arm, state, studies, args.finalize)
                    if pick:
                        run = f"-r{again}" if again else ""
                        resume = folder / f"final-{arm}-front-{pick.get('trial', pick.get('rate'))}{run}.resume.pt"
                        ran |= trained(results, state, f"{arm} front {pick['label']}{run}", resume, lambda: retrained(
                            built, arm, pick, studies, full, resume, args.train_threads, state, again))
                if not ran:
                    break
        for key, row in state.get("final", {}).items():  # trained in this run or an earlier one (--no-time)
            if args.time and arm_of(key) in args.arms and not row.get("replicate") and (  # a replicate: its plan's
                    cpu not in row.setdefault("timed", {}) or args.retime):  # speed is its first run's
                row["timed"][cpu] = timed(built, arm_of(key), row["pick"], studies)
                save(results, state)
                print(key, row, flush=True)
    rows = [{"arm": key, "plan": r["pick"]["label"], "trial drop": round(r["pick"]["drop"], 2),
             "full val drop": round(r["drop"], 2), "± SE": round(r["se"], 2), "test drop": round(r["test drop"], 2),
             "timed on": on, **{k: round(v, 2) for k, v in speeds.items()}}
            for on in sorted({on for r in state.get("final", {}).values() for on in r.get("timed", {})})
            for key, r in state.get("final", {}).items() if (speeds := r.get("timed", {}).get(on))]
    if rows:
        compute = {arm: round(state.get(SPENT, {}).get(arm, spent(s, folder))) for arm, s in studies.items()}
        compute |= {arm: round(sum(r["seconds"] for r in state[arm].values())) for arm in args.arms if arm in state}
        summary = (f"{args.model} on {args.dataset} (dense {built.dense['val']:.2f}% val, {built.dense['test']:.2f}% "
                   f"test). Trials: {args.trial_epochs} epochs on {args.trial_data:g} of the training split; training "
                   f"seconds per arm (the searches' at the pace of the case's fastest worker): {compute}. Each "
                   "arm's fastest plan within 0.5 / 1.0 points (validation, trial fidelity) retrained at "
                   f"{args.full_epochs} epochs on the whole split, compacted, timed beside the dense model at batch "
                   f"{' and '.join(map(str, BATCHES))}, 1 thread (median ratio, interleaved "
                   "rounds), NCHW and (both models) channels-last, on each CPU a session ran on (`timed on`: "
                   "one CPU's rows are timed side by side, in one run)." + agreement(state)
                   + (finalize_text(built, state, studies, args.arms, args.finalize, cpu)
                      if args.finalize is not None else ""))
        print(record(f"arms-{case}", rows, summary))
        print(plot(built, state, studies, cpu, RESULTS / f"arms-{case}.png"))


def finalize_text(built: search.Search, state: dict, studies: dict[str, optuna.Study], arms: list[str],
                  limit: float, cpu: str) -> str:
    """Each arm's front bisected at the full budget (`--finalize`): the plan it ships, timed on `cpu`."""
    parts = []
    for arm in arms:
        best, probe, _ = finalized(built, arm, state, studies, limit)
        text = f"{arm}: none yet"
        if best:
            speeds = best.get("timed", {}).get(cpu)
            timing = (f"{speeds['speedup b1']:.2f}x / {speeds['speedup b8']:.2f}x at batch 1 / 8" if speeds
                      else "not timed on this CPU yet")
            runs = f", mean of {', '.join(f'{d:.2f}' for d in best['drops'])}" if len(best["drops"]) > 1 else ""
            text = (f"{arm}: {best['pick']['label']} ({best['drop']:.2f} ± {best['se']:.2f} retrained{runs}, "
                    f"{best['pick']['drop']:.2f} at trial fidelity; {timing})")
        parts.append(text + ("" if probe is None else f", not settled (next: {probe['label']})"))
    return (f" Finalized within {limit:g} retrained (each arm's front at trial fidelity bisected with full runs, "
            f"as `sparsesearch finalize` does; every final above counts): " + "; ".join(parts) + ".")


def agreement(state: dict) -> str:
    """How the retrained plans' drops at trial fidelity rank against their drops at the full budget
    (each plan once): the faithfulness of cheap trials on this network, over the arms' picks (all
    near the limits, where ranking is hardest) and the study's front beyond them (`spread`). Beside
    Spearman's rho, the pairs the full budget tells apart (drops further apart than twice their
    standard errors combined, as if independent: conservative, since all share the validation
    images): the order a trial can be asked to get right, where rho also counts the order of plans
    whose full-budget drops differ by less than their noise. And rho's ceiling on these plans: two
    full-budget runs that differ only by validation sampling (the measured drops, each redrawn from
    its standard error) would rank alike at about this median rho."""
    finals = state.get("final", {})  # a `twin` is its plan's final again; a replicate, it at another seed
    once = list({(arm_of(key), r["pick"]["label"]): r for key, r in finals.items()
                 if r.get("trained by") not in finals and not r.get("replicate")}.values())
    if len(once) < 4:
        return ""
    drops, errors = np.array([r["drop"] for r in once]), np.array([r["se"] for r in once])
    rho = spearmanr([r["pick"]["drop"] for r in once], drops).statistic
    rng = np.random.default_rng(0)
    ceiling = statistics.median(spearmanr(drops + rng.normal(0, errors), drops + rng.normal(0, errors)).statistic
                                for _ in range(1000))
    apart = [(a, b) for a, b in combinations(once, 2) if abs(a["drop"] - b["drop"]) > 2 * math.hypot(a["se"], b["se"])]
    alike = sum((a["pick"]["drop"] - b["pick"]["drop"]) * (a["drop"] - b["drop"]) > 0 for a, b in apart)
    front = sum(arm_of(key) == "study" and r["pick"]["label"] in state.get("spread", ()) for key, r in finals.items())
    return (f" Over the {len(once)} plans retrained ({front} of them more of the study's front, `--spread`), the "
            f"drops at trial fidelity and at the full budget rank alike at Spearman {rho:.2f}, where two full-budget "
            f"runs differing only by validation sampling would rank alike at about {ceiling:.2f} (median, simulated "
            f"from the standard errors); of the {len(apart)} pairs whose full-budget drops lie further apart than "
            f"twice their standard errors combined, {alike} are ordered alike at trial fidelity.")


def plot(built: search.Search, state: dict, studies: dict[str, optuna.Study], cpu: str, path: Path) -> Path:
    """Every arm's plans at trial fidelity (speedup predicted by this CPU's profile, validation accuracy)
    and each final pick at its batch-1 speedup measured on this CPU and full-budget accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, arm in enumerate((*SEARCHES, *LADDERS)):
        points = candidates(built, arm, state, studies) if arm in studies or arm in state else []
        color = f"C{i}"
        ax.scatter([c["speed"] for c in points], [percent(built.reference) - c["drop"] for c in points], s=14,
                   alpha=0.5, color=color, label=f"{arm} (trial fidelity, predicted speedup)")
        picks = [r for key, r in state.get("final", {}).items() if arm_of(key) == arm and cpu in r.get("timed", {})]
        ax.scatter([r["timed"][cpu]["speedup b1"] for r in picks], [r["val"] for r in picks], s=90, marker="*",
                   color=color, edgecolors="black", label=f"{arm}: retrained, measured (batch 1)" if picks else None)
    ax.axhline(built.dense["val"], color="black", lw=0.8, ls=":", label="dense model")
    ax.set_xlabel("speedup over the dense model (x)")
    ax.set_ylabel("validation accuracy (% top-1)")
    ax.set_ylim(built.dense["val"] - 6, built.dense["val"] + 1)
    ax.set_title(f"{built.config.model} on {built.config.dataset}: the search against uniform pruning, "
                 f"Torch-Pruning and random search ({cpu}, 1 thread)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
