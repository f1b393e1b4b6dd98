"""The StructADMM paper's CPU figure on this machine: AlexNet at ~15x fewer conv MACs, measured.

tv:alexnet at 224x224 with seeded untrained weights (latency depends on which weights are zero,
not on their values). For each sparsity type, one rate on all five convs, bisected until the
compacted convs do 15x fewer MACs; Torch-Pruning's own (magnitude, uniform) filter pruning at the
same conv MACs; mixes of one structured type on conv1 (3 input channels, 11x11 kernels:
filters there leave few, badly blocked outputs) and another on the rest, at the same MACs; and
per-conv filter rates allocated by the product's latency model (`allocated`: a channels-last
profile of the network, taken first on this CPU, about 2 minutes) at the same MACs.
Each masked model is compacted and timed beside its masked dense form, as the conv stack
(`features`) and as the whole network, at batch 1 and 8, 1 thread; then each conv's compact form
is timed alone on its real input beside the dense conv, so that the gap between MACs and speed
shows where it is lost. The paper reports 11.93x on the conv stack (its CPU, its kernels).

Run alone on a quiet machine: `taskset -c 1 python bench/paper_alexnet.py [--tag=MACHINE]` (`--tag`: appended
to the results' names).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine_tag, record  # noqa: E402

from sparsesearch.compact import dependencies, pruned  # noqa: E402
from sparsesearch.layers import trace  # noqa: E402
from sparsesearch.models import create  # noqa: E402
from sparsesearch.plan import LayerSparsity, Plan  # noqa: E402
from sparsesearch.profiler import LatencyModel  # noqa: E402
from sparsesearch.profiler.measure import Target, profile_model  # noqa: E402
from sparsesearch.profiler.predictor import predict_compacted  # noqa: E402
from sparsesearch.profiler.timing import compare  # noqa: E402
from sparsesearch.runtime import LAYOUTS, set_threads  # noqa: E402
from sparsesearch.space import MAX_RATE  # noqa: E402
from sparsesearch.sparsity import SparsityType, aligned_keep  # noqa: E402

MODEL, SHAPE = "tv:alexnet", (3, 224, 224)
TARGET = 15.0  # fewer conv MACs, the paper's AlexNet compression
PAPER = 11.93
TYPES = (SparsityType.FILTER, SparsityType.CHANNEL, SparsityType.SHAPE, SparsityType.IRREGULAR)
BATCHES = (1, 8)
STRUCTURED = (SparsityType.FILTER, SparsityType.CHANNEL, SparsityType.SHAPE)
MIXES = [(first, rest) for first in STRUCTURED for rest in STRUCTURED if first != rest]


def fresh(base: nn.Module) -> nn.Module:
    model = create(MODEL, in_channels=SHAPE[0]).eval()
    model.load_state_dict(base.state_dict())
    return model


def conv_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def conv_macs(model: nn.Module) -> int:
    """Conv MACs per sample of a plain (uncompacted) model, e.g. one Torch-Pruning shrank."""
    return sum(layer.macs for layer in trace(model, SHAPE) if layer.kind == "conv")


def build(base: nn.Module, deps: object, plan: Plan) -> tuple[nn.Module, nn.Module, int]:
    """The masked model, its compacted form, and the compacted convs' MACs per sample."""
    masked, compacted = pruned(base, plan, SHAPE, deps)
    convs = set(conv_names(base))
    return masked, compacted.model, sum(m for name, m in compacted.macs.items() if name in convs)


def mixed(layers: list, first: SparsityType, rest: SparsityType, t: float) -> Plan:
    """`first` on the first conv, `rest` on the others, each layer keeping about the same fraction
    of its MACs: filter and channel at rate t (a middle conv also loses inputs to its producer's
    removed filters, so it keeps about (1-t)^2), shape and irregular at 1 - (1-t)^2."""
    def rate(kind: SparsityType) -> float:
        return t if kind.couples_layers else 1 - (1 - t) ** 2
    return Plan({layer.name: LayerSparsity(kind, rate(kind))
                 for layer, kind in zip(layers, [first] + [rest] * (len(layers) - 1))})


def bisect(reduction: Callable[[float], float], low: float = 0.0, high: float = 0.999, steps: int = 14) -> float:
    """The rate at which `reduction` (increasing in the rate) reaches TARGET."""
    for _ in range(steps):
        mid = (low + high) / 2
        low, high = (mid, high) if reduction(mid) < TARGET else (low, mid)
    return high


