"""`sparsesearch profile validate`: random per-layer plans, compacted and timed end to end, against
the latency model's prediction for them."""

from __future__ import annotations

import copy
import random
import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import UserError
from ..layers import Layer, trace
from ..plan import LayerSparsity, Plan
from ..runtime import in_layout
from ..space import BASELINE_RATES
from ..sparsity import REMOVED, SparsityType
from .measure import DEFAULT_RATES, GROUP, NM_RATES, Target, beside_dense
from .predictor import LatencyModel, compacted_copy, predict_compacted
from .table import BEFORE, model_key, without_unpaid

if TYPE_CHECKING:
    from ..graph import Dependencies


def filter_groups(layers: list[Layer], couplings: list[list[str]]) -> list[tuple[str, ...]]:
    """The layers whose filters a plan prunes together: each coupled group that takes filter, and
    every other layer that does, alone."""
    by_name, coupled = {layer.name: layer for layer in layers}, {n for group in couplings for n in group}
    return ([tuple(g) for g in couplings if all(SparsityType.FILTER in by_name[n].types for n in g)]
            + [(layer.name,) for layer in layers if SparsityType.FILTER in layer.types and layer.name not in coupled])


REMOVING_PLANS = 0.5  # the share of random plans that remove residual branches
REMOVE_SHARE = 0.15  # each removable branch's chance to go in a plan that removes some: ~4 of resnet56's 27


def random_plan(layers: list[Layer], couplings: list[list[str]], rng: random.Random,
                rates: tuple[float, ...] = DEFAULT_RATES, dense_share: float = 0.15,
                types: Iterable[str] | None = None, removable: Iterable[tuple[str, ...]] = (),
                remove_share: float = REMOVE_SHARE, removing: float = REMOVING_PLANS) -> Plan:
    """A random type (of `types`, default all) and grid rate per layer, some left dense; a coupled
    group that draws filter takes one filter rate for all its members, as plans must. A share
    `removing` of the plans also remove residual branches whole, as the search's `remove:`
    parameters do: each of the `removable` groups (`compact.removable`) with probability
    `remove_share`. The others remove none, so that plans without removals are still judged on a
    net with many removable branches."""
    def draw(types: tuple[SparsityType, ...]) -> LayerSparsity:
        kind = rng.choice(types)
        return LayerSparsity(kind, rng.choice(NM_RATES[1:] if kind == SparsityType.NM else rates[1:]))

    if types is not None:
        allowed = {SparsityType(t) for t in types}
        layers = [replace(layer, types=tuple(t for t in layer.types if t in allowed)) for layer in layers]
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
            specs[layer.name] = draw(layer.types) if layer.types and rng.random() > dense_share else None
    removable = list(removable)
    for group in removable if removable and rng.random() < removing else ():
        if rng.random() < remove_share:
            specs.update({n: LayerSparsity(SparsityType.FILTER, REMOVED) for n in group})
    chosen = {n: s for n, s in specs.items() if s is not None}
    prunable = [layer for layer in layers if layer.types]
    if not chosen and prunable:  # a plan must prune something
        chosen[prunable[0].name] = draw(prunable[0].types)
    return Plan(chosen)


def residual_branches(model: torch.nn.Module, shape: tuple[int, ...], deps: Dependencies, layers: list[Layer],
                      types: Iterable[str] | None = None) -> list[tuple[str, ...]]:
    """The filter groups whose removal drops a residual branch whole (`compact.removable`), where
    filter pruning is offered (`types`, default all): what a plan may remove."""
    from ..compact import removable

    if types is not None and SparsityType.FILTER.value not in types:
        return []
    return removable(model, shape, deps, filter_groups(layers, deps.couplings))


def compactable(model: torch.nn.Module, shape: tuple[int, ...], plan: Plan,
                deps: Dependencies) -> tuple[Plan, torch.nn.Module]:
    """`plan` and its compacted copy; without its removals where together they leave no path around
    them (every branch into a concatenation), which random draws can do."""
    try:
        return plan, compacted_copy(model, shape, plan, deps)
    except UserError:
        plan = Plan({n: spec for n, spec in plan.layers.items() if spec.rate != REMOVED})
        return plan, compacted_copy(model, shape, plan, deps)


LADDER_RATES = (0.1, *BASELINE_RATES)  # the search's uniform filter baselines, and 10%: timed by validation too


