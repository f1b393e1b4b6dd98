"""What a trial may choose, and what is screened out before (or while) it trains.

`Space` turns an Optuna trial's parameters into a full per-layer sparsity plan: a type and a rate
per prunable layer, or per coupling group; per stage plus an allocation guided by latency and by
sensitivity when a model has many layers. Rates are snapped to what a plan takes (`snap`).
`rejection` says why a candidate is not worth training: predicted slower than the dense model, or
dominated on speed alone by a finished trial. `LadderPruner` stops trials on a fidelity ladder
(successive halving among plans at least as fast). Optuna 5 refuses `Trial.report`/`should_prune` in multi-objective studies, so
the objective stores each rung's accuracy in the trial's `rungs` user attr and the pruner, an
ordinary `BasePruner`, reads it from there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .errors import UserError
from .layers import Layer
from .plan import LayerSparsity, Plan
from .sparsity import NM_M, REMOVED, SparsityType

RATE_STEP, MAX_RATE = 0.05, 0.9  # a space's highest rate, unless its profile timed TOP_RATE
TOP_RATE = 0.95  # the highest rate a space offers, where its profile timed it (`Space.max_rate`)
BASELINE_RATES = (0.3, 0.5, 0.7, 0.9)  # the uniform ladder a study starts from: the front reaches the
# plans a full run may pass (`Search.ladder`); `profile` calibrates and validates on it too
ETA = 3  # successive halving: a third of the trials climb each rung
RUNGS = (1 / ETA**2, 1 / ETA)  # where trials are checked: fractions of a trial's training steps
BAND = 0.05  # a plan's peers on the ladder: trials predicted at least as fast, within 5%
MAX_LAYER_SLOTS = 12  # more slots than this: per-stage parameters plus a guided allocation
LEAN_MAX = 2.0  # the largest `lean`: a slot twice as robust as another pruned up to 4x as hard
HOPELESS = "hopeless"  # how a rejection for accuracy a plan can only lose begins (`rejection`)


# --- the search space -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """Layers that take one type and rate together: a coupling group, or a single layer."""

    name: str
    layers: tuple[str, ...]
    types: tuple[SparsityType, ...]
    stage: str
    ms: float  # predicted dense latency of its layers


def snap(rate: float, kind: SparsityType, ceiling: float = MAX_RATE) -> float:
    """A drawn rate as a plan takes it: on the 0.05 grid, at most `ceiling`; nm to its nearest
    1 - N/M (0 = dense)."""
    if kind == SparsityType.NM:
        return round(round(rate * NM_M) / NM_M, 4) if rate < 1 - 0.5 / NM_M else 1 - 1 / NM_M
    return min(round(round(rate / RATE_STEP) * RATE_STEP, 4), ceiling)


def _stage(layer: Layer) -> str:
    return f"conv {layer.out_shape[1]}x{layer.out_shape[2]}" if layer.kind == "conv" else "linear"


class Space:
    """Per slot a type and a rate (`type:SLOT`, `rate:SLOT`); with more than `max_slots` slots, per
    stage (layers of one output resolution) a type and a rate, and two exponents that spread a
    stage's rate over its slots: `alloc` by their predicted latency (0: uniform; 1: a slot twice as
    slow is pruned twice as hard) and, once a sensitivity scan has set `robustness` (per slot, in
    (0, 1]: 1 for a slot that lost nothing pruned alone), `lean` by it (0: ignored; 1: a slot twice
    as robust is pruned twice as hard). Stages of a ResNet hold slots that differ by tens of points
    (a residual stream against a block's inner conv), which one rate per stage cannot tell apart;
    the stage rate is their mean. Either way each trial yields a full per-layer plan; given
    `steps` (a channel period, as `profiler.steps` measures it: the search passes its profile's),
    the filter and channel counts of layers at least MIN_BLOCKS steps wide are raised to multiples
    of it (`Plan.aligned`). A layer is not offered the types `withheld` from it (predicted
    no faster than dense there). Rates go up to `max_rate` (at most TOP_RATE): TOP_RATE where the
    profile timed it (Torch-Pruning's vgg16-bn at 0.9 prunes its 4x4 and 2x2 layers 94-97%), else
    MAX_RATE, as a latency model predicts a rate past its grid no faster than the grid's last (a
    tree ensemble is flat beyond its data): the search would pay accuracy for speed it cannot see.

    The slots `removable` (whose whole residual branch `compact` can replace by the constant it
    leaves: a block dropped; or, in a plain network, a layer that keeps its input's shape, which
    collapses to its identity path: one multiply-add per channel) add `remove:STAGE` per stage, how
    many of them are removed: those whose removal alone lost least in the sensitivity scan first
    (`removal_drop`), then the slowest (per layer: `remove:SLOT`, 0 or 1). On a CPU at batch 1 a
    small block's cost is mostly per-call overhead that filter pruning keeps: resnet56 with 8 of 24
    blocks removed (1.43x fewer MACs) ran 1.28x faster, with every block's inner conv at filter 50%
    (1.99x fewer) 1.38x (bench/results/blocks.md)."""

    def __init__(self, layers: list[Layer], couplings: list[list[str]], types: tuple[str, ...],
                 layer_ms: dict[str, float], max_slots: int = MAX_LAYER_SLOTS,
                 steps: dict[str, object] | None = None,
                 withheld: dict[str, set[SparsityType]] | None = None, removable: Iterable[str] = (),
                 max_rate: float = MAX_RATE) -> None:
        allowed = {SparsityType(t) for t in types}
        self.max_rate = min(max_rate, TOP_RATE)
        self.by_name = by_name = {layer.name: layer for layer in layers}
        self.steps = {side: int((steps or {}).get(side, 1)) for side in ("out", "in")}
        grouped = {n for g in couplings for n in g}
        units = [list(g) for g in couplings] + [[layer.name] for layer in layers if layer.name not in grouped]
        units.sort(key=lambda u: [layer.name for layer in layers].index(u[0]))
        self.slots = []
        for unit in units:
            kinds = tuple(t for t in SparsityType if t in allowed
                          and all(t in by_name[n].types and t not in (withheld or {}).get(n, ()) for n in unit))
            if kinds:
                self.slots.append(Slot(unit[0], tuple(unit), kinds, _stage(by_name[unit[0]]),
                                       sum(layer_ms.get(n, 0.0) for n in unit)))
        if not self.slots:
            raise UserError(f"no prunable layer accepts the types {', '.join(types)} (or is predicted faster with them on "
                            "this device); allow more with --types")
        self.per_layer = len(self.slots) <= max_slots
        self.robustness: dict[str, float] = {}
        self.stages: dict[str, list[Slot]] = {}
        for s in self.slots:
            self.stages.setdefault(s.stage, []).append(s)
        removable = set(removable) if SparsityType.FILTER in allowed else set()
        units = {s.name: [s] for s in self.slots} if self.per_layer else self.stages
        self.removable = {unit: [s for s in slots if s.name in removable] for unit, slots in units.items()
                          if any(s.name in removable for s in slots)}
        self.removal_drop: dict[str, float] = {}  # per removable slot, what removing it alone lost (the scan)

    def suggest(self, trial: optuna.Trial) -> Plan:
        rates: dict[str, tuple[SparsityType, float]] = {}
        if self.per_layer:
            for s in self.slots:
                kind = SparsityType(trial.suggest_categorical(f"type:{s.name}", [t.value for t in s.types]))
                rates[s.name] = (kind, trial.suggest_float(f"rate:{s.name}", 0.0, self.max_rate, step=RATE_STEP))
        else:
            alloc = trial.suggest_float("alloc", 0.0, 1.0, step=0.25)
            lean = trial.suggest_float("lean", 0.0, LEAN_MAX, step=0.25) if self.robustness else 0.0
            for stage, slots in self.stages.items():
                kind = SparsityType(trial.suggest_categorical(f"type:{stage}", self.choices(stage)))
                rate = trial.suggest_float(f"rate:{stage}", 0.0, self.max_rate, step=RATE_STEP)
                takers = [s for s in slots if kind in s.types]
                weights = [max(s.ms, 1e-9) ** alloc * self.robustness.get(s.name, 1.0) ** lean for s in takers]
                mean = sum(weights) / max(len(weights), 1)
                for s, w in zip(takers, weights):
                    rates[s.name] = (kind, min(rate * w / mean, self.max_rate))
        for unit, slots in self.removable.items():
            count = trial.suggest_int(f"remove:{unit}", 0, len(slots))
            for s in self.cheapest_removals(slots)[:count]:
                rates[s.name] = (SparsityType.FILTER, REMOVED)
        return self.plan(rates)

    def even(self) -> dict[str, float]:
        """The allocation parameters that spread each stage's rate evenly over its slots (and remove none)."""
        return {"alloc": 0.0} | ({"lean": 0.0} if self.robustness else {}) | self.none_removed()

    def none_removed(self) -> dict[str, int]:
        """The parameters that remove no residual branch."""
        return {f"remove:{unit}": 0 for unit in self.removable}

    def cheapest_removals(self, slots: Iterable[Slot]) -> list[Slot]:
        """Removable `slots` in the order a plan removes them: those whose removal alone lost least
        in the sensitivity scan first, then the slowest."""
        return sorted(slots, key=lambda s: (self.removal_drop.get(s.name, 0.0), -s.ms))

    def removed_share(self, share: float) -> dict[str, int]:
        """The parameters that remove `share` of the removable residual branches, cheapest first:
        per stage in a per-stage space; over the network in a per-layer one (its units are single
        slots, which a share per unit would remove all or none of)."""
        def count(n: int) -> int:  # half up: 5 of 9 at 0.5
            return math.floor(share * n + 0.5)

        if not self.per_layer:
            return {f"remove:{unit}": count(len(slots)) for unit, slots in self.removable.items()}
        ranked = self.cheapest_removals(s for slots in self.removable.values() for s in slots)
        chosen = {s.name for s in ranked[:count(len(ranked))]}
        return {f"remove:{unit}": int(slots[0].name in chosen) for unit, slots in self.removable.items()}

    def choices(self, stage: str) -> list[str]:
        return [t.value for t in SparsityType if any(t in s.types for s in self.stages[stage])]

    def plan(self, rates: dict[str, tuple[SparsityType, float]]) -> Plan:
        layers = {}
        for s in self.slots:
            if s.name in rates:
                kind, rate = rates[s.name]
                rate = rate if rate == REMOVED else snap(rate, kind, self.max_rate)
                for n in s.layers:
                    if rate > 0:
                        layers[n] = LayerSparsity(kind, rate)
        return Plan(layers).aligned(self.by_name.values(), self.steps)

    def uniform_params(self, kind: SparsityType, rate: float) -> dict[str, Any]:
        """The parameters that draw `kind` at `rate` wherever it applies (a uniform baseline)."""
        if self.per_layer:
            params: dict[str, Any] = self.none_removed()
            for s in self.slots:
                params[f"type:{s.name}"] = (kind if kind in s.types else s.types[0]).value
                params[f"rate:{s.name}"] = rate if kind in s.types else 0.0
            return params
        params = self.even()
        for stage in self.stages:
            takes = kind.value in self.choices(stage)
            params[f"type:{stage}"] = kind.value if takes else self.choices(stage)[0]
            params[f"rate:{stage}"] = rate if takes else 0.0
        return params


# --- rejection and pruning ------------------------------------------------------------------------


def _prunes_no_more(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether plan `a` removes no more than plan `b` everywhere (same type where both prune)."""
    for name, spec in a.items():
        other = b.get(name)
        if other is None or other["type"] != spec["type"] or other["rate"] < spec["rate"]:
            return False
    return True


def promising(trial: FrozenTrial, limit: float | None) -> bool | None:
    """Whether a finished trial lost at most `limit` points (`search.trial_limit`: the drop a trial
    may show and a full run still pass; None: as judged when it finished); None if it was not judged."""
    drop = trial.user_attrs.get("acc_drop")
    return trial.user_attrs.get("feasible") if limit is None or drop is None else drop <= limit


def rejection(plan: dict[str, Any], speedup: float, finished: list[FrozenTrial], limit: float | None = None,
              hopeless: bool = True) -> str:
    """Why a candidate is not worth training, or "": predicted slower than dense; a `promising` trial
    prunes no more and is predicted at least as fast (dominated on speed alone); with `hopeless`, a
    trial beyond `limit` prunes no more (it can only be less accurate, at trial fidelity)."""
    if speedup < 1:
        return f"predicted slower than the dense model ({speedup:.2f}x)"
    for t in finished:
        other = t.user_attrs.get("plan")
        if t.state != TrialState.COMPLETE or other is None or not _prunes_no_more(other, plan):
            continue
        if promising(t, limit) and t.user_attrs.get("predicted_speedup", 0) >= speedup:
            return (f"dominated on speed: trial {t.number} prunes no more and is predicted at least as fast "
                    f"({t.user_attrs['predicted_speedup']:.2f}x >= {speedup:.2f}x)")
        if hopeless and promising(t, limit) is False:
            return f"{HOPELESS}: trial {t.number} prunes no more and already misses the accuracy constraint"
    return ""


class LadderPruner(optuna.pruners.BasePruner):
    """Successive halving on the fidelity ladder, among plans at least as fast. Each trial reports
    at its rungs (fractions of its training, the `rungs` user attr) the probe accuracy it would end
    with if hard-pruned there. A plan's predicted speedup is known before it trains, so it competes
    only with trials predicted at least as fast (within `band`): they are what would dominate it.
    At each rung it goes on if it ranks in the best 1/`eta` of those that reached the rung (it runs
    while fewer than `eta` did), and it stops if it trails there every trial at least as fast within
    the limit it was given (its `trial_limit` attr) by more than `margin` points plus what full runs
    raised that limit by: it would end dominated. Only trials at least as fast: a heavier plan scores
    lower early whatever it ends with (resnet56's trials at 1.26x and 1.31x, 78% and 70% at rung 1,
    ended 0.23 and 0.73 points below the control; vgg16-bn's at 4.38x, 48%, 0.73), so compared with
    every promising trial the fastest plans were stopped for their speed (vgg16-bn's study stopped
    plans at 4.6-6.0x so, and never tried one faster than its 70% baseline). Reads the trials'
    attrs, as the module docstring says."""

    def __init__(self, eta: int = ETA, band: float = BAND, margin: float = 5.0, min_feasible: int = 3) -> None:
        self.eta, self.band, self.margin, self.min_feasible = eta, band, margin, min_feasible

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return bool(self.why(study, trial))

    def why(self, study: optuna.Study, trial: FrozenTrial) -> str:
        """Why `trial` stops at its last rung, or "" if it goes on."""
        rungs = trial.user_attrs.get("rungs", [])
        if not rungs:
            return ""
        k, acc, speedup = len(rungs) - 1, rungs[-1]["acc"], trial.user_attrs.get("predicted_speedup", 0.0)
        there = [t for t in study.get_trials(False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
                 if t.number != trial.number and len(t.user_attrs.get("rungs", [])) > k
                 and t.user_attrs.get("predicted_speedup", 0.0) >= speedup / (1 + self.band)]
        limit = trial.user_attrs.get("trial_limit")
        feasible = [t.user_attrs["rungs"][k]["acc"] for t in there
                    if t.state == TrialState.COMPLETE and promising(t, limit)]
        raised = 0.0 if limit is None else limit - study.user_attrs.get("config", {}).get("max_acc_drop", limit)
        gap = self.margin + raised
        if len(feasible) >= self.min_feasible and acc < min(feasible) - gap:
            return (f"{acc:.1f}% at rung {k + 1} trails by more than {gap:.2f} points every promising trial "
                    f"predicted at least as fast ({speedup:.2f}x): it would end dominated")
        peers = [t.user_attrs["rungs"][k]["acc"] for t in there]
        better = sum(p > acc for p in peers)
        if len(peers) >= self.eta and better >= math.ceil((len(peers) + 1) / self.eta):
            return (f"{acc:.1f}% at rung {k + 1}: {better} of {len(peers)} trials predicted at least as fast "
                    f"({speedup:.2f}x) were more accurate there; only the best 1/{self.eta} go on")
        return ""
