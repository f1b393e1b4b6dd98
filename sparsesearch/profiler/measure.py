"""`sparsesearch profile`: which compact layers to time for a model (the grid), and timing them.

The grid follows what compaction can produce. A layer's kept inputs come from its producers'
filter pruning (read off the model compacted at each grid rate, so flattens and concatenations
count right) or from its own channel pruning; its kept outputs from its own (coupled) filter
pruning, its counts aligned as the search aligns them (`Plan.aligned`, to the profile's channel
step), so that rows fall where plans do. Plain layers get a 2-D grid of (kept inputs, kept
outputs): the full rows and columns and the diagonal at every rate, the rest on a coarser
sub-grid. Pattern types (channel gathered, shape, irregular, nm) get every rate at full dims and
coarse rates at half-kept inputs and/or outputs.
The latency model interpolates between these points.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..files import locked
from ..layers import Layer, trace
from ..plan import Plan
from ..runtime import DEFAULT_LAYOUT, in_layout
from ..sparsity import LAYER_LOCAL, SparsityType, keep_count
from . import steps
from .build import PLAIN, Stub, Yardstick, build_layer, describe
from .table import (DTYPES, SHIPPED_PROFILES, Profile, Row, Signature, differences, find_profile, fingerprint,
                    model_key, point_key, profile_name, profiles_dir, without_unpaid)
from .timing import Timing, compare

DEFAULT_RATES = (*(round(0.1 * i, 1) for i in range(10)), 0.95)  # 0.95: the highest a space offers (`space.TOP_RATE`)
NM_RATES = (0.0, 0.25, 0.5, 0.75)  # 1 - N/4: what nm can take
TIMING = {"rounds": 5, "warmup_s": 0.02, "min_round_s": 0.008, "max_spread": 0.05, "max_rounds": 15}
# whole networks (rest, dense, calibration plans; validation): timed once per network, so longer
NETWORK_TIMING = {"rounds": 15, "warmup_s": 0.2, "min_round_s": 0.05, "max_spread": 0.1, "max_rounds": 30,
                  "retries": 2}
CALIBRATION_PLANS, CALIBRATION_SEED = 36, 10_000  # 30 or more: enough for per-call terms (InNetwork)
NEAR_DENSE = 0.7  # share of layers a near-dense calibration plan leaves dense
HEAVY_PLANS = 4  # calibration plans with every filter group at a rate of the grid's upper half
DEEP_SHARES = (0.2, 0.4, 0.6, 0.8)  # per calibration plan that removes residual branches: each one's chance
GROUP = 5  # whole compacted networks timed beside the dense one per compare() call
SLOW = 0.1  # a yardstick this far off its reference: the machine is in another state, time again
SAVE_EVERY_S = 5.0  # rows timed are written at most this often (a save of a 1000-row profile takes ~70 ms)
_YARDSTICK = "yardstick"
ProgressFn = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Point:
    """One compact layer to time."""

    signature: Signature
    type: str  # "plain" or a pattern type
    rate: float
    in_keep: int
    out_keep: int
    groups_keep: int

    @property
    def key(self) -> tuple:
        return point_key(self.signature, self.type, self.rate, self.in_keep, self.out_keep, self.groups_keep)


@dataclass
class Target:
    """A model to profile: the network, its per-sample input shape, and its name for people."""

    name: str
    model: nn.Module
    input_shape: tuple[int, ...]


def target(model_name: str, dataset: str | None = None, image_size: int | None = None) -> Target:
    """The model with the input it will see: the dataset's (default digits for digits-cnn, cifar10's
    3x32x32 otherwise), adapted to the model's channels and minimum side, without loading data."""
    from .. import data, models

    spec = models.spec(model_name)
    info = data.info(dataset or ("digits" if model_name == "digits-cnn" else "cifar10"))
    channels = spec.in_channels or info.channels
    side = max(image_size or info.size, spec.min_size)
    torch.manual_seed(0)
    net = models.create(model_name, num_classes=info.num_classes, in_channels=channels).eval()
    return Target(model_name, net, (channels, side, side))


# --- the grid -------------------------------------------------------------------------------------