def uniform_ladder(layers: list[Layer], rates: tuple[float, ...], types: Iterable[str] | None = None
                   ) -> list[tuple[float, Plan]]:
    """The uniform filter plans the search starts from (`LADDER_RATES`, each at the nearest rate of
    `rates`, the profiled grid): random plans mix types and rarely look like them, yet they are the
    baselines every searched plan is judged against. Empty where filter was not profiled."""
    if types is not None and SparsityType.FILTER.value not in types:
        return []
    grid = sorted({min(rates[1:], key=lambda r: abs(r - want)) for want in LADDER_RATES}) if len(rates) > 1 else []
    plans = [(rate, Plan.uniform(layers, SparsityType.FILTER, rate)) for rate in grid]
    return [(rate, plan) for rate, plan in plans if plan.layers]


@dataclass
class Sample:
    plan: dict[str, object]
    predicted_ms: float
    measured_ms: float
    spread: float
    profiled_dense_ms: float  # the dense network as the profile measured it
    dense_ms: float  # the dense network timed beside this plan
    measured_speedup: float  # median over rounds of dense / this plan: steadier than dense_ms / measured_ms
    kind: str = "random"  # or "uniform filter RATE": a plan of the search's baseline ladder

    @property
    def predicted_speedup(self) -> float:
        return self.profiled_dense_ms / self.predicted_ms

    @property
    def removed(self) -> int:
        """Layers whose residual branch this plan removes whole."""
        return sum(spec["rate"] == REMOVED for spec in self.plan["layers"].values())

    @property
    def error(self) -> float:
        return self.predicted_ms / self.measured_ms - 1

    @property
    def speedup_error(self) -> float:
        return self.predicted_speedup / self.measured_speedup - 1


def _mean_abs(errors: list[float]) -> float:
    return sum(map(abs, errors)) / len(errors)


def _within_10(errors: list[float]) -> float:
    return sum(abs(e) <= 0.1 for e in errors) / len(errors)


@dataclass
class Validation:
    """Latency errors judge the prediction in ms; speedup errors judge what the search uses, the
    ratio to the dense network, which also holds when the machine as a whole runs faster or slower
    than when it was profiled (`drift`: the dense network now over then). The figures are over the
    random plans; the uniform ladder's plans (`ladder`) are reported one by one."""

    model: str
    samples: list[Sample] = field(default_factory=list)
    setting: dict[str, object] = field(default_factory=dict)

    @property
    def random(self) -> list[Sample]:
        return [s for s in self.samples if s.kind == "random"]

    @property
    def ladder(self) -> list[Sample]:
        return [s for s in self.samples if s.kind != "random"]

    @property
    def removing(self) -> list[Sample]:
        """The random plans that remove residual branches whole, which the latency model prices at
        nothing: judged apart as well."""
        return [s for s in self.random if s.removed]

    @property
    def mean_abs_error(self) -> float:
        return _mean_abs([s.error for s in self.random])

    @property
    def within_10(self) -> float:
        return _within_10([s.error for s in self.random])

    @property
    def speedup_mean_abs_error(self) -> float:
        return _mean_abs([s.speedup_error for s in self.random])

    @property
    def speedup_within_10(self) -> float:
        return _within_10([s.speedup_error for s in self.random])

    @property
    def removing_speedup_mean_abs_error(self) -> float:
        return _mean_abs([s.speedup_error for s in self.removing])

    @property
    def removing_speedup_within_10(self) -> float:
        return _within_10([s.speedup_error for s in self.removing])

    @property
    def drift(self) -> float:
        return statistics.median(s.dense_ms / s.profiled_dense_ms for s in self.samples)

    def to_dict(self) -> dict[str, object]:
        return {"schema": 4, "model": self.model, "setting": self.setting,
                "mean_abs_error": self.mean_abs_error, "within_10": self.within_10,
                "speedup_mean_abs_error": self.speedup_mean_abs_error, "speedup_within_10": self.speedup_within_10,
                "drift": self.drift,
                "samples": [{**asdict(s), "error": s.error, "predicted_speedup": s.predicted_speedup,
                             "speedup_error": s.speedup_error}
                            for s in self.samples]}