def allocated(base: nn.Module, deps: object, layers: list, dense_macs: int, latency: LatencyModel) -> Plan:
    """Per-conv filter rates that `latency` (the product's model of this network on this CPU)
    predicts fastest at TARGET fewer conv MACs, none above the search space's MAX_RATE, every conv
    keeping a multiple of the profile's output step (the width at which this device's latency steps:
    16 in channels-last here). NetAdapt's allocation, blind to accuracy as every arm here is
    (untrained weights): from the dense model, each step removes one output step of filters from
    the conv whose predicted latency falls most per MAC removed, until the target is reached; then
    steps are given back, least predicted latency per MAC first, while the target still holds."""
    step = int(latency.profile.steps.get("out", 1))
    dense = {layer.name: base.get_submodule(layer.name).out_channels for layer in layers}
    least = {n: aligned_keep(c, MAX_RATE, step) for n, c in dense.items()}  # what the space keeps at its most

    def plan(kept: dict[str, int]) -> Plan:
        return Plan({n: LayerSparsity(SparsityType.FILTER, 1 - k / dense[n]) for n, k in kept.items() if k < dense[n]})

    def cost(kept: dict[str, int]) -> tuple[float, int]:
        _, compacted, macs = build(base, deps, plan(kept))
        return predict_compacted(latency, base, compacted, SHAPE).total_ms, macs

    kept = {n: step * (c // step) for n, c in dense.items()}
    ms, macs = cost(kept)
    while dense_macs / macs < TARGET:
        moves = [(n, {**kept, n: k - step}) for n, k in kept.items() if k - step >= least[n]]
        scored = [(cost(fewer), n, fewer) for n, fewer in moves]
        (ms, macs), _, kept = max(scored, key=lambda s: (ms - s[0][0]) / max(macs - s[0][1], 1))
    while True:
        moves = [(n, {**kept, n: k + step}) for n, k in kept.items() if k + step <= dense[n]]
        scored = [(c, n, more) for n, more in moves if dense_macs / (c := cost(more))[1] >= TARGET]
        if not scored:
            return plan(kept)
        (ms, macs), _, kept = min(scored, key=lambda s: (s[0][0] - ms) / max(s[0][1] - macs, 1))


def latency_model(base: nn.Module) -> LatencyModel:
    """The product's latency model of `base` (filter-wise) on this CPU, channels-last, from a fresh profile."""
    with tempfile.TemporaryDirectory() as folder:
        run = profile_model(Target(MODEL, base, SHAPE), torch.device("cpu"), types=[SparsityType.FILTER.value],
                            out=Path(folder) / "profile.json", layout="channels-last")
        return LatencyModel().fit(run.profile)


def torch_pruned(base: nn.Module, ratio: float) -> nn.Module:
    """Torch-Pruning's MetaPruner with magnitude importance at one ratio on every conv (linears kept)."""
    import torch_pruning as tp

    model = fresh(base)
    tp.pruner.MetaPruner(model, torch.randn(1, *SHAPE), importance=tp.importance.GroupMagnitudeImportance(p=2),
                         pruning_ratio=ratio, ignored_layers=[m for m in model.modules() if isinstance(m, nn.Linear)]
                         ).step()
    return model.eval()


def layer_inputs(model: nn.Module, names: list[str], x: Tensor) -> dict[str, Tensor]:
    """What each named layer receives on input x (hooks removed before anything is timed)."""
    seen: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(lambda _, args, n=n: seen.__setitem__(n, args[0])) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


class _On(nn.Module):
    """A layer on its own input whatever it is called with: compare() gives all models one x."""

    def __init__(self, layer: nn.Module, x: Tensor) -> None:
        super().__init__()
        self.layer, self.x = layer, x

    def forward(self, _: Tensor) -> Tensor:
        return self.layer(self.x)


def timed(dense: nn.Module, pruned: nn.Module, x: Tensor, x_pruned: Tensor | None = None) -> tuple[float, float]:
    """Speedup of `pruned` over `dense` on x (or on x_pruned, a layer's own smaller input), median
    of interleaved rounds, and the dense ms."""
    if x_pruned is not None:
        dense, pruned = _On(dense, x), _On(pruned, x_pruned)
    t = compare({"dense": dense, "pruned": pruned}, x, rounds=9, reference="dense")
    return 1 / t["pruned"].relative, t["dense"].median_ms


def measure(arm: str, masked: nn.Module, pruned: nn.Module, macs: int,
            dense_macs: int) -> tuple[list[dict], list[dict]]:
    """Whole-model rows (conv stack and network, each batch and layout) and per-conv rows of one arm;
    in each layout the dense and the compacted model both run in it, input and weights."""
    rows, layers = [], []
    names = conv_names(masked)
    for layout, memory_format in LAYOUTS.items():
        masked, pruned = (model.to(memory_format=memory_format) for model in (masked, pruned))
        pruned_modules, masked_modules = dict(pruned.named_modules()), dict(masked.named_modules())
        for batch in BATCHES:
            x = torch.randn(batch, *SHAPE).contiguous(memory_format=memory_format)
            stack, stack_ms = timed(masked.features, pruned.features, x)
            network, _ = timed(masked, pruned, x)
            rows.append({"arm": arm, "layout": layout, "batch": batch,
                         "conv MAC reduction": round(dense_macs / macs, 2),
                         "conv stack speedup": round(stack, 2), "network speedup": round(network, 2),
                         "dense conv stack ms": round(stack_ms, 2)})
            print(rows[-1], flush=True)
            dense_in, pruned_in = layer_inputs(masked, names, x), layer_inputs(pruned, names, x)
            for name in names:
                layer = pruned_modules[name]
                speedup, ms = timed(masked_modules[name], layer, dense_in[name], pruned_in[name])
                layers.append({"arm": arm, "layout": layout, "batch": batch, "layer": name,
                               "form": getattr(layer, "impl", "conv"), "dense ms": round(ms, 3),
                               "speedup": round(speedup, 2)})
    return rows, layers


def main() -> None:
    set_threads(1)
    suffix = machine_tag(sys.argv[1:])[0]
    begin = time.time()
    torch.manual_seed(0)
    base = create(MODEL, in_channels=SHAPE[0]).eval()
    deps = dependencies(base, SHAPE)
    traced = trace(base, SHAPE)
    layers = [layer for layer in traced if layer.kind == "conv"]
    dense_macs = sum(layer.macs for layer in layers)
    linear_macs = sum(layer.macs for layer in traced if layer.kind == "linear")

    def at_target(plan_at: Callable[[float], Plan]) -> tuple[float, tuple[nn.Module, nn.Module, int]]:
        rate = bisect(lambda r: dense_macs / build(base, deps, plan_at(r))[2])
        return rate, build(base, deps, plan_at(rate))

    arms: dict[str, tuple[nn.Module, nn.Module, int]] = {}
    for kind in TYPES:
        rate, built = at_target(lambda r, kind=kind: Plan.uniform(layers, kind, r))
        arms[f"{kind.value} {rate:.3f}"] = built
    ratio = bisect(lambda r: dense_macs / conv_macs(torch_pruned(base, r)))
    tp_model = torch_pruned(base, ratio)
    arms[f"torch-pruning {ratio:.3f}"] = (fresh(base), tp_model, conv_macs(tp_model))
    for first, rest in MIXES:
        t, built = at_target(lambda t, first=first, rest=rest: mixed(layers, first, rest, t))
        arms[f"{first.value} on conv1, {rest.value} on the rest, t {t:.3f}"] = built
    plan = allocated(base, deps, layers, dense_macs, latency_model(base))
    arms["filter, rates by the latency model: " + " ".join(f"{s.rate:.2f}" for s in plan.layers.values())] = build(
        base, deps, plan)
    rows, per_layer = [], []
    for arm, built in arms.items():
        r, lay = measure(arm, *built, dense_macs)
        rows, per_layer = rows + r, per_layer + lay
    best = {layout: max((row for row in rows if row["layout"] == layout), key=lambda row: row["conv stack speedup"])
            for layout in LAYOUTS}
    cap = (dense_macs + linear_macs) / (dense_macs / TARGET + linear_macs)
    summary = (f"{MODEL} at {SHAPE[1]}x{SHAPE[2]}, seeded untrained weights, 1 thread, median of 9 interleaved rounds. "
               f"Each arm's rate is bisected to {TARGET:g}x fewer conv MACs as compacted; a mix puts one type on "
               f"conv1 and another on the rest (`mixed`). Each arm runs in both layouts, the dense model in the same "
               "one. Best conv stack: " + "; ".join(
                   f"{layout}, {b['arm']} at batch {b['batch']}, {b['conv stack speedup']}x "
                   f"({b['conv MAC reduction']}x fewer conv MACs)" for layout, b in best.items()) + ". The "
               f"paper reports {PAPER}x on its CPU. The classifier's {linear_macs / 1e6:.1f}M MACs per image stay "
               f"dense in every arm, so the whole network's MAC reduction is {cap:.1f}x at most. "
               f"Took {time.time() - begin:.0f} s.")
    print(record(f"paper_alexnet{suffix}", rows, summary))
    print(plot(rows, RESULTS / f"paper_alexnet{suffix}.png"))
    record(f"paper_alexnet_layers{suffix}", per_layer, "Per conv, each arm's compact form timed alone on its real "
           "input beside the dense conv in the same layout (1 thread, median of 9 interleaved rounds); `form` is the "
           "kernel that ran.")


def plot(rows: list[dict], path: Path) -> Path:
    """Each arm's measured conv stack speedup per layout and batch, beside its MAC reduction and the paper's figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(row["arm"] for row in rows))
    runs = [(layout, batch) for layout in LAYOUTS for batch in BATCHES]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(arms) + 1.5))
    height = 0.8 / len(runs)
    for i, (layout, batch) in enumerate(runs):
        speed = {row["arm"]: row["conv stack speedup"] for row in rows
                 if (row["layout"], row["batch"]) == (layout, batch)}
        ax.barh([a + (i - (len(runs) - 1) / 2) * height for a in range(len(arms))], [speed[arm] for arm in arms],
                height=height, label=f"{layout}, batch {batch}", color=f"C{i}")
    macs = {row["arm"]: row["conv MAC reduction"] for row in rows}
    ax.scatter([macs[arm] for arm in arms], range(len(arms)), marker="|", s=200, color="black",
               label="conv MAC reduction")
    ax.axvline(PAPER, color="C3", ls="--", lw=1, label=f"paper, its CPU ({PAPER}x)")
    ax.set_yticks(range(len(arms)), arms, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("conv stack speedup over the dense AlexNet in the same layout, measured (x), 1 thread")
    ax.set_title(f"{MODEL} at {SHAPE[1]}x{SHAPE[2]}, every arm at ~{TARGET:g}x fewer conv MACs", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