def _dims_under_filter_pruning(model: nn.Module, input_shape: tuple[int, ...], layers: list[Layer],
                               rates: Iterable[float], channel_steps: dict[str, object] | None = None
                               ) -> dict[float, dict[str, tuple[int, int, int]]]:
    """(in, out, groups) of every layer once all filter-prunable layers lose filters at each rate,
    their kept counts aligned to `channel_steps`."""
    from ..graph import dependencies
    from .predictor import compacted_copy

    modules = dict(model.named_modules())
    full = {n.name: _channels(modules[n.name]) for n in layers}
    dims = {0.0: full}
    deps = dependencies(model, input_shape)
    for rate in rates:
        if rate == 0:
            continue
        plan = Plan.uniform(layers, SparsityType.FILTER, rate).aligned(layers, channel_steps or {})
        if not plan.layers:
            dims[rate] = full
            continue
        shrunk = dict(compacted_copy(model, input_shape, plan, deps).named_modules())
        dims[rate] = {n.name: _channels(shrunk[n.name]) for n in layers}
    return dims


def _channels(module: nn.Module) -> tuple[int, int, int]:
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels, module.groups
    return module.in_features, module.out_features, 1


def _coarse(rates: list[float]) -> set[float]:
    """Every third rate, with the first and last."""
    return {r for i, r in enumerate(rates) if i % 3 == 0} | {rates[0], rates[-1]}


def _middle(rates: list[float]) -> float:
    return min(rates, key=lambda r: abs(r - 0.5))


def layer_points(layer: Layer, module: nn.Module, dims: dict[float, dict[str, tuple[int, int, int]]],
                 rates: list[float], types: set[str]) -> list[Point]:
    """The grid of one layer (see the module docstring)."""
    sig = Signature.of(module, layer.in_shape)
    full_in, full_out, groups = _channels(module)
    in_by_rate = {r: dims[r][layer.name][0] for r in rates}
    out_by_rate = {r: dims[r][layer.name][1] for r in rates}
    allowed = {t.value for t in layer.types} & types
    points = [Point(sig, PLAIN, 0.0, full_in, full_out, groups)]
    if groups > 1:  # depthwise or grouped: inputs and outputs shrink together
        points += [Point(sig, PLAIN, 0.0, *dims[r][layer.name]) for r in rates]
    else:
        axes = []
        if "filter" in types:
            axes.append(in_by_rate)
        if "channel" in allowed:
            axes.append({r: keep_count(full_in, r) for r in rates})
        coarse = _coarse(rates)
        for axis in axes:
            for r_in in rates:
                for r_out in rates:
                    if r_in == 0 or r_out == 0 or r_in == r_out or (r_in in coarse and r_out in coarse):
                        points.append(Point(sig, PLAIN, 0.0, axis[r_in], out_by_rate[r_out], 1))
    mid = _middle(rates)
    mid_in = in_by_rate[mid] if "filter" in types else full_in
    shrunk = {(full_in, full_out), (mid_in, full_out), (full_in, out_by_rate[mid]), (mid_in, out_by_rate[mid])}
    for kind in sorted(allowed & {"channel", "shape", "irregular", "nm"}):
        kind_rates = list(NM_RATES) if kind == "nm" else rates
        inner = _coarse(kind_rates) - {kind_rates[0], kind_rates[-1]} or {_middle(kind_rates)}
        kept: set[int] = set()
        for rate in kind_rates:
            if kind == "channel":  # rates that keep the same channels build the same layer
                if keep_count(full_in, rate) in kept:
                    continue
                kept.add(keep_count(full_in, rate))
            cases = shrunk if rate in inner else {(full_in, full_out)}
            points += [Point(sig, kind, rate, i, o, groups) for i, o in cases]
    return points


def _first(points: list[Point]) -> set[tuple]:
    """Keys of the points timed before the rest: each layer's dense form, and each layer-local type
    at its highest rate with all channels kept, from which `Profile.unpaid` tells the types whose
    other points need no timing."""
    top: dict[tuple[Signature, str], float] = {}
    for p in points:
        top[(p.signature, p.type)] = max(top.get((p.signature, p.type), 0.0), p.rate)
    local = {k.value for k in LAYER_LOCAL}
    return {p.key for p in points if (p.in_keep, p.out_keep) == (p.signature.in_channels, p.signature.out_channels)
            and (p.type == PLAIN or (p.type in local and p.rate == top[(p.signature, p.type)]))}


