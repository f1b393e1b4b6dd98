"""`sparsesearch profile validate`: random per-layer plans, compacted and timed end to end, against
the latency model's prediction for them."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..layers import Layer, trace
from ..plan import LayerSparsity, Plan
from ..sparsity import SparsityType
from .measure import DEFAULT_RATES, NM_RATES, Target
from .predictor import LatencyModel, predict_compacted
from .timing import compare

GROUP = 5  # compacted models timed side by side per compare() call


def random_plan(layers: list[Layer], couplings: list[list[str]], rng: random.Random,
                rates: tuple[float, ...] = DEFAULT_RATES, dense_share: float = 0.15) -> Plan:
    """A random type and grid rate per layer (some left dense); a coupled group that draws filter
    takes one filter rate for all its members, as plans must."""
    def draw(types: tuple[SparsityType, ...]) -> LayerSparsity:
        kind = rng.choice(types)
        return LayerSparsity(kind, rng.choice(NM_RATES[1:] if kind == SparsityType.NM else rates[1:]))

    by_name = {layer.name: layer for layer in layers}
    specs: dict[str, LayerSparsity | None] = {}
    for group in couplings:
        common = tuple(t for t in by_name[group[0]].types if all(t in by_name[n].types for n in group))
        spec = draw(common) if SparsityType.FILTER in common else None
        for n in group:
            if spec is not None and spec.type == SparsityType.FILTER:
                specs[n] = spec
            else:
                others = tuple(t for t in by_name[n].types if t != SparsityType.FILTER)
                specs[n] = draw(others) if others and rng.random() > dense_share else None
    for layer in layers:
        if layer.name not in specs:
            specs[layer.name] = draw(layer.types) if rng.random() > dense_share else None
    chosen = {n: s for n, s in specs.items() if s is not None}
    if not chosen:  # a plan must prune something
        chosen[layers[0].name] = draw(layers[0].types)
    return Plan(chosen)


@dataclass
class Sample:
    plan: dict[str, object]
    predicted_ms: float
    measured_ms: float
    spread: float

    @property
    def error(self) -> float:
        return self.predicted_ms / self.measured_ms - 1


@dataclass
class Validation:
    model: str
    samples: list[Sample] = field(default_factory=list)
    setting: dict[str, object] = field(default_factory=dict)

    @property
    def mean_abs_error(self) -> float:
        return sum(abs(s.error) for s in self.samples) / len(self.samples)

    @property
    def within_10(self) -> float:
        return sum(abs(s.error) <= 0.1 for s in self.samples) / len(self.samples)

    def to_dict(self) -> dict[str, object]:
        return {"schema": 1, "model": self.model, "setting": self.setting,
                "mean_abs_error": self.mean_abs_error, "within_10": self.within_10,
                "samples": [{**asdict(s), "error": s.error} for s in self.samples]}


def validate(latency: LatencyModel, target_: Target, samples: int, device: torch.device, batch_size: int,
             dtype: torch.dtype = torch.float32, seed: int = 0,
             on_progress: Callable[[int, int, str], None] | None = None) -> Validation:
    """Draw `samples` random plans, compact each, time them end to end (GROUP at a time, side by
    side) and pair each measurement with its prediction."""
    from ..admm import apply_masks, prune_masks
    from ..compact import compact, dependencies

    rng = random.Random(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the profile was measured
    model, shape = target_.model.eval(), target_.input_shape
    deps = dependencies(model, shape)
    layers = trace(model, shape)
    result = Validation(target_.name, setting={"device": str(device), "batch_size": batch_size,
                                               "threads": torch.get_num_threads(), "dtype": str(dtype),
                                               "seed": seed, "profile": str(latency.profile.path)})
    x = torch.randn(batch_size, *shape, dtype=dtype).to(device)
    pending: list[tuple[Plan, float, torch.nn.Module]] = []
    for i in range(samples):
        plan = random_plan(layers, deps.couplings, rng)
        masked = copy.deepcopy(model)
        apply_masks(masked, prune_masks(masked, plan, deps))
        compacted = compact(masked, plan, shape).model
        predicted = predict_compacted(latency, masked, compacted, shape).total_ms
        pending.append((plan, predicted, compacted.to(device=device, dtype=dtype)))
        if len(pending) == GROUP or i == samples - 1:
            timings = compare({str(j): m for j, (_, _, m) in enumerate(pending)}, x,
                              rounds=15, warmup_s=0.1, min_round_s=0.02)
            for j, (p, predicted_ms, _) in enumerate(pending):
                t = timings[str(j)]
                result.samples.append(Sample(p.to_dict(), predicted_ms, t.median_ms, t.spread))
            pending = []
        if on_progress:
            on_progress(i + 1, samples, f"plan {i + 1}")
    return result


def scatter(result: Validation, path: Path) -> Path:
    """Predicted vs measured latency, with the ±10% band, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..files import save_with

    measured = [s.measured_ms for s in result.samples]
    predicted = [s.predicted_ms for s in result.samples]
    lo, hi = min(measured + predicted) * 0.85, max(measured + predicted) * 1.15
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([lo, hi], [lo, hi], "k-", lw=1, label="exact")
    ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="0.85", label="±10%")
    ax.scatter(measured, predicted, s=18, zorder=3)
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="measured latency (ms, median)", ylabel="predicted latency (ms)",
           title=f"{result.model}: {result.within_10:.0%} within ±10%, MAPE {result.mean_abs_error:.1%}\n"
                 f"{result.setting['device']}, batch {result.setting['batch_size']}, "
                 f"{result.setting['threads']} threads, {len(result.samples)} random plans")
    ax.legend(loc="upper left")
    fig.tight_layout()
    save_with(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return Path(path)
