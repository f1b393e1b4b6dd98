"""Where a study starts: a sensitivity scan of the dense model, and the plans it suggests.

Layers differ: pruning some costs a network little accuracy, pruning others a lot (AMC, NetAdapt).
One cheap pass measures it: each slot of the search space (a coupling group or a layer) is pruned
alone at one rate by projection, without training, and the accuracy it loses on the validation
probe is recorded (and each removable residual branch removed alone). The study then starts, next
to the uniform ladder, from plans at the same mean rates that prune robust slots harder and fragile
ones less, and remove as large a share of the branches, the cheapest first; in a per-stage space the scan also sets
the slots' `Space.robustness`, by which a trial's `lean` spreads a stage's rate. Slots, not stages:
in resnet56 on Fashion-MNIST a stage pruned alone at 50% lost 4-44 points, a figure that hides
what inside it is fragile (the residual stream, the block that downsamples) and what is not.
A second family needs no evaluation at all: the weights' norms, thresholded over the whole network
(`norm_params`), which finds the redundant layers a one-layer scan cannot tell apart.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .admm import projected_accuracy
from .data import Split
from .graph import Dependencies
from .space import Space, snap
from .sparsity import REMOVED, SparsityType, group_scores
from .train import evaluate

SCAN_RATE = 0.5


@dataclass
class Scan:
    """Accuracy points each unit loses when pruned alone at `rate` (its `kinds` type), no training;
    and each removable slot when its residual branch is removed alone (`removed`)."""

    rate: float
    kinds: dict[str, str]
    drop: dict[str, float]
    seconds: float
    images: int  # evaluated, in all
    removed: dict[str, float] = field(default_factory=dict)

    def to_attrs(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_attrs(cls, raw: dict[str, Any]) -> Scan:
        return cls(**raw)


def _kind(kinds: list[SparsityType]) -> SparsityType:
    """The type a unit is scanned and seeded at: filter where it takes it."""
    return SparsityType.FILTER if SparsityType.FILTER in kinds else kinds[0]


def scan(space: Space, model: nn.Module, deps: Dependencies, probe: Split, device: torch.device,
         calibration: Split | None = None, rate: float = SCAN_RATE,
         on_progress: Callable[[int, int, str], None] | None = None) -> Scan:
    """Prune each slot of `space` alone at `rate` and measure the accuracy lost on `probe`, with
    BatchNorm statistics re-estimated on `calibration` (training images; see `projected_accuracy`).
    The model's weights are restored after each slot (it is evaluated on a swap). `on_progress`
    gets (units done, units, the unit) after each: resnet56's 31 take minutes on a CPU core.
    Then each of `space.removable`'s slots is removed alone (filter rate `REMOVED`): blocks that
    lose nothing pruned at `rate` differ once removed (a stage's first block carries its change of
    width), and removal takes the least harmful first."""
    start = time.perf_counter()
    model = model.to(device)
    dense = evaluate(model, probe, device)
    removable = [s for slots in space.removable.values() for s in slots]
    units = [(s, _kind(list(s.types)), rate) for s in space.slots]
    units += [(s, SparsityType.FILTER, REMOVED) for s in removable]
    kinds, drop, removed = {}, {}, {}
    for slot, kind, at in units:
        plan = space.plan({slot.name: (kind, at)})
        lost = dense - projected_accuracy(model, probe, plan, deps, device, calibration) if plan.layers else 0.0
        if at == REMOVED:
            removed[slot.name] = lost
        else:
            kinds[slot.name], drop[slot.name] = kind.value, lost
        if on_progress is not None:
            on_progress(len(drop) + len(removed), len(units), slot.name)
    model.cpu()
    return Scan(rate, kinds, drop, time.perf_counter() - start, len(probe) * (len(units) + 1), removed)


def noise(found: Scan) -> float:
    """The scan's noise floor: the largest gain any slot showed. Pruning a trained model without
    training does not make it better, so a gain is the probe's and the BatchNorm re-estimate's
    noise, and a loss no larger says nothing either (resnet56 on Fashion-MNIST: inner convs from
    -0.5 to +0.5 points on 1,000 images, while the residual stream lost 2-35)."""
    return max([-d for d in found.drop.values()] + [0.0])


def robustness(found: Scan) -> dict[str, float]:
    """Per slot, 1 / (1 + drop / typical drop), a drop within the `noise` counted as none: 1 for a
    slot that lost nothing measurable pruned alone, 1/2 for one that lost the median of those that
    did. Without the floor the noise ranked the slots that lost nothing, and seeds and `lean`
    pruned some of them twice as hard as others on a coin toss."""
    floor = noise(found)
    lost = {u: d if d > floor else 0.0 for u, d in found.drop.items()}
    typical = statistics.median([d for d in lost.values() if d > 0] or [1.0])
    return {u: 1 / (1 + d / typical) for u, d in lost.items()}


def seeded_params(space: Space, found: Scan, mean_rate: float) -> dict[str, Any]:
    """Optuna parameters of the plan at `mean_rate` on average whose rates fall as the scanned drop
    grows, in proportion to `robustness` (normalised to mean 1): per slot in a per-layer space; in a
    per-stage space per stage (by its slots' mean robustness) and, inside a stage, by `lean` 1. It
    also removes the share `mean_rate` of the removable residual branches, those whose removal alone
    lost least first: depth and width together. On resnet56 / Fashion-MNIST (trials of 0+4 epochs on
    0.1 of the split), plans of this family: three of each stage's nine branches removed and the
    rest at 25% lost 0.37 points at 1.46x predicted, where uniform filter 30% lost 0.88 at 1.26x;
    five of nine and 50%, 2.20 at 2.00x, where uniform 50% lost 2.10 at 1.67x. A 2-hour study's
    sampler had reached such plans only after some 40 trials (1.52x at 0.50, 1.80x at 1.97)."""
    robust = robustness(found)
    if space.per_layer:
        units = {u: ([u], SparsityType(found.kinds[u])) for u in found.drop}
        params: dict[str, Any] = space.removed_share(mean_rate)
    else:
        units = {stage: ([s.name for s in slots], _kind([SparsityType(k) for k in space.choices(stage)]))
                 for stage, slots in space.stages.items()}
        params = space.even() | {"lean": 1.0} | space.removed_share(mean_rate)
    weight = {u: statistics.fmean(robust[n] for n in names) for u, (names, _) in units.items()}
    mean = statistics.fmean(weight.values())
    for unit, (_, kind) in units.items():
        params[f"type:{unit}"] = kind.value
        params[f"rate:{unit}"] = snap(mean_rate * weight[unit] / mean, kind, space.max_rate)  # the 0.05 grid
    return params


def norm_rates(space: Space, model: nn.Module, ratio: float) -> dict[str, float]:
    """Per slot that takes filter pruning, the share of its filters under one threshold on their L2
    norms (a coupling group's summed, as the projection keeps them), each slot's divided by their
    mean, set to remove `ratio` of all filters: the global magnitude allocation of Torch-Pruning's
    global pruning. No evaluation, and it tells apart what a one-layer scan cannot: on vgg16-bn /
    Fashion-MNIST five of the six 4x4 and 2x2 layers lost within the scan's noise pruned alone at
    50%, while at 0.9 the norms take 87-98% of their filters (67-78% of the 32 and 16 px layers').
    Its plan at 0.8 lost 4.48 points at trial fidelity where the uniform 70% lost 5.68, predicted
    1.17x faster (bench/results/recipes-vgg16-bn-fashion-mnist.md)."""
    modules = dict(model.named_modules())
    scaled = {}
    for s in space.slots:
        if SparsityType.FILTER in s.types:
            norms = sum(group_scores(modules[n].weight.detach(), SparsityType.FILTER) for n in s.layers).sqrt()
            scaled[s.name] = norms / norms.mean().clamp_min(torch.finfo(norms.dtype).tiny)
    if not scaled:
        return {}
    every = torch.cat(list(scaled.values())).sort().values
    threshold = every[min(int(ratio * len(every)), len(every) - 1)]
    return {name: float((norms < threshold).float().mean()) for name, norms in scaled.items()}


def norm_params(space: Space, model: nn.Module, ratio: float) -> dict[str, Any]:
    """Optuna parameters of `norm_rates` at `ratio`: filter at those rates per slot in a per-layer
    space; in a per-stage space each stage at its slots' mean rate, spread evenly (`Space.even`).
    Slots that take no filter pruning stay dense."""
    rates = norm_rates(space, model, ratio)
    if space.per_layer:
        params: dict[str, Any] = space.none_removed()
        for s in space.slots:
            params[f"type:{s.name}"] = (SparsityType.FILTER if s.name in rates else s.types[0]).value
            params[f"rate:{s.name}"] = snap(rates.get(s.name, 0.0), SparsityType.FILTER, space.max_rate)
        return params
    params = space.even()
    for stage, slots in space.stages.items():
        taken = [rates[s.name] for s in slots if s.name in rates]
        params[f"type:{stage}"] = SparsityType.FILTER.value if taken else space.choices(stage)[0]
        params[f"rate:{stage}"] = snap(statistics.fmean(taken), SparsityType.FILTER, space.max_rate) if taken else 0.0
    return params
