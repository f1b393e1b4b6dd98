"""The Optuna study: which plan to try next, what it scores, when to stop.

Each trial draws a sparsity plan from `space.Space`, asks the latency model for its predicted
speedup, and skips training when `space.rejection` says the plan is not worth it. Otherwise it is
trained briefly: ADMM, hard prune, masked retraining. On its way it passes the rungs of a fidelity
ladder (`space.RUNGS`: 1/9 and 1/3 of its training), where the accuracy it would end with if
hard-pruned there is checked on the validation probe, and `space.LadderPruner` stops it unless it
ranks in the best third of the trials predicted at least as fast (successive halving among plans
that would dominate it), or when it trails every promising one of them by a margin.
Objectives: validation accuracy and predicted speedup, both maximised; constraint
(`Trial.set_constraint`): accuracy drop at most `trial_limit` points, paired image by image with
the study's control (`control`: the dense model trained with the trial recipe, nothing pruned), so
it is the pruning's cost, not the short recipe's. The trial limit is `max_acc_drop` until full runs
of the study's plans (`finalize`) show how much more a trial may lose and a full run still pass.
The first trials are uniform filter plans (30/50/70/90%) and the plans of a sensitivity scan.

All state lives in the study: its settings and dense baseline in the study's user attrs; each
trial's full per-layer plan, accuracies, prediction, ADMM curve and rungs in the trial's user attrs; the
trained weights of feasible and baseline trials as Optuna artifacts (for measuring the front).
The rungs go to the `rungs` user attr, where the pruner reads them (see `space`).
"""

from __future__ import annotations

import copy
import itertools
import math
import platform
import re
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Container, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy
import optuna
import torch
from optuna.trial import FixedTrial, FrozenTrial, TrialState
from torch import nn

from . import seeds
from .admm import CALIBRATION_IMAGES, RESUME, ADMMConfig, Iteration, Rung, resume_files, run_admm
from .compact import Measured, removable
from .data import Data
from .errors import Diverged, UserError, brief
from .files import sha256, torch_save, write_json
from .graph import Dependencies
from .layers import Layer
from .plan import LayerSparsity, Plan
from .profiler import LatencyModel, dense_latency, predict_latency
from .profiler.table import without_unpaid
from .report import FINALIZED, exported, margin_within, plan_runs
from .runtime import DEFAULT_LAYOUT, in_layout
from .space import (BASELINE_RATES, HOPELESS, MAX_RATE, RUNGS, TOP_RATE, LadderPruner, Slot, Space, promising,
                    rejection, snap)
from .sparsity import LAYER_LOCAL, SparsityType
from .storage import artifact_store, fail_stale, release_lease, renew_lease, take_lease, worker
from .train import Progress, ProgressFn, autocast, confidence_within, paired_drop, training_layout

SCHEMA = 1
STUDIES_DIR = Path("studies")
RUNG_GAP = 0.1  # `Search.ladder` adds a rung halfway where the limit's edge lies between rungs further apart
SEED_GAP = 0.05  # the same for the sensitivity seeds (`Search.seed_rates`): down to the grid's step
ADMM_ITERATIONS = 12  # Z/U updates per trial, however short its budget
PROBE_IMAGES = 1000  # validation images a trial is checked on at its rungs (a fixed stratified subset)
RHO_END = 3.0  # rho at the last iteration: it must reach O(1) for W to approach the sparse set
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
CONTROL = "control"  # the study attr holding the dense model trained with the trial recipe (`control`)
TRAINING_CONTROL = "training_control"  # the lease of the worker training the control
LEASE_RENEW_S = 60.0  # how often a lease's holder renews it while it works
CLAIM_POLL_S = 1.0  # how often a trial waiting for the budget looks at the study again


# --- settings -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    trials: int | None = None  # the study's size: finished trials, earlier runs included
    seconds: float | None = None  # this run's wall time

    def __str__(self) -> str:
        return f"{self.trials} trials" if self.trials is not None else f"{self.seconds / 60:g} min"


def parse_budget(text: str) -> Budget:
    """`20` (trials in the study), or a duration for this run: `90s`, `30m`, `2h`, `1h30m`."""
    text = text.strip().lower()
    if text.isdigit():
        return Budget(trials=int(text))
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text)
    if not text or parts is None or not any(parts.groups()):
        raise UserError(f"--budget '{text}' is neither a trial count (e.g. 20) nor a duration (e.g. 30m, 2h, 90s)")
    h, m, s = (float(g or 0) for g in parts.groups())
    return Budget(seconds=h * 3600 + m * 60 + s)


def parse_epochs(text: str, option: str = "--trial-epochs") -> tuple[float, float]:
    """`ADMM+RETRAIN` epochs, e.g. `1+2`; a single number is ADMM epochs with half as much retraining.
    `option` is the flag the text came from, for the error."""
    try:
        parts = [float(p) for p in text.split("+")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts.append(parts[0] / 2)
    if len(parts) != 2 or not all(math.isfinite(p) and p >= 0 for p in parts) or sum(parts) <= 0:
        raise UserError(f"{option} '{text}' must be ADMM+RETRAIN epochs, e.g. 1+2 (fractions allowed)")
    return parts[0], parts[1]


def epochs_text(admm_epochs: float, retrain_epochs: float) -> str:
    """`ADMM+RETRAIN` as `parse_epochs` reads it and a study keys its full runs by ("0+15")."""
    return f"{admm_epochs:g}+{retrain_epochs:g}"


@dataclass
class SearchConfig:
    """What a study searches and how each trial is scored; stored in the study, checked on resume."""

    model: str = "digits-cnn"
    dataset: str = "digits"
    checkpoint: str = ""
    types: tuple[str, ...] = tuple(t.value for t in SparsityType)
    max_acc_drop: float = 1.0  # points of validation accuracy vs the dense model
    # a trial prunes by magnitude at once and trains the slim network (`--trial-epochs 1+3`: ADMM first): on
    # vgg16-bn and resnet56 as accurate fully trained and cheaper (bench/results/recipes-*.md; README, *The recipe*)
    admm_epochs: float = 0.0
    retrain_epochs: float = 4.0
    batch_size: int = 1  # of the latency the speedups are predicted and measured at
    trial_data: float = 1.0  # fraction of the training split a trial trains on (fixed, stratified)
    image_size: int | None = None  # input side; None: the checkpoint's, else the dataset's
    seed: int = 0
    sampler: str = "tpe"  # or "random" (the benchmark's control)
    layout: str = DEFAULT_LAYOUT  # memory layout the networks are profiled, predicted and measured in
    precision: str = "float32"  # of every training step of its runs (trials, control, full runs): `train.autocast`
    full_epochs: str = ""  # ADMM+RETRAIN of its full runs (promoted, finalize, export); "": `full_epochs`' default
    # the memory layout all its runs train in, timed once on the dense network (`build`): timed per run on
    # each slim network, a verdict near the margin may differ between two runs of one plan (README,
    # *Training layout*); "": not chosen yet
    train_layout: str = ""

    @property
    def channels_last(self) -> bool:
        return self.layout == "channels-last"

    def admm(self, admm_epochs: float | None = None, retrain_epochs: float | None = None) -> ADMMConfig:
        """ADMM with ADMM_ITERATIONS Z/U updates whatever the budget, rho growing from 1e-2 to RHO_END."""
        epochs = self.admm_epochs if admm_epochs is None else admm_epochs
        n = max(ADMM_ITERATIONS, math.ceil(epochs / 0.25))
        rho0 = 1e-2
        return ADMMConfig(admm_epochs=epochs, admm_interval=max(epochs, 1e-9) / n, rho0=rho0,
                          rho_factor=(RHO_END / rho0) ** (1 / (n - 1)), rho_max=RHO_END,
                          retrain_epochs=self.retrain_epochs if retrain_epochs is None else retrain_epochs,
                          seed=self.seed, probe=PROBE_IMAGES, test=False, rungs=RUNGS, precision=self.precision,
                          layout=self.train_layout)

    def to_attrs(self) -> dict[str, Any]:
        return {**asdict(self), "types": list(self.types), "schema": SCHEMA}

    @classmethod
    def from_attrs(cls, raw: dict[str, Any]) -> SearchConfig:
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "types": tuple(known.get("types", cls.types))})


# --- the objective --------------------------------------------------------------------------------


