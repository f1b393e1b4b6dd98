"""Physical compaction. This first part reads the dependency graph for what pruning must respect:
- coupling groups: prunable layers whose output channels are tied together (the convs feeding one
  residual addition, a depthwise conv and its producer), so filter pruning must keep the same
  indices in all of them or nothing can be removed;
- followers: the BatchNorms normalising a layer's output channels. A pruned filter must zero its
  BatchNorm entries too, or BN(0) = beta - gamma*mean/std leaves a constant "ghost" channel that
  the masked model uses and the compacted model cannot have.

The dependency graph is Torch-Pruning's: it follows every operator of a traced forward, so a
sparsity type never needs to know about residual blocks.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .layers import prunable, trace
from .plan import Plan
from .sparsity import SparsityType


@dataclass
class Dependencies:
    couplings: list[list[str]] = field(default_factory=list)  # two or more layers, definition order
    # layer -> (BatchNorm name, the BN channel each of the layer's filters feeds); after a
    # concatenation a BatchNorm holds many layers' channels, each at its own offset
    followers: dict[str, list[tuple[str, list[int]]]] = field(default_factory=dict)


def dependencies(model: nn.Module, input_shape: tuple[int, ...]) -> Dependencies:
    """Coupling groups and BatchNorm followers of every prunable layer, from one traced forward."""
    import torch_pruning as tp

    modules = prunable(model)
    names = {m: n for n, m in model.named_modules()}
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():  # Torch-Pruning warns about ops it treats as element-wise
            warnings.simplefilter("ignore")
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=torch.zeros(1, *input_shape, device=next(model.parameters()).device))
            groups = {name: graph.get_pruning_group(m, _out_handler(m), idxs=list(range(m.weight.shape[0])))
                      for name, m in modules.items()}
    finally:
        model.train(was_training)
    order = list(modules)
    found = Dependencies()
    for name, group in groups.items():
        outputs = [(dep.target.module, list(idxs)) for dep, idxs in group
                   if getattr(dep.handler, "__name__", "") == "prune_out_channels"]
        members = sorted({names[m] for m, _ in outputs if isinstance(m, nn.Module) and names.get(m) in modules},
                         key=order.index)
        found.followers[name] = [(names[m], idxs) for m, idxs in outputs if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if len(members) > 1 and members not in found.couplings:
            found.couplings.append(members)
    found.couplings.sort(key=lambda g: order.index(g[0]))
    return found


def _out_handler(layer: nn.Module):  # noqa: ANN202 - a Torch-Pruning handler
    import torch_pruning as tp

    return tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels


def couplings(model: nn.Module, input_shape: tuple[int, ...]) -> list[list[str]]:
    """Groups of layers whose output channels must be pruned together."""
    return dependencies(model, input_shape).couplings


@dataclass
class Compacted:
    """A physically smaller model and how each planned layer was compacted."""

    model: nn.Module
    impl: dict[str, str]  # layer -> "filters-removed", "reduced-gemm", "csr", "semi-structured", "dense-fallback"
    macs: dict[str, int]  # per prunable layer, per sample, after every removal (consumers' freed inputs too)


def compact(model: nn.Module, plan: Plan, input_shape: tuple[int, ...], deps: Dependencies | None = None) -> Compacted:
    """A copy of a hard-pruned (masked) model with pruned filters physically removed and the other
    types run by compact kernels; in eval mode its outputs equal the masked model's.

    Filters go through the dependency graph, so BatchNorms, consumers' input channels, residual
    partners and depthwise convs shrink with them. Channel sparsity runs as a reduced GEMM over the
    kept input channels (exact and local; removing them at the producer is future work).
    """
    import torch_pruning as tp

    from .kernels import compact_layer

    model = copy.deepcopy(model).eval()
    deps = deps or dependencies(model, input_shape)
    modules = dict(model.named_modules())
    impl: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    for name, spec in plan.layers.items():
        if spec.type != SparsityType.FILTER or name in impl:
            continue
        layer = modules[name]
        dead = layer.weight.detach().reshape(layer.weight.shape[0], -1).eq(0).all(1).nonzero().flatten().tolist()
        graph.get_pruning_group(layer, _out_handler(layer), idxs=dead).prune()
        for member in next((g for g in deps.couplings if name in g), [name]):
            impl[member] = "filters-removed"
    macs = {layer.name: layer.macs_with(modules[layer.name].weight.detach(), plan.layers[layer.name].type)
            if layer.name in plan.layers else layer.macs for layer in trace(model, input_shape)}
    for name, spec in plan.layers.items():
        if spec.type == SparsityType.FILTER:
            continue
        kind = SparsityType.SHAPE if spec.type == SparsityType.CHANNEL else spec.type
        replacement = compact_layer(modules[name], kind)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, replacement)
        impl[name] = replacement.impl
    return Compacted(model, impl, macs)


def verified_compact(masked: nn.Module, plan: Plan, input_shape: tuple[int, ...], deps: Dependencies,
                     model_name: str, tolerance: float = 1e-4) -> Compacted:
    """compact(), then a check on a random batch that the compacted model reproduces the masked one:
    never hand back a silently different model (channel-mixing norms such as ConvNeXt's LayerNorm,
    grouped convs and channel shuffles are not handled yet)."""
    unsupported = ("filter pruning across grouped convs, channel shuffles and channel-mixing norms is not "
                   "compacted yet; prune those layers with shape, irregular or nm")
    try:
        result = compact(masked, plan, input_shape, deps)
        x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(next(masked.parameters()).device)
        with torch.inference_mode():
            expected, got = masked.eval()(x), result.model(x)
    except (RuntimeError, ValueError, IndexError, ZeroDivisionError) as e:
        raise UserError(f"cannot compact {model_name} with this plan ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]}); {unsupported}") from e
    error = ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
    if error > tolerance:
        raise UserError(f"compacted {model_name} differs from the pruned model (relative error {error:.2g} > "
                        f"{tolerance:g}); {unsupported}")
    return result


@dataclass
class Measured:
    """A pruned checkpoint compacted and timed beside its masked dense form, on one device."""

    compacted: Compacted
    params: dict[str, int]
    macs: dict[str, int]
    latency_ms: dict[str, float]
    spread: dict[str, float]
    speedup: float
    setting: dict[str, object]


def compact_checkpoint(path: Path, device: torch.device, batch_size: int, data_dir: Path | None = None) -> Measured:
    """`sparsesearch compact`: rebuild a pruned checkpoint, compact it, time dense vs compacted."""
    from . import checkpoint
    from .profiler.timing import compare
    from .train import prepare

    meta = checkpoint.read_meta(path)
    if meta.get("kind") != "pruned":
        raise UserError(f"{path} is a {meta.get('kind', 'unknown')} checkpoint; compact the output of `sparsesearch prune`")
    masked, data = prepare(meta["model"], meta["dataset"], data_dir, weights=path)
    deps = dependencies(masked, data.input_shape)
    plan = Plan.load(Path(path).parent / meta["plan"])
    layers = trace(masked, data.input_shape)
    plan.validate(layers, deps.couplings)
    result = verified_compact(masked, plan, data.input_shape, deps, meta["model"])
    models = {"dense": masked.eval().to(device), "compacted": result.model.to(device)}
    timings = compare(models, torch.randn(batch_size, *data.input_shape, device=device))
    return Measured(
        result,
        {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()},
        {"dense": sum(layer.macs for layer in layers), "compacted": sum(result.macs.values())},
        {k: t.median_ms for k, t in timings.items()},
        {k: t.spread for k, t in timings.items()},
        timings["dense"].median_ms / timings["compacted"].median_ms,
        {"device": str(device), "batch_size": batch_size, "threads": torch.get_num_threads(),
         "rounds": timings["dense"].rounds, "mode": "inference_mode, eval"},
    )
