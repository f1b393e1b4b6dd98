"""Where a study starts: a sensitivity scan of the dense model, and the plans it suggests.

Layers differ: pruning some costs a network little accuracy, pruning others a lot (AMC, NetAdapt).
One cheap pass measures it: each unit of the search space (a coupling group or layer, or a stage
in the per-stage space) is pruned alone at one rate by projection, without training, and the
accuracy it loses on the validation probe is recorded. The study then starts, next to the uniform
ladder, from plans at the same mean rates that prune robust units harder and fragile ones less.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .admm import projected_accuracy
from .data import Split
from .graph import Dependencies
from .space import MAX_RATE, Space, snap
from .sparsity import SparsityType
from .train import evaluate

SCAN_RATE = 0.5


@dataclass
class Scan:
    """Accuracy points each unit loses when pruned alone at `rate` (its `kinds` type), no training."""

    rate: float
    kinds: dict[str, str]
    drop: dict[str, float]
    seconds: float
    images: int  # evaluated, in all

    def to_attrs(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_attrs(cls, raw: dict[str, Any]) -> Scan:
        return cls(**raw)


def _units(space: Space) -> dict[str, tuple[SparsityType, list[str]]]:
    """Per unit of the space, the type it is scanned at (filter where it takes it) and its slots."""
    if space.per_layer:
        return {s.name: (SparsityType.FILTER if SparsityType.FILTER in s.types else s.types[0], [s.name])
                for s in space.slots}
    units = {}
    for stage, slots in space.stages.items():
        kinds = [SparsityType(k) for k in space.choices(stage)]
        kind = SparsityType.FILTER if SparsityType.FILTER in kinds else kinds[0]
        units[stage] = (kind, [s.name for s in slots if kind in s.types])
    return units


def scan(space: Space, model: nn.Module, deps: Dependencies, probe: Split, device: torch.device,
         calibration: Split | None = None, rate: float = SCAN_RATE) -> Scan:
    """Prune each unit of `space` alone at `rate` and measure the accuracy lost on `probe`, with
    BatchNorm statistics re-estimated on `calibration` (training images; see `projected_accuracy`).
    The model's weights are restored after each unit (it is evaluated on a swap)."""
    start = time.perf_counter()
    model = model.to(device)
    dense = evaluate(model, probe, device)
    kinds, drop = {}, {}
    for unit, (kind, slots) in _units(space).items():
        plan = space.plan({slot: (kind, rate) for slot in slots})
        kinds[unit] = kind.value
        drop[unit] = dense - projected_accuracy(model, probe, plan, deps, device, calibration) if plan.layers else 0.0
    model.cpu()
    return Scan(rate, kinds, drop, time.perf_counter() - start, len(probe) * (len(drop) + 1))


def seeded_params(space: Space, found: Scan, mean_rate: float) -> dict[str, Any]:
    """Optuna parameters of the plan at `mean_rate` on average whose unit rates fall as the unit's
    scanned drop grows: weight 1 / (1 + drop / typical drop), normalised to mean 1."""
    typical = statistics.median([d for d in found.drop.values() if d > 0] or [1.0])
    weight = {u: 1 / (1 + max(d, 0.0) / typical) for u, d in found.drop.items()}
    mean = statistics.fmean(weight.values())
    rate = {u: snap(min(mean_rate * w / mean, MAX_RATE), SparsityType(found.kinds[u])) for u, w in weight.items()}
    params: dict[str, Any] = {} if space.per_layer else {"alloc": 0.0}
    for unit in found.drop:
        params[f"type:{unit}"] = found.kinds[unit]
        params[f"rate:{unit}"] = rate[unit]  # `snap` keeps it on the space's 0.05 grid
    return params