@dataclass
class Trials:
    """A study's trained weights as models: the architecture, its input, the store the weights are
    in. All that measuring a study needs; no data, profile or training (`sparsesearch measure` on a
    bare target device)."""

    config: SearchConfig
    model: nn.Module  # dense, on the CPU
    input_shape: tuple[int, ...]
    device: torch.device
    artifacts: str  # where trained weights go: a folder every worker reaches, or s3://BUCKET

    def fresh_model(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def upload(self, trial: optuna.Trial, model: nn.Module) -> str:
        from optuna.artifacts import upload_artifact

        with tempfile.TemporaryDirectory(prefix="sparsesearch-") as tmp:
            path = Path(tmp) / f"trial-{trial.number}.pt"
            torch_save(path, {k: v.detach().cpu() for k, v in model.state_dict().items()})
            return upload_artifact(artifact_store=artifact_store(self.artifacts), file_path=str(path),
                                   study_or_trial=trial)

    def trained(self, trial: FrozenTrial) -> nn.Module:
        """The masked model a trial trained (promising and baseline trials keep their weights)."""
        from optuna.artifacts import download_artifact

        if "weights" not in trial.user_attrs:
            raise UserError(f"trial {trial.number} kept no weights (only baseline trials and those within the "
                            "study's trial limit do)")
        with tempfile.TemporaryDirectory(prefix="sparsesearch-") as tmp:
            path = Path(tmp) / "weights.pt"
            try:
                download_artifact(artifact_store=artifact_store(self.artifacts), file_path=str(path),
                                  artifact_id=trial.user_attrs["weights"])
            except Exception as e:  # noqa: BLE001 - each store raises its own kind of "not there"
                raise UserError(f"the weights of trial {trial.number} are not in {self.artifacts} ({brief(e)}); "
                                "pass --artifacts with the folder (or bucket) the workers wrote them to") from e
            state = torch.load(path, map_location="cpu", weights_only=True)
        model = self.fresh_model()
        model.load_state_dict(state)
        return model.eval()


@dataclass(kw_only=True)
class Search(Trials):
    """Everything a trial needs, built once: the dense model, its data, dependencies, latency model."""

    data: Data
    layers: list[Layer]
    deps: Dependencies
    latency: LatencyModel
    dense: dict[str, float] = field(default_factory=dict)  # val, test accuracy (%)
    dense_correct: torch.Tensor | None = None  # per validation image, whether the dense model is right
    reference: torch.Tensor | None = None  # per validation image: what a trial's drop is paired with (`control`)
    weights_sha256: str = ""  # of the dense checkpoint: a study resumed on other weights is refused
    dense_ms: float = 0.0  # measured by the profile: the reference of predicted speedups
    trial_budget: int | None = None  # trained trials the study may hold, counted across its workers
    steps: dict[str, int] = field(default_factory=dict)  # the channel widths counts are aligned to (`Space`)
    removable: list[str] = field(default_factory=list)  # slots a plan may remove whole (`Space`)

    def __post_init__(self) -> None:
        # trials train on a fixed stratified share of the training split; they validate on all of it
        self.trial_data = replace(self.data, train=self.data.train.subset(self.config.trial_data))
        self.dense_ms = self.latency.dense_ms(self.model, self.input_shape)
        self.layers_ms = dense_latency(self.latency, self.model, self.input_shape).layers_ms
        unprofiled = self.unprofiled
        if set(map(SparsityType, self.config.types)) <= unprofiled:
            raise UserError(f"the latency profile {self.latency.profile.path} has timed none of "
                            f"{', '.join(self.config.types)} on {self.config.model}; "
                            f"add them with `{self.profile_command}`")
        self.steps = {side: int(self.latency.profile.steps.get(side, 1)) for side in ("out", "in")}
        timed = self.latency.network(self.model, self.input_shape).get("grid", {}).get("rates", [])
        self.max_rate = TOP_RATE if TOP_RATE in timed else MAX_RATE  # the space's highest rate
        withheld = self._no_faster(self.layers_ms)
        if unprofiled:
            for layer in self.layers:
                withheld.setdefault(layer.name, set()).update(unprofiled)
        self.offer(withheld)

    def offer(self, withheld: dict[str, set[SparsityType]]) -> None:
        """Build the space with `withheld` kept from the layers: what this device's profile says for a
        new study, what the study recorded for a resumed one (its parameters' choices are fixed for
        its life: Optuna refuses a categorical whose choices changed, on another machine or profile)."""
        self.withheld = withheld
        self.space = Space(self.layers, self.deps.couplings, self.config.types, self.layers_ms, steps=self.steps,
                           withheld=withheld, removable=self.removable, max_rate=self.max_rate)

    def find_removable(self) -> list[str]:
        """The space's slots whose filters, all removed, leave a residual branch that `compact`
        replaces by a constant (a block dropped), or a layer collapsed to its identity path (a
        plain network's layer that keeps its input's shape, `compact.COLLAPSED`): tried on the
        dense model, the slots of one layer all at once (where each branch is a block of its own),
        else, like slots of several layers (whose removal usually silences a whole stream), one at a time."""
        slots = [s for s in self.space.slots if SparsityType.FILTER in s.types]
        found = set(removable(self.model, self.input_shape, self.deps, [tuple(s.layers) for s in slots]))
        return [s.name for s in slots if tuple(s.layers) in found]

    @property
    def profile_command(self) -> str:
        """The command that adds to this search's profile every type it searches, on its network."""
        c, fp = self.config, self.latency.profile.fingerprint
        return (f"sparsesearch profile --model {c.model} --dataset {c.dataset} --image-size {self.input_shape[-1]} "
                f"--types {','.join(c.types)} --batch-size {c.batch_size} --threads {fp.get('threads')} "
                f"{'--channels-last ' if c.channels_last else ''}--out {self.latency.profile.path}")

    @property
    def unprofiled(self) -> set[SparsityType]:
        """The searched types the profile never timed on this network (it was made with fewer
        `--types`): their latency would be the regressor's guess from other kernels' rows, so the
        space does not offer them."""
        grid = self.latency.network(self.model, self.input_shape).get("grid")
        timed = set(grid["types"]) if grid else {t.value for t in SparsityType}  # a profile from before the record
        return {SparsityType(t) for t in self.config.types if t not in timed}

    def _no_faster(self, dense_ms: dict[str, float]) -> dict[str, set[SparsityType]]:
        """Per layer, the layer-local types (shape, irregular, nm) that the latency model predicts no
        faster than the dense layer even at their highest rate, or that the profile found buying no
        time and timed at that rate only (`Profile.unpaid`): there they would cost accuracy and buy
        no time (a CSR kernel on a CPU, a 2:4 layer without its GPU kernel), so the space withholds them."""
        offered = {layer.name: layer.types
                   for layer in without_unpaid(self.model, self.layers, self.latency.profile.unpaid())}
        slow: dict[str, set[SparsityType]] = {}
        for kind in (k for k in LAYER_LOCAL if k.value in self.config.types):
            plan = Plan.uniform(self.layers, kind, snap(self.max_rate, kind, self.max_rate))
            if not plan.layers:
                continue
            pruned = predict_latency(self.latency, self.model, self.input_shape, plan).layers_ms
            for name in plan.layers:
                if kind not in offered[name] or pruned[name] >= dense_ms[name]:
                    slow.setdefault(name, set()).add(kind)
        return slow

    @property
    def foreign(self) -> list[str]:
        """How the profile's device differs from this one: not empty when the trials are scored for a
        target device elsewhere (`optimize --profile target.json`), whose speedups are measured there."""
        from .profiler.table import differences, fingerprint

        return differences(self.latency.profile.fingerprint,
                           fingerprint(self.device, self.config.batch_size, "float32", layout=self.config.layout))

    @property
    def baseline_kind(self) -> SparsityType:
        """The type of the uniform baselines: filter, or the first allowed type without it."""
        return SparsityType.FILTER if "filter" in self.config.types else SparsityType(self.config.types[0])

    def baselines(self, rates: Sequence[float] = BASELINE_RATES) -> list[tuple[str, dict[str, Any]]]:
        """Uniform plans tried first, at `rates` (see `ladder`)."""
        kind = self.baseline_kind
        return [(f"{kind.value}={r}", self.space.uniform_params(kind, snap(r, kind))) for r in rates]

    def ladder(self, study: optuna.Study) -> list[float]:
        """The uniform ladder's rates: 30/50/70/90%, and below them, while every baseline of it has
        finished beyond the `trial_limit`, half the lowest rate on the 0.05 grid (15%, 5%).
        Where short trials cost more accuracy than the constraint allows at 30% (resnet56 on 0.1 of
        Fashion-MNIST at 1+3 epochs: filter 30% loses 1.5 points), the study then still starts from
        feasible plans, uniform and seeded, instead of sampling blind around the infeasible ones.
        And at the limit's edge, where the front's fastest plans are, a rung halfway (`_edge_rungs`,
        RUNG_GAP): a uniform plan and seeded ones (resnet56 at a trial limit of 1.90: 30% within,
        50% beyond, so 40%; vgg16-bn at 5.68: 80%)."""
        kind = self.baseline_kind
        verdict = _verdicts(study, "baseline", trial_limit(study, self.config.max_acc_drop))
        rates = list(BASELINE_RATES)

        def judged() -> dict[float, bool]:
            return {rate: verdict[label] for (label, _), rate in zip(self.baselines(rates), rates) if label in verdict}

        while len(judged()) == len(rates) and not any(judged().values()):
            lower = snap(min(rates) / 2, kind)
            if not 0 < lower < min(rates):
                break
            rates.append(lower)
        return _edge_rungs(rates, lambda r: verdict.get(self.baselines([r])[0][0]), kind, RUNG_GAP)

    def seed_rates(self, study: optuna.Study, rates: Sequence[float]) -> list[float]:
        """The rates of the sensitivity scan's seeds: the ladder's (`rates`) and, at the edge of the
        seeds' own, rungs halfway down to the 0.05 grid (`_edge_rungs`, SEED_GAP). The seeds are the
        front's fastest plans, a family from one scan, so the fastest of them within the limit is
        worth finding as closely as the grid allows (resnet56, trials on 0.25 of Fashion-MNIST:
        its seed at 50% lost 2.15 in its trial and 0.03 retrained, 2.27x measured; the one at 60%
        2.95 and 0.77)."""
        verdict = _verdicts(study, "seeded", trial_limit(study, self.config.max_acc_drop))
        return _edge_rungs(list(rates), lambda r: verdict.get(_seed_labels(r)[0]), SparsityType.FILTER, SEED_GAP)

    def objective(self, trial: optuna.Trial) -> tuple[float, float]:
        trial.set_user_attr("worker", worker())
        fail_stale(trial.study, heartbeat=False)  # the journal's dead workers; Optuna fails heartbeat-stale ones
        if (twin := _earlier_twin(trial)) is not None:
            _reject_unjudged(trial, f"{_label(trial.user_attrs)} is trial {twin}'s")
        if _off_ladder(self, trial):
            _reject_unjudged(trial, f"{_label(trial.user_attrs)} is off the uniform ladder now: full runs raised "
                                    "the trial limit, and a higher rate is within it")
        plan = self.space.suggest(trial)
        layers = plan.to_dict()["layers"]
        trial.set_user_attr("plan", layers)
        if not plan.layers:
            trial.set_user_attr("rejected", "prunes no layer: it is the dense model")
            raise optuna.TrialPruned("prunes no layer")
        predicted = predict_latency(self.latency, self.model, self.input_shape, plan).total_ms
        speedup = self.dense_ms / predicted
        limit = trial_limit(trial.study, self.config.max_acc_drop)
        trial.set_user_attr("predicted_ms", predicted)
        trial.set_user_attr("predicted_speedup", speedup)
        trial.set_user_attr("trial_limit", limit)
        # A seed is trained even where a lighter trial missed the limit: short trials make heavy plans
        # look hopeless that full runs pass (vgg16-bn's norm seed at 0.9 lost 9.00 in a 0+4 trial, 0.02
        # retrained at 0+6), and `finalize` can only vouch for a plan that was trained.
        reason = rejection(layers, speedup, trial.study.get_trials(False, states=(TrialState.COMPLETE,)), limit,
                           hopeless="seeded" not in trial.user_attrs)
        if reason and "baseline" not in trial.user_attrs:
            trial.set_user_attr("rejected", reason)
            raise optuna.TrialPruned(reason)
        _claim(trial, self.trial_budget)
        model, curve, rungs, start = self.fresh_model(), [], [], time.perf_counter()

        def on_iteration(it: Iteration) -> None:
            curve.append({"rho": it.rho, "residual": it.residual, "val_acc": it.val_acc,
                          "projected_acc": it.projected_acc})
            trial.set_user_attr("admm", curve)

        def on_rung(rung: Rung) -> None:
            rungs.append({"step": rung.step, "of": rung.total, "phase": rung.phase, "acc": rung.acc})
            trial.set_user_attr("rungs", rungs)
            if "baseline" in trial.user_attrs:  # the reference every report compares with: never stopped
                return
            running = [t for t in trial.study.get_trials(False, states=(TrialState.RUNNING,)) if t.number == trial.number]
            if running and (why := _why_stop(trial.study, running[0])):
                trial.set_user_attr("pruned", f"stopped at {rung.step:,}/{rung.total:,} steps: {why}")
                trial.set_user_attr("train_seconds", time.perf_counter() - start)
                raise optuna.TrialPruned("stopped on the fidelity ladder")

        try:
            result = run_admm(model, self.trial_data, plan, self.config.admm(), self.device, self.deps, on_iteration,
                              on_rung=on_rung)
        except Diverged as e:  # a plan the optimizer cannot follow: hopeless, not the study's end
            trial.set_user_attr("pruned", str(e))
            raise optuna.TrialPruned("diverged") from e
        val = result.accuracy["final_val"]
        control(self, trial.study, wait=True)
        drop, se = paired_drop(self.dense_correct if self.reference is None else self.reference, result.val_correct)
        trial.set_constraint("accuracy_drop", drop - limit)
        feasible = drop <= self.config.max_acc_drop
        for key, value in {"val_acc": val, "acc_drop": drop, "acc_drop_se": se, "feasible": feasible,
                           "feasible_confidence": confidence_within(drop, se, self.config.max_acc_drop),
                           "train_seconds": result.seconds}.items():
            trial.set_user_attr(key, value)
        if drop <= limit or "baseline" in trial.user_attrs:  # promising: the front may hold it (`report.front`)
            trial.set_user_attr("weights", self.upload(trial, model))
        return val, speedup


REPLICATE_SEEDS = 1000  # between the seeds of a plan's replicated full runs: no run's epochs reuse another's
FULL_EPOCHS = (10.0, 5.0)  # a full run of a study whose trials run ADMM, on the whole training split


def full_epochs(config: SearchConfig, given: str | None = None) -> tuple[float, float]:
    """A full run's ADMM+RETRAIN epochs: `given` (`--epochs`), else the study's (`--full-epochs`), else
    FULL_EPOCHS in the recipe of the study's trials: a study whose trials prune at once (`0+N`, the
    default) retrains its plans so, for as many epochs (0+15). On vgg16-bn that recipe passed plans
    ADMM's did not, in a fraction of the time (bench/results/recipes-vgg16-bn-fashion-mnist.md)."""
    if given is not None:
        return parse_epochs(given, "--epochs")
    if config.full_epochs:
        return parse_epochs(config.full_epochs, "--full-epochs")
    return (0.0, sum(FULL_EPOCHS)) if config.admm_epochs == 0 else FULL_EPOCHS


FAITHFUL_SHARE = 0.05  # of a full run's training images, the least at which LeNet-5's trials ranked plans as it did
DEEP_FAITHFUL_SHARE = 0.15  # the same where plans may remove residual branches (`faithful_share`)


def calibrated_limit(runs: Sequence[tuple[float, float]], limit: float) -> float:
    """The drop at trial fidelity below which full runs say a plan comes within the limit, and at
    least `limit`. `runs` pairs a plan's drop at trial fidelity with its full run's margin: how far
    within the limit it came (negative: beyond). Walked up from the smallest trial drop, each run
    within raises the limit to its trial drop; the first run beyond ends the walk, the limit then
    where the line from the last run within (or from the control: nothing pruned, nothing lost at
    either fidelity) to it crosses the limit, drawn against log(1 + trial drop). The retrained drop
    grows with the trial's (Spearman 0.83 over ten resnet56 plans), but ever more slowly: resnet56's
    uniform 50%, 70% and 90% lost 2.10, 4.98 and 33.5 points in their trials, -0.23, 1.07 and 3.58
    retrained. A straight line from 50% to 90% crossed 0.5 at 8.1, a limit under which a study's
    sampler chased plans that lose 5-8 points in a trial; against log(1 + drop) it crosses at 3.9,
    where 60% (3.55) and a seed at 3.98 came within and 70% did not. Stopping at the last run
    within kept the search at plans a full run passes by far. No extrapolation past the largest run
    within."""
    found, last = limit, (0.0, limit)
    for trial_drop, margin in sorted(runs):
        if margin < 0:
            start, room = max(last[0], 0.0), last[1]
            if trial_drop > start:
                crossing = math.log1p(start) + room / (room - margin) * (math.log1p(trial_drop) - math.log1p(start))
                found = max(found, math.expm1(crossing))
            break
        found, last = max(found, trial_drop), (trial_drop, margin)
    return found


LIMIT_SPREAD = 0.35  # in log(1 + trial drop): how far the crossing may lie from where the runs put it


def limit_belief(runs: Sequence[tuple[float, float]], limit: float) -> statistics.NormalDist:
    """Where, in log(1 + trial drop), the study's full runs put the trial drop at which plans stop
    coming within the limit (`runs` as `calibrated_limit` takes them). With a run beyond, centred
    where `calibrated_limit`'s line crosses; with runs within only, at twice the largest trial drop
    among them, as a galloping search doubles its step (on resnet56 the crossing was 1.9x uniform
    50%'s 2.10: 3.9), or sooner where the line from the control through that run (the same model)
    crosses the limit sooner: resnet56's sensitivity seed at 0.5 lost 2.23 in its trial and 0.48
    retrained (limit 0.5), so the line crosses at 2.39, where doubling sought 4.46 and sent the next
    full run to the seed at 0.7 (6.1 in its trial) before the one at 0.6 (3.2). Before any run, at
    twice `limit` (a trial that lost no more than the limit retrains within it). Galloping from
    below, not from the cheapest plan: a first run beyond leaves only the line from the origin, far
    under the retrained drop, which stays flat for a while (resnet56 on 0.25 of the data: uniform
    70% lost 3.10 in its trial, 1.07 retrained, and put the limit at 0.94 where plans at 2.15 came
    within; the study spent its middle below it). Spread LIMIT_SPREAD, a factor 1.4 in (1 + trial
    drop): plans do not retrain in the order of their trial drops (resnet56: a plan at 4.20 in its
    trial came within, 0.28; one at 3.87 did not, 0.92; one at 2.37 neither, 0.57)."""
    found = calibrated_limit(runs, limit)
    if any(margin < 0 for _, margin in runs):
        return statistics.NormalDist(math.log1p(found), LIMIT_SPREAD)
    centre = math.log1p(2 * found)
    if runs:
        drop, margin = max(runs)
        if 0 < margin < limit:  # it lost `limit - margin` retrained: scaled up to `limit` along the line
            centre = min(centre, math.log1p(drop) * limit / (limit - margin))
    return statistics.NormalDist(centre, LIMIT_SPREAD)


def full_runs(rows: Sequence[dict[str, Any]], limit: float, epochs: str,
              confidence: float = 0.5) -> list[tuple[float, float]]:
    """Of a study's full runs (`report.exported` rows), those at `epochs`, any plan's, as (its drop at
    trial fidelity, the margin within `limit` its retrained drop came at `confidence`; the mean of a
    plan's replicates, `report.plan_runs`): what `calibrated_limit` and `limit_belief` read."""
    return [(r["acc_drop"], margin_within(r, limit, confidence)) for r in plan_runs(rows, epochs).values()
            if r.get("acc_drop") is not None and math.isfinite(r["acc_drop"])]


def trial_limit(study: optuna.Study, limit: float) -> float:
    """The drop a trial may show and still be promising: `limit` scaled by the study's full runs.
    A trial trains briefly, so it overstates what a plan costs, by a factor that depends on the
    network and data: resnet56 on Fashion-MNIST lost 1.90 points in a trial and 0.38 fully trained
    (7.57 and 1.70 for a heavier plan), vgg16-bn 5.68 and 0.32 (bench/results/arms-*.md). Judged at
    the user's limit, the search steered away from plans a full run passes, and its front stopped
    short of them. The full runs are `finalize`'s (its record's epochs, judged at its confidence);
    without one, the exports at the largest budget any used; before any, trials are judged at the
    user's limit. A longer export of one plan (to ship it) leaves finalize's evidence as it was."""
    rows = [r for r in exported(study) if r.get("acc_drop") is not None and math.isfinite(r["acc_drop"])]
    if not rows:
        return limit
    done = study.user_attrs.get(FINALIZED) or {}
    epochs = done.get("epochs") or max(rows, key=lambda r: (sum(parse_epochs(r["epochs"])), r["epochs"]))["epochs"]
    return calibrated_limit(full_runs(rows, limit, epochs, done.get("confidence", 0.5)), limit)


def trial_share(config: SearchConfig, full: tuple[float, float] | None = None) -> float:
    """A trial's training images as a share of a full run's (`full` epochs on the whole split; by
    default the study's own, `full_epochs`): what sets how faithfully trials rank plans
    (bench/results/faithfulness-lenet5-fashion-mnist.md: at 2.7% Spearman 0.56 against full
    training, at 5.3-8% 0.92-0.97, whether the share came from more data or more epochs)."""
    return config.trial_data * (config.admm_epochs + config.retrain_epochs) / sum(full or full_epochs(config))


def faithful_share(search: Search) -> float:
    """The least share of a full run's training at which the study's trials rank plans as full runs
    do: more where its space may remove residual branches, since a plan that drops blocks recovers
    later in training than one that thins them. On resnet56 / Fashion-MNIST, one that removed 6 of
    each stage's 9 blocks (filters at 50%) ranked 6th of 10 plans at 6.7% (0+4 epochs on 0.1 of the
    split, full runs 0+6) and 4th at 16.7% (on 0.25), where full runs put it 3rd; Spearman over the
    10, 0.73 and 0.85 (bench/results/optimize-resnet56-fashion-mnist-100m-v3/README.md). A study on
    0.25 then shipped a plan of that family (bench/results/optimize-resnet56-fashion-mnist-110m-v4/)."""
    return DEEP_FAITHFUL_SHARE if search.space.removable else FAITHFUL_SHARE


def faithful_config(config: SearchConfig, share: float) -> SearchConfig:
    """`config` with the trial data share raised (to the 0.05 above) so that its trials train `share`
    of a full run; where the whole split is not enough, the trial epochs too (in their ADMM:retraining
    proportion, rounded up to half epochs); as it is where they already do."""
    if trial_share(config) >= share:
        return config
    data = min(math.ceil(20 * config.trial_data * share / trial_share(config) - 1e-9) / 20, 1.0)
    scale = share / trial_share(replace(config, trial_data=data))
    if scale <= 1:
        return replace(config, trial_data=data)
    return replace(config, trial_data=data, admm_epochs=math.ceil(2 * config.admm_epochs * scale) / 2,
                   retrain_epochs=math.ceil(2 * config.retrain_epochs * scale) / 2)


@dataclass(frozen=True)
class TrialCost:
    """What one trial costs: its work, and the time that work takes on this device."""

    steps: int  # training steps, ADMM and retraining
    images: int  # images evaluated: validation, and training images BatchNorm is re-estimated on
    seconds: float  # at most: timed on the dense network, where retraining runs on the slim one

    def __str__(self) -> str:
        return f"{self.steps:,} training steps + {self.images:,} images evaluated ≤ {duration(self.seconds)}"


def trial_cost(search: Search, timed_steps: int = 5) -> TrialCost:
    """One trial's steps and evaluations, timed on `timed_steps` training steps and one evaluation
    batch of a copy of the dense model (after a warm-up step): a bound before any trial ran, since
    retraining runs on the plan's slim model (`compact.slimmed`), faster the more it removes."""
    return run_cost(search, search.config.admm(), search.trial_data, timed_steps)


def full_run_cost(search: Search, admm_epochs: float, retrain_epochs: float) -> TrialCost:
    """What one `export_trial` run costs: the whole training split, no rungs, tested."""
    return run_cost(search, replace(search.config.admm(admm_epochs, retrain_epochs), test=True, rungs=()), search.data)


def run_cost(search: Search, config: ADMMConfig, data: Data, timed_steps: int = 5) -> TrialCost:
    """A run's steps and evaluations under `config` on `data`, timed as `trial_cost` says."""
    steps = config.steps(len(data.train))
    checks = set(config.rung_steps(len(data.train)))  # at most: rungs in one ADMM iteration share a check
    projections = sum(step <= config.admm_steps(len(data.train)) for step in checks)  # BatchNorm re-estimated first
    images = (len(checks) * min(config.probe or len(data.val), len(data.val)) + len(data.val)
              + projections * min(CALIBRATION_IMAGES, len(data.train))
              + 3 * len(data.test) * config.test)  # dense, hard-pruned and final test accuracy
    model = search.fresh_model().to(search.device).train()
    layout = config.layout or training_layout(model, *next(data.train.batches(config.batch_size)), search.device,
                                              config.precision)  # as `fit` trains
    in_layout(model, layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    generator = torch.Generator().manual_seed(0)
    batches = itertools.chain.from_iterable(data.train.batches(config.batch_size, True, generator, data.info.augment)
                                            for _ in itertools.count())  # a tiny subset: round again
    for i, (x, y) in zip(range(timed_steps + 1), batches):
        if i == 1:
            start = time.perf_counter()  # after one warm-up step
        optimizer.zero_grad()
        with autocast(search.device, config.precision):
            loss = nn.functional.cross_entropy(model(in_layout(x.to(search.device), layout)), y.to(search.device))
        loss.backward()
        optimizer.step()
    per_step = (time.perf_counter() - start) / timed_steps
    x, _ = next(data.val.batches(256))
    start = time.perf_counter()
    with torch.inference_mode():
        model.eval()(x.to(search.device))
    per_image = (time.perf_counter() - start) / len(x)
    return TrialCost(steps, images, steps * per_step + images * per_image)


def duration(seconds: float) -> str:
    """Seconds as people read a duration: 45 s, 12 min, 3.5 h."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _why_stop(study: optuna.Study, trial: FrozenTrial) -> str:
    """Why the study's pruner stops `trial` now ("" to go on); any other Optuna pruner says only yes."""
    pruner = study.pruner
    if isinstance(pruner, LadderPruner):
        return pruner.why(study, trial)
    return "stopped by the study's pruner" if pruner.prune(study, trial) else ""


# --- studies --------------------------------------------------------------------------------------


def load_config(study: optuna.Study) -> SearchConfig:
    if "config" not in study.user_attrs:
        raise UserError(f"study '{study.study_name}' was not created by `sparsesearch optimize`")
    return SearchConfig.from_attrs(study.user_attrs["config"])


def reconcile(study: optuna.Study, given: dict[str, Any], defaults: SearchConfig) -> SearchConfig:
    """The config of a new study (defaults + `given`), or a resumed one's stored config; a given
    option that contradicts the stored one is refused, since the trials would not compare."""
    if "config" not in study.user_attrs:
        return SearchConfig(**{**asdict(defaults), **{k: v for k, v in given.items() if v is not None}})
    stored = load_config(study)
    for key, value in given.items():
        if value is not None and getattr(stored, key) != value:
            raise UserError(f"study '{study.study_name}' was run with {key} = {getattr(stored, key)!r}, not "
                            f"{value!r}; drop that option to resume it, or start another with --study NEW")
    return stored


CONSTRAINT = "constraints:accuracy_drop"  # where Optuna keeps a trial's `set_constraint("accuracy_drop", ...)`


class AtTrialLimit:
    """A study as its sampler sees it: every trial's accuracy constraint taken anew at `limit`, and
    every trial within it as accurate as the limit's edge.
    Optuna keeps the constraint a trial set when it finished; once full runs raise the study's
    `trial_limit`, the trials judged before would stay infeasible to TPE, which would keep
    sampling away from the plans the full runs passed (the rules and new trials already use the
    raised limit). And within the limit accuracy buys the user nothing, while multi-objective TPE
    spreads its draws over the whole front: at a trial limit of 2.10 on resnet56, 32 of its 35
    trials came within it, losing 0.03-1.97 points (median 0.68) at 1.21-1.80x predicted, where
    random search had found 1.83x at 2.65 (bench/results/optimize-resnet56-fashion-mnist-2h/).
    Seen as equal there, feasible plans rank by speed alone (bench/results/sampler_toy.md). The
    study, its front and its report keep the trials' own accuracies. Everything else is the study's."""

    def __init__(self, study: optuna.Study, limit: float) -> None:
        self._study, self._limit = study, limit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        return [self._judged(t) for t in self._study._get_trials(deepcopy, states, use_cache)]

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy, states)

    def _judged(self, trial: FrozenTrial) -> FrozenTrial:
        drop = trial.user_attrs.get("acc_drop")
        if CONSTRAINT not in trial.system_attrs or drop is None:
            return trial
        judged = copy.copy(trial)
        judged.system_attrs = {**trial.system_attrs, CONSTRAINT: drop - self._limit}
        if trial.values is not None:  # the drop is paired on the same images: accuracy + drop = the reference's
            judged.values = [min(trial.values[0], trial.values[0] + drop - self._limit), *trial.values[1:]]
        return judged


class TrialLimitTPE(optuna.samplers.TPESampler):
    """TPE that judges the study's trials at its `trial_limit` now (`AtTrialLimit`)."""

    def __init__(self, max_acc_drop: float, **options: Any) -> None:
        super().__init__(**options)
        self.max_acc_drop = max_acc_drop

    def _seen(self, study: optuna.Study) -> AtTrialLimit:
        return AtTrialLimit(study, trial_limit(study, self.max_acc_drop))

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return super().sample_relative(self._seen(study), trial, search_space)  # type: ignore[arg-type]

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any) -> Any:
        return super().sample_independent(self._seen(study), trial, param_name,  # type: ignore[arg-type]
                                          param_distribution)