def grid_of(rates: Iterable[float] = DEFAULT_RATES, types: Iterable[str] | None = None) -> tuple[list[float], set[str]]:
    """The rates (with 0, sorted) and type names a profile run covers."""
    return (sorted({round(float(r), 4) for r in rates} | {0.0}),
            {SparsityType(t).value for t in (types or [t.value for t in SparsityType])})


def grid(target_: Target, rates: Iterable[float] = DEFAULT_RATES, types: Iterable[str] | None = None,
         channel_steps: dict[str, object] | None = None) -> tuple[list[Point], dict[Signature, list[str]]]:
    """Distinct points to time for a model, and the layers behind each signature (filter counts
    aligned to the profile's `channel_steps`, as the search's are)."""
    rates, types = grid_of(rates, types)
    layers = trace(target_.model, target_.input_shape)
    dims = _dims_under_filter_pruning(target_.model, target_.input_shape, layers,
                                      rates if "filter" in types else [0.0], channel_steps)
    if "filter" not in types:
        dims = {r: dims[0.0] for r in rates}
    modules = dict(target_.model.named_modules())
    points: dict[tuple, Point] = {}
    names: dict[Signature, list[str]] = defaultdict(list)
    for layer in layers:
        for p in layer_points(layer, modules[layer.name], dims, rates, types):
            points.setdefault(p.key, p)
        names[Signature.of(modules[layer.name], layer.in_shape)].append(layer.name)
    return list(points.values()), dict(names)


# --- timing ---------------------------------------------------------------------------------------


def _input(sig: Signature, channels: int, batch_size: int, like: torch.Tensor) -> torch.Tensor:
    if sig.kind == "linear":
        shape = (batch_size, channels) if sig.input_hw[0] == 1 else (batch_size, sig.input_hw[0], channels)
    else:
        shape = (batch_size, channels, *sig.input_hw)
    return torch.randn(shape, dtype=like.dtype).to(like.device)


def _prototype(sig: Signature, device: torch.device, dtype: torch.dtype) -> nn.Module:
    if sig.kind == "linear":
        return nn.Linear(sig.in_channels, sig.out_channels, sig.bias, device=device, dtype=dtype)
    return nn.Conv2d(sig.in_channels, sig.out_channels, sig.kernel, sig.stride, sig.padding, sig.dilation,
                     sig.groups, sig.bias, device=device, dtype=dtype)


def _nearer(run: Callable[[], dict[str, Timing]], speed: Callable[[dict[str, Timing]], float]
            ) -> tuple[dict[str, Timing], float]:
    """`run`'s timings and the machine's speed in them (1: as at the reference); a run more than
    SLOW off is done once more, keeping the nearer: the slowdowns of a shared VM are not uniform
    across layers (1.5 +- 0.3x in one slow minute), so ratios and scaling alone do not undo them."""
    best: tuple[dict[str, Timing], float] | None = None
    for _ in range(2):
        t = run()
        now = speed(t)
        if best is None or abs(now - 1) < abs(best[1] - 1):
            best = (t, now)
        if abs(now - 1) <= SLOW:
            break
    return best


def _timed(models: dict[str, nn.Module], x: torch.Tensor, yardstick: Yardstick, yardstick_ms: float,
           timing: dict[str, float]) -> tuple[dict[str, tuple[float, float]], float]:
    """(ms, spread) of each model scaled to the yardstick's reference speed, and the machine's speed
    (yardstick now over its reference)."""
    t, speed = _nearer(lambda: compare({**models, _YARDSTICK: yardstick}, x, **timing, reference=_YARDSTICK),
                       lambda t: t[_YARDSTICK].median_ms / yardstick_ms)
    return {name: (t[name].relative * yardstick_ms, t[name].relative_spread) for name in models}, speed