def validate(latency: LatencyModel, target_: Target, samples: int, device: torch.device, batch_size: int,
             dtype: torch.dtype = torch.float32, seed: int = 0,
             on_progress: Callable[[int, int, str], None] | None = None) -> Validation:
    """Draw `samples` random plans of what the search can offer (not the types `Profile.unpaid`
    finds buying no time), add the search's uniform filter ladder (`uniform_ladder`), compact each,
    time them end to end (GROUP at a time, side by side with the dense network, as the profile timed
    its calibration plans; a group whose dense net runs more than 10% off its profiled latency is
    timed once more) and pair each measurement with its prediction. Every network runs in the memory
    layout the profile was measured in."""
    from ..graph import dependencies

    rng = random.Random(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the profile was measured
    model, shape = target_.model.eval(), target_.input_shape
    deps = dependencies(model, shape)
    layers = without_unpaid(model, trace(model, shape), latency.profile.unpaid())  # what the search can offer
    covered = latency.profile.rest.get(model_key(model, shape), {}).get("grid", {})  # what the profile timed
    rates = tuple(covered.get("rates", DEFAULT_RATES))
    finding = "compacting the dense net to find the residual branches it may remove whole"
    if on_progress:  # a phase of its own: a minute on a 224 px ResNet-50
        on_progress(0, 1, finding)
    branches = residual_branches(model, shape, deps, layers, covered.get("types"))
    if on_progress:
        on_progress(1, 1, finding)
    layout = str(latency.profile.fingerprint.get("layout", BEFORE["layout"]))
    result = Validation(target_.name, setting={"device": str(device), "batch_size": batch_size,
                                               "threads": torch.get_num_threads(), "dtype": str(dtype),
                                               "layout": layout, "seed": seed, "profile": str(latency.profile.path)})
    x = in_layout(torch.randn(batch_size, *shape, dtype=dtype).to(device), layout)
    dense = in_layout(copy.deepcopy(model).to(device=device, dtype=dtype), layout)
    profiled_dense_ms = latency.dense_ms(model, shape)
    drawn = [("random", random_plan(layers, deps.couplings, rng, rates, types=covered.get("types"), removable=branches))
             for _ in range(samples)]
    drawn += [(f"uniform filter {rate:g}", plan) for rate, plan in uniform_ladder(layers, rates, covered.get("types"))]
    # as the search draws them: counts aligned to the device's step (a plan that then prunes nothing is left out)
    drawn = [(kind, aligned) for kind, plan in drawn if (aligned := plan.aligned(layers, latency.profile.steps)).layers]
    pending: list[tuple[str, Plan, float, torch.nn.Module]] = []
    for i, (kind, plan) in enumerate(drawn):
        plan, compacted = compactable(model, shape, plan, deps)
        predicted = predict_compacted(latency, model, compacted, shape).total_ms
        pending.append((kind, plan, predicted, in_layout(compacted.to(device=device, dtype=dtype), layout)))
        if len(pending) == GROUP or i == len(drawn) - 1:
            timings = beside_dense(dense, {str(j): m for j, (*_, m) in enumerate(pending)}, x, profiled_dense_ms)
            for j, (kind_, p, predicted_ms, _) in enumerate(pending):
                t = timings[str(j)]
                result.samples.append(Sample(p.to_dict(), predicted_ms, t.median_ms, t.spread, profiled_dense_ms,
                                             timings["dense"].median_ms, 1 / t.relative, kind_))
            pending = []
        if on_progress:
            on_progress(i + 1, len(drawn), kind if kind != "random" else f"plan {i + 1}")
    return result


def scatter(result: Validation, path: Path) -> Path:
    """Predicted vs measured latency and speedup, with the ±10% band, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..files import save_with

    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    panels = (("latency (ms, median)", lambda s: (s.measured_ms, s.predicted_ms), result.within_10,
               result.mean_abs_error),
              ("speedup over the dense network", lambda s: (s.measured_speedup, s.predicted_speedup),
               result.speedup_within_10, result.speedup_mean_abs_error))
    for ax, (what, point, within, mape) in zip(axes, panels):
        values = [v for s in result.samples for v in point(s)]
        lo, hi = min(values) * 0.85, max(values) * 1.15
        ax.plot([lo, hi], [lo, hi], "k-", lw=1, label="exact")
        ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="0.85", label="±10%")
        for samples, style in (([s for s in result.random if not s.removed], {"s": 18, "label": "random plans"}),
                               (result.removing,
                                {"s": 22, "marker": "s", "label": "random plans removing residual branches"}),
                               (result.ladder, {"s": 40, "marker": "^", "label": "uniform filter ladder"})):
            if samples:
                ax.scatter(*zip(*map(point, samples)), zorder=3, **style)
        for s in result.ladder:
            ax.annotate(s.kind.split()[-1], point(s), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel=f"measured {what}", ylabel=f"predicted {what}",
               title=f"{what}\nrandom plans: {within:.0%} within ±10%, MAPE {mape:.1%}")
        ax.legend(loc="upper left")
    threads = result.setting["threads"]
    fig.suptitle(f"{result.model}: {len(result.random)} random plans and {len(result.ladder)} of the uniform filter "
                 f"ladder\n{result.setting['device']}, {result.setting.get('layout', BEFORE['layout'])}, batch "
                 f"{result.setting['batch_size']}, {threads} "
                 f"thread{'s' if threads != 1 else ''}; dense net now {result.drift:.2f}x its profiled latency")
    fig.tight_layout()
    save_with(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return Path(path)