def make_sampler(config: SearchConfig, finished: int) -> optuna.samplers.BaseSampler:
    """TPE (multi-objective, constraint-aware at the study's trial limit), seeded by the study's size
    so a resumed run draws anew."""
    seed = config.seed + finished
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return TrialLimitTPE(config.max_acc_drop, seed=seed, multivariate=True, n_startup_trials=8)


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=FINISHED)


def _claim(trial: optuna.Trial, budget: int | None) -> None:
    """Return when `trial` may train without the study exceeding `budget` trained trials, counting
    the trials other workers are training and the retries of killed ones waiting to run. Each trial
    states its claim, then counts the finished trials and the earlier claims (by claim time, then
    number): of two claims made at once exactly one sees the other first, so workers on one study
    train `budget` trials, not one more each. While the claims fill the budget it waits: the claims
    may end in a trial killed with its worker, and a worker that stopped then left the killed plan
    unretried and the budget short. Rejects `trial` (unjudged) once the trained trials fill the
    budget, stopping the study, or when a retry waits and `trial` is not one, so it runs next."""
    if budget is None:
        return
    mine = (time.time(), trial.number)
    trial.set_user_attr("claimed", mine[0])
    while True:
        trials = trial.study.get_trials(deepcopy=False)
        retry = "failed_trial" in trials[trial.number].system_attrs
        trained = sum(t.state in FINISHED and "rejected" not in t.user_attrs for t in trials)
        if trained >= budget:
            trial.study.stop()
            _reject_unjudged(trial, f"the study's budget of {budget} trials is taken")
        earlier = sum(t.state == TrialState.RUNNING and "claimed" in t.user_attrs
                      and (t.user_attrs["claimed"], t.number) < mine for t in trials)
        retries = [t.number for t in trials if t.state == TrialState.WAITING and "failed_trial" in t.system_attrs]
        if trained + earlier + len(retries) < budget:
            return
        if retries and not retry:
            _reject_unjudged(trial, f"trial {retries[0]} retries a killed trial's plan and runs first")
        time.sleep(CLAIM_POLL_S)
        fail_stale(trial.study)