def beside_dense(dense: nn.Module, group: dict[str, nn.Module], x: torch.Tensor, dense_ms: float,
                 timing: dict[str, float] = NETWORK_TIMING) -> dict[str, Timing]:
    """Whole compacted networks timed beside the dense one (of `dense_ms` as the profile timed it):
    each Timing's `relative` is its ratio to the dense net. A run whose dense net is more than SLOW
    off `dense_ms` found the machine in another state and is done once more."""
    return _nearer(lambda: compare({"dense": dense, **group}, x, **timing, reference="dense"),
                   lambda t: t["dense"].median_ms / dense_ms)[0]


def yardstick_ms(device: torch.device, dtype: torch.dtype, timing: dict[str, float] = NETWORK_TIMING) -> float:
    """The yardstick's latency now: the reference speed of a new profile."""
    return compare({"y": Yardstick(device, dtype)}, torch.zeros(1, device=device), **timing)["y"].median_ms


def measure_points(points: list[Point], device: torch.device, batch_size: int, dtype: torch.dtype,
                   reference_ms: float, on_rows: Callable[[list[Row], float], None],
                   timing: dict[str, float] = TIMING, layout: str = DEFAULT_LAYOUT) -> None:
    """Build and time the points, those sharing an input side by side with the yardstick (of
    `reference_ms` at the profile's start), in memory `layout`; `on_rows` gets each batch and the
    machine's speed."""
    batches: dict[tuple, list[Point]] = defaultdict(list)
    for p in points:
        batches[(p.signature, p.in_keep)].append(p)
    yardstick = Yardstick(device, dtype)
    for (sig, in_keep), batch in batches.items():
        proto = _prototype(sig, device, dtype)
        built = {str(i): build_layer(proto, p.type, p.rate, p.in_keep, p.out_keep, p.groups_keep)
                 for i, p in enumerate(batch)}
        x = in_layout(_input(sig, in_keep, batch_size, proto.weight), layout)
        timings, speed = _timed({k: in_layout(m, layout) for k, (m, _) in built.items()}, x, yardstick, reference_ms,
                                timing)
        rows = []
        for i, p in enumerate(batch):
            module, impl = built[str(i)]
            d = describe(module, p.in_keep, p.out_keep)
            ms, spread = timings[str(i)]
            rows.append(Row(sig, p.type, p.rate, p.in_keep, p.out_keep, p.groups_keep, d.weights, impl,
                            d.weights * sig.positions, ms, spread))
        on_rows(rows, speed)


def _rest(model: nn.Module, layers: list[Layer], batch_size: int) -> nn.Module:
    """The network with every prunable layer replaced by a stub: what it costs besides them."""
    rest = copy.deepcopy(model)
    like = next(model.parameters())
    for layer in layers:
        rest.set_submodule(layer.name, Stub((batch_size, *layer.out_shape), like))
    return rest


def calibration_plans(layers: list[Layer], couplings: list[list[str]], rates: list[float],
                      types: set[str], channel_steps: dict[str, object] | None = None,
                      removable: list[tuple[str, ...]] | None = None) -> list[Plan]:
    """Plans of the profiled types and rates that span what a search visits: a few with every layer
    at the lightest or the heaviest rate; the search's uniform filter ladder; a few that leave most
    layers dense (where the search's first plans and its baselines live: random plans rarely do, and
    resnet56's uniform filter 10% was predicted 14% slow without them); a few with every filter group
    at a heavy rate (the front's fast end: fitted on lighter plans, whose types mix, vgg16-bn's
    uniform filter 80% and 90% were predicted 27% and 55% slow, and the search undervalued them); a
    few that remove a fifth to four fifths of the `removable` residual branches (the seeds remove up
    to 8 of a stage's 9: without them the fit had no plan with fewer layer calls, and resnet56 with 6
    of 9 removed per stage ran 2.49x where it predicted 2.22x); the rest drawn as `profile validate`
    draws (with a seed distinct from its). Counts aligned to `channel_steps`, as the search's are."""
    import random

    from .validate import random_plan, uniform_ladder

    rng = random.Random(CALIBRATION_SEED)
    rates = tuple(rates)
    if len(rates) < 2:  # only the dense point was profiled
        return []
    chosen = [random_plan(layers, couplings, rng, (0.0, rate), 0.0, types)
              for rate in (rates[1], rates[-1]) for _ in range(2)]
    chosen += [plan for _, plan in uniform_ladder(layers, rates, types)]
    chosen += [random_plan(layers, couplings, rng, rates, NEAR_DENSE, types) for _ in range(4)]
    upper = statistics.median(rates[1:])
    heavy = (0.0, *(r for r in rates[1:] if r >= upper))
    chosen += [random_plan(layers, couplings, rng, heavy, 0.0, {SparsityType.FILTER.value})
               for _ in range(HEAVY_PLANS if SparsityType.FILTER.value in types else 0)]
    deep = random.Random(CALIBRATION_SEED + 1)  # the other plans as before where nothing is removable
    chosen += [random_plan(layers, couplings, deep, rates, types=types, removable=removable, remove_share=share,
                           removing=1.0) for share in (DEEP_SHARES if removable else ())]
    chosen += [random_plan(layers, couplings, rng, rates, types=types) for _ in range(CALIBRATION_PLANS - len(chosen))]
    return [aligned for plan in chosen if (aligned := plan.aligned(layers, channel_steps or {})).layers]


def network_plans(target_: Target, rates: list[float], types: set[str],
                  unpaid: set[tuple[str, str]] = frozenset(),
                  channel_steps: dict[str, object] | None = None) -> list[Plan]:
    """The calibration plans of `target_`'s network, of what the search can give each layer."""
    from ..graph import dependencies
    from .validate import residual_branches

    model, shape = target_.model.eval(), target_.input_shape
    layers, deps = without_unpaid(model, trace(model, shape), unpaid), dependencies(model, shape)
    return calibration_plans(layers, deps.couplings, rates, types, channel_steps,
                             residual_branches(model, shape, deps, layers, types))


def measure_network(target_: Target, device: torch.device, batch_size: int, dtype: torch.dtype,
                    rates: list[float], types: set[str], reference_ms: float, plans: list[Plan],
                    timing: dict[str, float] = NETWORK_TIMING,
                    on_plans: Callable[[int, int], None] | None = None,
                    layout: str = DEFAULT_LAYOUT) -> dict[str, object]:
    """The network's rest and the dense network, timed side by side with the yardstick (of
    `reference_ms`); then the calibration `plans` (`network_plans`) compacted, GROUP at a time beside
    the dense network, each stored as its ratio to it times the dense latency.

    A layer costs more inside a network than timed alone (weights evicted by the other layers, caches
    shared with its neighbours); the latency model fits its in-network costs to these plans. They are
    timed as `profile validate` and the search's measurement time plans (in small groups, as ratios to
    the dense net beside them): all 32 in one run put their ratios to the dense net 9% lower on
    resnet20 than groups of 5 did, a bias the fit then carried into every predicted speedup.
    `on_plans(done, total)` hears the calibration plans timed so far (minutes on a deep network).
    Every network runs in memory `layout`, input and weights."""
    from ..graph import dependencies
    from .predictor import queries
    from .validate import compactable

    model, shape = target_.model.eval(), target_.input_shape
    layers = trace(model, shape)  # before the cast: trace feeds float32 zeros
    deps = dependencies(model, shape)
    dense = in_layout(copy.deepcopy(model).to(device=device, dtype=dtype), layout)
    x = in_layout(torch.randn(batch_size, *shape, dtype=dtype).to(device), layout)
    plans = list(plans)  # each as timed: without its removals where together they cannot go
    if on_plans is not None:
        on_plans(0, len(plans))
    t, speed = _timed({"rest": _rest(dense, layers, batch_size), "dense": dense}, x, Yardstick(device, dtype),
                      reference_ms, timing)
    dense_ms = t["dense"][0]
    calibration = []
    for start in range(0, len(plans), GROUP):
        group, described = {}, {}
        for i in range(start, min(start + GROUP, len(plans))):
            plans[i], compacted = compactable(model, shape, plans[i], deps)
            described[str(i)] = {name: q.description() for name, q in queries(model, compacted, shape).items()}
            group[str(i)] = in_layout(compacted.to(device=device, dtype=dtype), layout)
        beside = beside_dense(dense, group, x, dense_ms, timing)
        calibration += [{"plan": plans[int(i)].to_dict(), "layers": described[i], "median_ms": beside[i].relative * dense_ms,
                         "spread": beside[i].relative_spread} for i in group]
        if on_plans is not None:
            on_plans(len(calibration), len(plans))
    return {"model": target_.name, "input_shape": list(shape), "median_ms": t["rest"][0], "spread": t["rest"][1],
            "dense_ms": dense_ms, "dense_spread": t["dense"][1], "speed": speed,
            "grid": {"rates": rates, "types": sorted(types)}, "calibration": calibration}