def _reject_unjudged(trial: optuna.Trial, reason: str) -> None:
    """Reject `trial` without judging its plan, so an enqueued plan is enqueued again (`_held`)."""
    trial.set_user_attr("rejected", reason)
    trial.set_user_attr("judged", False)
    raise optuna.TrialPruned(reason)


def _held(study: optuna.Study, key: str) -> set[Any]:
    """The `key` labels (baseline, seeded) of trials that run, ran or wait, or whose plan was judged
    and rejected (dominated, slower than dense): neither failed nor rejected unjudged (as a copy, or
    past the budget). A label not held is enqueued again. (A seed rejected again on every enqueue
    was once enqueued after every trial, 500 times in a row, and the run stopped 9 minutes into its
    85.) A seed that an earlier version rejected as hopeless is not held: seeds are now trained there
    (`Search.objective`), so it is enqueued once more and trained."""
    return {t.user_attrs.get(key) for t in study.get_trials(deepcopy=False)
            if t.state != TrialState.FAIL and t.user_attrs.get("judged", True)
            and not (key == "seeded" and t.user_attrs.get("rejected", "").startswith(HOPELESS))}


def sensitivity(search: Search, study: optuna.Study,
                on_progress: Callable[[int, int, str], None] | None = None) -> seeds.Scan:
    """The dense model's sensitivity scan, run once per study and kept in it (again for a study
    whose scan was of other units: before, a per-stage space was scanned per stage). It sets the
    space's `robustness`, so it comes before any trial is drawn or enqueued (`run` sees to it)."""
    found = seeds.Scan.from_attrs(study.user_attrs["sensitivity"]) if "sensitivity" in study.user_attrs else None
    if found is None or set(found.drop) != {s.name for s in search.space.slots} or set(found.removed) != {
            s.name for slots in search.space.removable.values() for s in slots}:
        found = seeds.scan(search.space, search.fresh_model(), search.deps, search.data.val.sized(PROBE_IMAGES),
                           search.device, search.data.train.sized(CALIBRATION_IMAGES), on_progress=on_progress)
        study.set_user_attr("sensitivity", found.to_attrs())
    if not search.space.per_layer:
        search.space.robustness = seeds.robustness(found)
    search.space.removal_drop = found.removed
    return found