@dataclass
class ProfileRun:
    """What one `sparsesearch profile` did."""

    path: Path
    profile: Profile
    measured: int
    reused: int
    seconds: float
    slowest: list[tuple[str, float]] = field(default_factory=list)  # (layers, dense ms)
    rest: dict[str, object] = field(default_factory=dict)  # this network's rest and dense timing
    speeds: list[float] = field(default_factory=list)  # the yardstick over its reference, per timing run
    refreshed: list[str] = field(default_factory=list)  # kernels changed since the file timed them: timed anew
    skipped: int = 0  # grid points of types that buy no time here (`Profile.unpaid`): not timed
    dropped: list[str] = field(default_factory=list)  # other networks timed end to end on those kernels

    @property
    def unsteady(self) -> float:
        """Share of this run's timing runs whose yardstick stayed more than SLOW off its reference
        even when timed again: far from 0, the machine changed speed (other load; on a 2-vCPU VM,
        2 threads flip between two speeds 2.5x apart every few seconds) and the profile holds a mix."""
        return sum(abs(s - 1) > SLOW for s in self.speeds) / max(len(self.speeds), 1)


def _shipped_start(here: dict[str, object], path: Path) -> Profile | None:
    """A copy, to be written at `path`, of the shipped profile of this machine and setting, if there
    is one: its rows are not measured again, and the shipped file is never written."""
    shipped = find_profile(here, SHIPPED_PROFILES)
    if shipped is None:
        return None
    profile = Profile.load(shipped)
    profile.path = path
    return profile


def profile_model(target_: Target, device: torch.device, batch_size: int = 1, dtype: str = "float32",
                  rates: Iterable[float] = DEFAULT_RATES, types: Iterable[str] | None = None,
                  out: Path | None = None, on_progress: ProgressFn | None = None,
                  timing: dict[str, float] | None = None, layout: str = DEFAULT_LAYOUT) -> ProfileRun:
    """Time every missing grid point of the model and its rest, every network and layer in memory
    `layout`; rows are saved (atomically) every few seconds and when a phase ends or is interrupted,
    so an interrupted run resumes where it stopped."""
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; accepted: {', '.join(DTYPES)}")
    here = fingerprint(device, batch_size, dtype, layout=layout)
    path = Path(out or profiles_dir() / profile_name(here))
    waiting = "waiting for another run that is writing this profile"
    # one run per profile at a time: two would disturb each other's timings and overwrite each other's rows
    with locked(path, lambda: on_progress(0, 0, waiting) if on_progress else None):
        return _profile_into(path, out is None, here, target_, device, batch_size, dtype, rates, types,
                             on_progress, timing)


def _profile_into(path: Path, default_path: bool, here: dict[str, object], target_: Target, device: torch.device,
                  batch_size: int, dtype: str, rates: Iterable[float], types: Iterable[str] | None,
                  on_progress: ProgressFn | None, timing: dict[str, float] | None) -> ProfileRun:
    """profile_model's work, under its lock: the file is read only now, with every row another run added."""
    overrides, timing = timing or {}, {**TIMING, **(timing or {})}
    if path.exists():
        profile = Profile.load(path)
    else:  # a new file of its own (--out) starts empty; the default one from the shipped rows, if any
        profile = (default_path and _shipped_start(here, path)) or Profile(here, timing=timing, path=path)
    diff = differences(profile.fingerprint, here)
    if diff:
        raise UserError(f"{path} holds a profile measured on another setting ({'; '.join(diff)}); "
                        "write this one elsewhere with --out, or delete that file")
    profile.fingerprint = {**profile.fingerprint, "date": here["date"], "layout": here["layout"]}
    networks = dict(profile.rest)
    refreshed = profile.refresh()  # rows a changed kernel ran: measured anew below
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    if profile.yardstick_ms is None or not profile.steps:
        if on_progress:
            on_progress(0, 1, "the yardstick and this device's channel steps")
        if profile.yardstick_ms is None:  # a new profile (or one of schema 1): its reference speed is now
            profile.yardstick_ms = yardstick_ms(device, DTYPES[dtype], {**NETWORK_TIMING, **overrides})
        if not profile.steps:  # once per profile: the channel widths where this device's latency steps
            profile.steps = steps.scan(device, batch_size, DTYPES[dtype], timing, str(here["layout"]))
        profile.save(path)
        if on_progress:
            on_progress(1, 1, "the yardstick and this device's channel steps")
    rates, types = grid_of(rates, types)
    points, names = grid(target_, rates, types, profile.steps)
    todo = [p for p in points if p.key not in profile.rows]
    key = model_key(target_.model, target_.input_shape)
    whole = profile.rest.get(key, {})
    speeds: list[float] = []

    def timed(batch: list[Point], what: str) -> None:
        done, saved = 0, time.perf_counter()

        def add(rows: list[Row], speed: float) -> None:
            nonlocal done, saved
            for row in rows:
                profile.add(row)
            if time.perf_counter() - saved > SAVE_EVERY_S:
                profile.save(path)
                saved = time.perf_counter()
            done += len(rows)
            speeds.append(speed)
            if on_progress:
                layer = names.get(rows[0].signature, ["?"])[0]
                on_progress(done, len(batch), f"{what}: {layer} {rows[0].type}")

        if on_progress and batch:
            on_progress(0, len(batch), what)
        try:
            measure_points(batch, device, batch_size, DTYPES[dtype], profile.yardstick_ms, add, timing,
                           str(here["layout"]))
        finally:  # Ctrl-C included: every row timed is kept
            profile.save(path)

    first = _first(points)
    timed([p for p in todo if p.key in first], "dense layers, sparse kernels at their highest rate")
    unpaid = profile.unpaid()
    rest = [p for p in todo if p.key not in first and (p.signature.key, p.type) not in unpaid]
    timed(rest, "the rest of the grid")
    plans = network_plans(target_, rates, types, unpaid, profile.steps)
    timed_whole = (whole.get("grid") == {"rates": rates, "types": sorted(types)}
                   and [c["plan"] for c in whole.get("calibration", [])] == [plan.to_dict() for plan in plans])
    if not timed_whole:  # new, another grid's, or calibrated on other plans (an older version's)
        profile.rest[key] = measure_network(
            target_, device, batch_size, DTYPES[dtype], rates, types, profile.yardstick_ms, plans,
            {**NETWORK_TIMING, **overrides},
            on_plans=on_progress and (lambda d, t: on_progress(d, t, "calibration plans compacted and timed end to end")),
            layout=str(here["layout"]))
        speeds.append(float(profile.rest[key]["speed"]))
        profile.save(path)
    dense = {r.signature: r.median_ms for r in profile.rows.values()
             if r.type == PLAIN and (r.in_keep, r.out_keep) == (r.signature.in_channels, r.signature.out_channels)}
    slowest = sorted(((", ".join(n), dense[s]) for s, n in names.items() if s in dense), key=lambda t: -t[1])
    measured = sum(p.key in first for p in todo) + len(rest)
    return ProfileRun(path, profile, measured, len(points) - len(todo), time.perf_counter() - started, slowest[:5],
                      profile.rest[key], speeds, refreshed, len(todo) - measured,
                      [f"{v['model']} ({'x'.join(map(str, v['input_shape']))})" for k, v in networks.items()
                       if k not in profile.rest])