def _enqueue_ladder(search: Search, study: optuna.Study) -> None:
    """Enqueue, at each rate of the ladder (`Search.ladder`), the uniform baseline and the seeded
    plan that no trial holds: new, or every trial of it failed (its workers killed twice: a retried
    trial is not retried again). The report compares the search with the baselines, so they are
    never dropped; copies enqueued by workers starting together are rejected at no cost. The seeds
    come from the dense model's sensitivity scan (`sensitivity`, also at the rungs of its own edge:
    `Search.seed_rates`) and, after them, from its weights' norms (`seeds.norm_params`, removing the
    rate's share of all filters), unless that is a uniform plan of the ladder (resnet56's stages,
    each at its slots' mean rate, come out uniform)."""
    found = sensitivity(search, study)
    rates = search.ladder(study)
    held = _held(study, "baseline")
    baselines = search.baselines(rates)
    for label, params in baselines:
        if label not in held:
            study.enqueue_trial(params, user_attrs={"baseline": label})
    held = _held(study, "seeded")
    for rate in search.seed_rates(study, rates):
        if (label := _seed_labels(rate)[0]) not in held:
            study.enqueue_trial(seeds.seeded_params(search.space, found, rate), user_attrs={"seeded": label})
    uniform = [search.space.suggest(FixedTrial(params)) for _, params in baselines]
    for rate in rates:
        params = seeds.norm_params(search.space, search.model, rate)
        label = _seed_labels(rate)[1]
        if label not in held and search.space.suggest(FixedTrial(params)) not in uniform:
            study.enqueue_trial(params, user_attrs={"seeded": label})


def _verdicts(study: optuna.Study, key: str, limit: float) -> dict[str, bool]:
    """Per `key` label (baseline, seeded) of the study's finished, trained trials: whether it is
    `promising` at `limit`."""
    return {t.user_attrs[key]: bool(promising(t, limit)) for t in finished_trials(study)
            if key in t.user_attrs and "rejected" not in t.user_attrs}


def _edge_rungs(rates: list[float], verdict: Callable[[float], bool | None], kind: SparsityType,
                gap: float) -> list[float]:
    """`rates` and, while the fastest rate judged within the limit (`verdict`: None before it is
    judged) and the next one judged beyond lie more than `gap` apart, the rate halfway between them
    on `kind`'s grid: a bisection of the family's rates at the limit's edge, one rung per verdict."""
    rates = list(rates)
    while True:
        judged = {r: ok for r in rates if (ok := verdict(r)) is not None}
        within = [r for r, ok in judged.items() if ok]
        beyond = [r for r, ok in judged.items() if within and not ok and r > max(within)]
        if not beyond:
            return rates
        lo, hi = max(within), min(beyond)
        if hi - lo <= gap + 1e-9 or snap((lo + hi) / 2, kind) in rates:
            return rates
        rates.append(snap((lo + hi) / 2, kind))


def _seed_labels(rate: float) -> tuple[str, str]:
    """The labels of the ladder's seeds at `rate`: the sensitivity scan's, the weight norms'."""
    return f"sensitivity at mean rate {rate}", f"weight norms at rate {rate}"


def _off_ladder(search: Search, trial: optuna.Trial) -> bool:
    """Whether `trial` is an enqueued ladder plan the ladder no longer asks for: a rung it added
    below a limit every baseline missed, still waiting when a full run raised the limit past a
    higher rate (resnet56: filter 15% and its seeds, 7 of a 2-hour study's 120 minutes after a full
    run had put 30% and 50% within). The first rates (`baselines()`) stay: the report compares with them."""
    if not {"baseline", "seeded"} & set(trial.user_attrs):
        return False
    rates = search.ladder(trial.study)
    asked = ({label for label, _ in search.baselines(rates)} | {_seed_labels(r)[1] for r in rates}
             | {_seed_labels(r)[0] for r in search.seed_rates(trial.study, rates)})
    return (trial.user_attrs.get("baseline") or trial.user_attrs.get("seeded")) not in asked


def control(search: Search, study: optuna.Study, on_progress: ProgressFn | None = None, wait: bool = False) -> None:
    """Judge the study's trials against its control: the dense model trained with the trial recipe,
    nothing pruned (same data share, steps and seeds), trained once and kept in the study. A short
    trial costs the unpruned model accuracy too (resnet56 on 0.1 of Fashion-MNIST at 1+3 epochs:
    0.62 points), so judged against the dense model every 30% plan missed a 1-point limit that its
    pruning alone met (uniform filter 30%: 0.65 below the control). Paired image by image and in
    the training noise, the drop is what the pruning costs. A study whose trials were judged
    against the dense model before it had a control keeps judging so. Of workers starting together
    one trains it (a lease); the others train trials meanwhile and, to judge one, `wait` for it, or
    train it if its worker died."""
    search.reference = None
    while (found := study.user_attrs.get(CONTROL)) is None:
        if TRAINING_CONTROL not in study.user_attrs and trained_trials(study):
            return
        if take_lease(study, TRAINING_CONTROL) is None:
            found = _train_control(search, study, on_progress)
        elif not wait:
            return
        else:
            time.sleep(CLAIM_POLL_S)
    search.reference = _unbits(found["correct"], len(search.data.val))


def _train_control(search: Search, study: optuna.Study, on_progress: ProgressFn | None) -> dict[str, Any]:
    """Train the control under the lease, renewed as it goes so that waiting workers know it alive."""
    renewed = time.time()

    def beat(progress: Progress) -> None:
        nonlocal renewed
        if time.time() - renewed > LEASE_RENEW_S:
            renew_lease(study, TRAINING_CONTROL)
            renewed = time.time()
        if on_progress is not None:
            on_progress(progress)

    config = replace(search.config.admm(), rungs=())
    try:  # released however it ends: after a Ctrl-C the next worker need not wait for the lease to lapse
        result = run_admm(search.fresh_model(), search.trial_data, Plan({}), config, search.device, search.deps,
                          on_progress=beat)
        if CONTROL not in study.user_attrs:  # a worker that took the lease over from a silent one may be second
            study.set_user_attr(CONTROL, {"val": result.accuracy["final_val"], "seconds": result.seconds,
                                          "correct": _bits(result.val_correct)})
    finally:
        release_lease(study, TRAINING_CONTROL)
    return study.user_attrs[CONTROL]


def _bits(right: torch.Tensor) -> str:
    """A per-image right/wrong vector as hex (a study attr is JSON: 5,000 images in 1,250 characters)."""
    return bytes(numpy.packbits(right.cpu().numpy().astype(bool))).hex()


def _unbits(text: str, n: int) -> torch.Tensor:
    return torch.from_numpy(numpy.unpackbits(numpy.frombuffer(bytes.fromhex(text), dtype=numpy.uint8))[:n].astype(bool))


def _label(attrs: dict[str, Any]) -> str:
    return f"baseline {attrs['baseline']}" if "baseline" in attrs else f"seed '{attrs.get('seeded')}'"


def _earlier_twin(trial: optuna.Trial) -> int | None:
    """The number of an earlier copy of the same enqueued plan (a uniform baseline or a seed) that
    runs or ran: neither failed nor itself rejected as a copy. Workers starting together may each
    enqueue them; the lowest-numbered copy runs, the others are rejected at no cost, so each is
    trained once whatever the storage. A killed copy's retry then counts a rejected twin for nothing:
    otherwise it would be rejected, enqueued anew, rejected again, without end."""
    key = next((k for k in ("baseline", "seeded") if k in trial.user_attrs), None)
    if key is None:
        return None
    return next((t.number for t in trial.study.get_trials(deepcopy=False)
                 if t.number < trial.number and t.user_attrs.get(key) == trial.user_attrs[key]
                 and t.state != TrialState.FAIL and "rejected" not in t.user_attrs), None)


def trained_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Finished trials that trained (rejected candidates cost ~0.1 s and do not count against the budget)."""
    return [t for t in finished_trials(study) if "rejected" not in t.user_attrs]


@dataclass
class RunResult:
    trained: int  # in this run
    rejected: int
    stopped: str  # "budget", "time", "asked", "rejections"
    promoted: int = 0  # full runs between its trials


class Promotion(Protocol):
    """Full runs between a study's trials (`finalize.Promotion`): `run` asks after each trial."""

    def due(self, study: optuna.Study, total_s: float, left_s: float) -> bool:
        """Whether to run one now, in a run of `total_s` seconds (budgeted or forecast), `left_s` left."""

    def __call__(self, study: optuna.Study) -> object:
        """Run one."""


def run(search: Search, study: optuna.Study, budget: Budget,
        on_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None,
        should_stop: Callable[[], bool] | None = None, baselines: bool = True,
        max_rejections: int | None = None, started: float | None = None,
        promote: Promotion | None = None) -> RunResult:
    """Run trials until the study holds `budget.trials` trained ones (rejected candidates are free)
    or `budget.seconds` pass, or `should_stop()` says so after a trial or full run, or `max_rejections`
    (default 50 per trial of budget, at least 500) candidates in a row were rejected. Enqueues the
    uniform baselines the study lacks and the plans of its sensitivity scan (`seeds`; the scan runs
    once per study, inside a duration budget), unless `baselines` is false (the benchmark's random
    search: the scan still runs, the space's `lean` needs it, but nothing is enqueued). Between
    trials, `promote` runs full runs when it says they are due: inside a duration budget, on top of
    a count of trials (its share then of the run they are forecast to make).
    A duration counts from `started` (`time.monotonic()`; default now): work done first is inside it."""
    start = time.monotonic() if started is None else started
    control(search, study)
    if baselines:
        _enqueue_ladder(search, study)
    else:
        sensitivity(search, study)
    search.trial_budget = budget.trials
    result = RunResult(0, 0, "time")
    if budget.trials is not None and len(trained_trials(study)) >= budget.trials:
        result.stopped = "budget"
        return result
    limit = max_rejections or max(500, 50 * (budget.trials or 0))
    in_a_row, promoting = 0, False

    def horizon(study_: optuna.Study) -> tuple[float, float]:
        """(the run's length, seconds left): budgeted; else the trials left at the study's pace, or
        (no budget) the time so far."""
        elapsed = time.monotonic() - start
        if budget.seconds is not None:
            return budget.seconds, budget.seconds - elapsed
        more = max((budget.trials or 0) - len(trained_trials(study_)), 0)
        return elapsed + more * (seconds_per_trial(study_) or 0.0), math.inf

    def after(study_: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal in_a_row, promoting
        rejected = "rejected" in trial.user_attrs
        result.rejected += rejected
        result.trained += not rejected
        in_a_row = in_a_row + 1 if rejected else 0
        if on_trial is not None:
            on_trial(study_, trial)
        if baselines:  # the ladder goes on down, and a baseline whose retry died too (another worker's,
            _enqueue_ladder(search, study_)  # failed as stale) comes back
        if budget.trials is not None and len(trained_trials(study_)) >= budget.trials:
            result.stopped = "budget"
        elif should_stop is not None and should_stop():
            result.stopped = "asked"
        elif in_a_row >= limit:
            result.stopped = "rejections"
        elif not rejected and promote is not None and promote.due(study_, *horizon(study_)):
            promoting = True
        else:
            return
        study_.stop()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        while True:
            timeout = None if budget.seconds is None else max(budget.seconds - (time.monotonic() - start), 0)
            promoting = False
            study.optimize(search.objective, timeout=timeout, callbacks=[after], gc_after_trial=False)
            if not promoting:
                return result
            promote(study)  # type: ignore[misc]  # promoting is only set with a promotion
            result.promoted += 1
            if should_stop is not None and should_stop():
                result.stopped = "asked"
                return result


def seconds_per_trial(study: optuna.Study) -> float | None:
    """The mean training time of the study's trained trials, those stopped on the ladder included:
    what a trial really costs here on average, so what a budget buys."""
    times = [t.user_attrs["train_seconds"] for t in trained_trials(study) if "train_seconds" in t.user_attrs]
    return sum(times) / len(times) if times else None


def best_promising_speedup(study: optuna.Study, limit: float) -> float | None:
    """The fastest predicted speedup among trials within `limit` points (the trial limit): what the
    search has found so far, as the study judges its trials."""
    values = [t.values[1] for t in study.get_trials(False, states=(TrialState.COMPLETE,)) if promising(t, limit)]
    return max(values) if values else None


# --- setting a search up --------------------------------------------------------------------------


def build(config: SearchConfig, device: torch.device, artifacts: str, data_dir: Path | None = None,
          profile: Path | None = None, allow_foreign: bool = False,
          notify: Callable[[str], None] | None = None,
          on_progress: Callable[[str, int, int, str], None] | None = None) -> Search:
    """Load (or first train) the dense checkpoint and (or first measure) the latency profile of this
    device; `notify` hears what is done first, `on_progress(phase, done, total, status)` how it goes."""
    from . import data as datasets
    from .graph import dependencies
    from .layers import trace
    from .profiler import latency_model_for
    from .profiler.measure import Target, profile_model
    from .profiler.table import find_profile, fingerprint, model_key, profiles_dir
    from .train import TrainConfig, correct, evaluate, percent, prepare, train_dense

    say = notify or (lambda _text: None)
    artifact_store(artifacts, check=True)  # before any training: a worker that cannot keep weights is useless
    weights = dense_weights(config)
    if not weights.is_file():
        if config.checkpoint:
            raise UserError(f"checkpoint not found: {weights}; train one with `sparsesearch train` or fix --checkpoint")
        epochs = datasets.info(config.dataset).epochs
        say(f"no dense checkpoint at {weights}: training {config.model} on {config.dataset} first ({epochs} epochs)")
        train_dense(config.model, config.dataset, TrainConfig(epochs=epochs, seed=config.seed), device, weights,
                    data_dir, image_size=config.image_size,
                    on_progress=on_progress and (lambda p: on_progress("train", p.step, p.total, "")))
    model, data = prepare(config.model, config.dataset, data_dir, image_size=config.image_size, weights=weights,
                          seed=config.seed)
    config = replace(config, image_size=data.size)  # the study records the side it searched at
    if not config.train_layout:  # a new study's; a resumed one's config brings the layout it began with
        batch = next(data.train.batches(config.admm().batch_size))
        config = replace(config, train_layout=training_layout(model, *batch, device, config.precision))
    model.eval()
    shape = data.input_shape
    if profile is None and find_profile(fingerprint(device, config.batch_size, "float32", layout=config.layout),
                                        network=model_key(model, shape)) is None:
        say(f"no latency profile of {config.model} for this device under {profiles_dir()}/: profiling it first "
            f"(batch {config.batch_size}, {torch.get_num_threads()} threads, {config.layout}; done once)")
        profile_model(Target(config.model, copy.deepcopy(model), shape), device, config.batch_size,
                      on_progress=on_progress and (lambda d, t, s: on_progress("profile", d, t, s)),
                      layout=config.layout)
    latency = latency_model_for(model, shape, device, config.batch_size, "float32", profile, allow_foreign,
                                target=profile is not None, layout=config.layout)
    if stale := latency.profile.stale():  # kept: the user chooses when to spend the minutes
        say(f"note: the latency profile {latency.profile.path} timed {', '.join(stale)} before that kernel changed, "
            f"so it predicts the old kernel's latency there; `sparsesearch profile --model {config.model}` on the "
            "device it was measured on times those rows anew")
    dense_correct = correct(model.to(device), data.val, device)
    dense = {"val": percent(dense_correct), "test": evaluate(model, data.test, device)}
    model.cpu()
    return Search(config, model, shape, device, artifacts, data=data, layers=trace(model, shape),
                  deps=dependencies(model, shape), latency=latency, dense=dense, dense_correct=dense_correct,
                  weights_sha256=sha256(weights))


def trials_of(study: optuna.Study, device: torch.device, artifacts: str, data_dir: Path | None = None) -> Trials:
    """The study's trained trials, rebuilt from what the study stored: no dense checkpoint, data or
    profile needed (a study older than that record loads its data once for the input shape)."""
    from .models import create
    from .train import prepare

    config, dense = load_config(study), study.user_attrs.get("dense", {})
    if "input_shape" in dense and "num_classes" in dense:
        shape = tuple(dense["input_shape"])
        model = create(config.model, num_classes=dense["num_classes"], in_channels=shape[0])
    else:
        model, data = prepare(config.model, config.dataset, data_dir, image_size=config.image_size, seed=config.seed)
        shape = data.input_shape
    artifact_store(artifacts, check=True)
    return Trials(config, model.eval(), shape, device, artifacts)


WITHHELD = "withheld"  # the study attr: per layer, the types its space keeps from it
STEPS = "steps"  # the study attr: the channel widths its counts are aligned to (none recorded: not aligned)
REMOVABLE = "removable"  # the study attr: the slots its plans may remove whole (a branch, a collapsed layer)
MAX_RATE_ATTR = "max_rate"  # the study attr: its space's highest rate (none recorded: MAX_RATE)


def dense_weights(config: SearchConfig) -> Path:
    """The dense checkpoint a search prunes: the one named, else the model and dataset's default."""
    from .train import default_checkpoint

    return Path(config.checkpoint) if config.checkpoint else default_checkpoint(config.model, config.dataset)


def same_dense(study: optuna.Study, weights_sha256: str) -> None:
    """Refuse dense weights other than those the study's trials were pruned from: every drop it
    records is measured from them."""
    if study.user_attrs.get("dense", {}).get("weights_sha256", weights_sha256) != weights_sha256:
        raise UserError(f"the dense checkpoint of study '{study.study_name}' changed since the study started "
                        "(its trials were pruned from other weights); restore it, or start another with --study NEW")


def recorded_dense(study: optuna.Study) -> Path:
    """The study's dense checkpoint, here and unchanged: what `export` and `finalize` retrain from
    (never trained anew, which would give other weights)."""
    config = load_config(study)
    weights = dense_weights(config)
    if not weights.is_file():
        raise UserError(f"the dense checkpoint {weights} that study '{study.study_name}' was pruned from is not "
                        "here; copy it there from the machine the study started on, or run from the folder it "
                        "started in")
    same_dense(study, sha256(weights))
    return weights


def record(study: optuna.Study, search: Search) -> None:
    """Store the study's settings, dense baseline and layer order once, when it is new."""
    from .profiler.table import fingerprint

    if "config" in study.user_attrs:  # resumed: keep judging against the baseline the study started with
        same_dense(study, search.weights_sha256)
        search.dense.update({k: study.user_attrs["dense"][k] for k in ("val", "test")})
        search.steps = study.user_attrs.get(STEPS, {})  # a plan's counts stay what they were when it was drawn
        search.removable = study.user_attrs.get(REMOVABLE, [])  # none recorded: a study from before removal
        search.max_rate = study.user_attrs.get(MAX_RATE_ATTR, MAX_RATE)  # its rates' range stays as drawn
        search.offer(_withheld(study, search))
        if untimed := sorted(t.value for t in {t for s in search.space.slots for t in s.types} & search.unprofiled):
            raise UserError(f"study '{study.study_name}' searches {', '.join(untimed)}, which the latency profile "
                            f"{search.latency.profile.path} has not timed on {search.config.model}; add them with "
                            f"`{search.profile_command}`")
        return
    here = fingerprint(search.device, search.config.batch_size, "float32")
    study.set_user_attr("dense", {**search.dense, "profiled_ms": search.dense_ms, "weights_sha256": search.weights_sha256,
                                  "input_shape": list(search.input_shape), "num_classes": search.data.info.num_classes,
                                  "unit": "% top-1; profiled_ms per call of the whole batch"})
    target = search.latency.profile.fingerprint
    study.set_user_attr("setting", {"device": str(search.device), "device_name": here["device_name"],
                                    "batch_size": search.config.batch_size, "threads": here["threads"],
                                    "profile": str(search.latency.profile.path), "torch": here["torch"],
                                    "target": {k: target.get(k) for k in ("device", "device_name", "threads")}})
    study.set_user_attr("artifacts", search.artifacts)
    study.set_user_attr("layers", [layer.name for layer in search.layers])
    study.set_user_attr("space", "per layer" if search.space.per_layer
                        else "per stage + allocation by latency and sensitivity")
    study.set_user_attr(WITHHELD, {name: sorted(k.value for k in kinds) for name, kinds in search.withheld.items()})
    study.set_user_attr(STEPS, search.steps)
    study.set_user_attr(MAX_RATE_ATTR, search.max_rate)
    search.removable = search.find_removable()
    search.offer(search.withheld)
    study.set_user_attr(REMOVABLE, search.removable)
    # last: a worker starting beside this one takes "config" to mean the record is whole
    study.set_user_attr("config", search.config.to_attrs())


def _withheld(study: optuna.Study, search: Search) -> dict[str, set[SparsityType]]:
    """What the study's space withholds: its record, else (a study from before the record) the
    layer-local types that its trials' `type:` parameters did not offer."""
    if WITHHELD in study.user_attrs:
        return {name: {SparsityType(k) for k in kinds} for name, kinds in study.user_attrs[WITHHELD].items()}
    offered = {param.removeprefix("type:"): set(dist.choices) for t in study.get_trials(False)
               for param, dist in t.distributions.items() if param.startswith("type:")}
    if not offered:
        return search.withheld
    search.offer({})
    return {name: {k for k in slot.types if k in LAYER_LOCAL and k.value not in offered.get(key, ())}
            for slot in search.space.slots
            for key in [slot.name if search.space.per_layer else slot.stage] for name in slot.layers}


# --- export ---------------------------------------------------------------------------------------


def chosen(study: optuna.Study, number: int, within_trial_limit: bool = True) -> FrozenTrial:
    """Trial `number`, if it trained to the end and (`within_trial_limit`) met the accuracy constraint.
    `finalize` lifts the constraint: a full run re-judges what a short trial overstates."""
    trials = {t.number: t for t in study.get_trials(False)}
    if number not in trials:
        raise UserError(f"study '{study.study_name}' has no trial {number} (trials 0-{len(trials) - 1}); "
                        f"see studies/{study.study_name}/report.md for the Pareto trials")
    trial = trials[number]
    if trial.state != TrialState.COMPLETE or (within_trial_limit and not trial.user_attrs.get("feasible")):
        why = trial.user_attrs.get("rejected") or trial.user_attrs.get("pruned") or (
            f"it is {trial.state.name.lower()}" if trial.state != TrialState.COMPLETE else
            f"its accuracy drop {trial.user_attrs.get('acc_drop', float('nan')):.2f} exceeds the limit of "
            f"{load_config(study).max_acc_drop:g} at trial fidelity")
        raise UserError(f"trial {number} is not feasible ({why}); export a Pareto trial (see pareto.json), or let "
                        "`sparsesearch finalize` judge plans beyond the limit by retraining them")
    return trial


@dataclass
class ExportResult:
    accuracy: dict[str, float]
    measured: Measured  # the compacted model timed beside its masked dense form
    files: dict[str, Path]
    skipped: dict[str, str]
    metrics: Path
    resumed_at: int = 0  # training steps an interrupted export had done when this call continued it


def export_dir(root: Path, number: int, epochs: str, replicate: int = 0) -> Path:
    """Where trial `number`'s export at `epochs` ("10+5") goes under `root` (a study's export folder):
    one folder per epochs, so a quick run never overwrites a longer one's model, and per replicate."""
    return Path(root) / (f"trial-{number}-{epochs}" + (f"-r{replicate}" if replicate else ""))


def export_trial(search: Search, study: optuna.Study, number: int, admm_epochs: float, retrain_epochs: float,
                 out_dir: Path, on_progress: Callable[[int, int, str], None] | None = None,
                 within_trial_limit: bool = True, replicate: int = 0) -> ExportResult:
    """Re-run trial `number`'s plan from the dense checkpoint with the full budget, compact, measure,
    and write the compacted model (`export.write_all`) plus metrics.json. `replicate` k > 0 runs it
    again at another seed (the study's + k * REPLICATE_SEEDS), recorded beside the others. An
    interrupted call leaves its training state in `out_dir` (`admm.RESUME`); the same call continues
    from it."""
    from .compact import measure
    from .export import write_all
    from .report import export_key

    trial = chosen(study, number, within_trial_limit)
    plan = Plan.from_dict({"layers": trial.user_attrs["plan"]}, f"trial {number}")
    plan.validate(search.layers, search.deps.couplings)
    model = search.fresh_model()
    config = replace(search.config.admm(admm_epochs, retrain_epochs), test=True, rungs=(),  # the search is over
                     seed=search.config.seed + replicate * REPLICATE_SEEDS)
    resume = Path(out_dir) / RESUME
    result = run_admm(model, search.data, plan, config, search.device, search.deps,
                      on_progress=on_progress and (lambda p: on_progress(p.step, p.total, p.phase)), resume=resume)
    m = measure(model, plan, search.data.input_shape, search.config.model, search.device, search.config.batch_size,
                search.config.channels_last)
    accuracy = {"dense_val": search.dense["val"], "dense_test": search.dense["test"],
                "val": result.accuracy["final_val"], "test": result.accuracy["final"],
                "hard_pruned_test": result.accuracy["hard_pruned"]}
    metrics = {"schema": SCHEMA, "study": study.study_name, "trial": number, "plan": plan.to_dict(),
               "admm_config": asdict(config), "accuracy": {**accuracy, "unit": "% top-1"},
               "latency_ms": m.latency_ms, "speedup": m.speedup, "params": m.params,
               "macs": {**m.macs, "unit": "per sample, prunable layers"},
               "measured": {**m.setting, "how": "median of interleaved rounds beside the masked dense model"},
               "search_trial": {k: trial.user_attrs.get(k) for k in ("val_acc", "acc_drop", "predicted_speedup")},
               "seconds": round(result.seconds, 2), "resumed_at_step": result.resumed_at}
    example = torch.randn(1, *search.data.input_shape, device=search.device)
    done = write_all(out_dir, m.compacted, example, {"model": search.config.model, "dataset": search.config.dataset,
                                                     "study": study.study_name, "trial": number,
                                                     "accuracy": metrics["accuracy"], "measured": metrics["measured"]})
    write_json(Path(out_dir) / "metrics.json", metrics)
    drop, se = paired_drop(search.dense_correct, result.val_correct)  # image by image, as a trial's
    epochs = epochs_text(admm_epochs, retrain_epochs)
    study.set_user_attr(export_key(study, number, epochs, replicate), {
        "val_drop": drop, "val_drop_se": se, "test_drop": accuracy["dense_test"] - accuracy["test"],
        "speedup": m.speedup, "epochs": epochs, "path": str(Path(out_dir).resolve()), "host": platform.node(),
        "replicate": replicate, "seed": config.seed})
    for path in resume_files(resume):
        path.unlink(missing_ok=True)
    return ExportResult(accuracy, m, done.files, done.skipped, Path(out_dir) / "metrics.json", result.resumed_at)
