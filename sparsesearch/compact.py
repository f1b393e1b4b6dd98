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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .layers import prunable, trace
from .plan import Plan
from .sparsity import SparsityType, live_groups


@dataclass
class Coupling:
    """One space of output channels: the prunable layers whose filters are tied there, each filter
    at its position, and the BatchNorm channels that normalise those positions. A residual addition
    ties filter k of every member to position k; a concatenation gives each producer its own slice,
    so that after cat([a, b]) feeds an addition, a's filter k and b's filter k sit at positions k
    and len(a) + k."""

    layers: dict[str, list[int]]  # layer -> the position of each of its filters, definition order
    norms: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)  # BN -> (channels, positions)

    @property
    def size(self) -> int:
        return 1 + max(max(p) for p in self.layers.values())


@dataclass
class Dependencies:
    spaces: list[Coupling] = field(default_factory=list)  # every prunable layer in exactly one
    problem: str = ""  # why the graph is unknown, if it is: then filters cannot be removed

    @property
    def couplings(self) -> list[list[str]]:
        """Groups of two or more layers whose output channels must be pruned together."""
        return [list(c.layers) for c in self.spaces if len(c.layers) > 1]

    def space(self, layer: str) -> Coupling:
        """The coupling a layer's filters belong to (alone in its own when the graph is unknown)."""
        return next((c for c in self.spaces if layer in c.layers), None) or Coupling({layer: []})


def dependencies(model: nn.Module, input_shape: tuple[int, ...]) -> Dependencies:
    """The output-channel spaces (`Coupling`) of every prunable layer, from one traced forward.

    Torch-Pruning gives, per layer, the group of tensors its filters reach, with each reached
    index paired to the filter it comes from (`root_idxs`); joining those pairs across all groups
    gives the channel spaces exactly, even where a concatenation makes the groups of its producers
    overlap. A graph Torch-Pruning cannot build (ShuffleNet's channel shuffle) gives none, and
    `problem`."""
    modules = prunable(model)
    was_training = model.training
    model.eval()
    try:
        graph = _graph(model, input_shape)
        groups = {name: graph.get_pruning_group(m, _out_handler(m), idxs=list(range(m.weight.shape[0])))
                  for name, m in modules.items()}
    except _SURGERY_ERRORS as e:
        return Dependencies(problem=f"Torch-Pruning cannot build the dependency graph ({_brief(e)})")
    finally:
        model.train(was_training)
    names = graph._module2name
    channels = _Channels()
    for name, m in modules.items():
        for f in range(m.weight.shape[0]):
            channels.find((name, f))
    for name, group in groups.items():
        for item in group.items:
            target = item.dep.target.module
            if getattr(item.dep.handler, "__name__", "") != "prune_out_channels" or not isinstance(target, nn.Module):
                continue
            if (names.get(target) in modules or isinstance(target, nn.modules.batchnorm._BatchNorm)) and \
                    _one_to_one(item.idxs, item.root_idxs, _out_channels(target)):
                for idx, root in zip(item.idxs, item.root_idxs):
                    channels.union((names[target], idx), (name, root))
    return Dependencies(channels.spaces(list(modules)))


def _out_channels(module: nn.Module) -> int:
    return module.num_features if isinstance(module, nn.modules.batchnorm._BatchNorm) else module.weight.shape[0]


def _one_to_one(idxs: list[int], roots: list[int], size: int) -> bool:
    """Whether an index mapping pairs distinct root filters with distinct channels in range. Through
    a reshape (an SE gate's Linear viewed as channels, a flatten behind a residual stream)
    Torch-Pruning can hand back repeated or out-of-range indices; such a pairing is dropped, so
    what it would tie stays apart (compaction then leaves those filters in place, checked)."""
    return (len(idxs) == len(roots) and len(set(idxs)) == len(idxs) and len(set(roots)) == len(roots)
            and all(0 <= i < size for i in idxs))


class _Channels:
    """Union-find over (module name, channel): the channels one pruning decision must remove together."""

    def __init__(self) -> None:
        self.parent: dict[tuple[str, int], tuple[str, int]] = {}

    def find(self, x: tuple[str, int]) -> tuple[str, int]:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: tuple[str, int], b: tuple[str, int]) -> None:
        self.parent[self.find(a)] = self.find(b)

    def spaces(self, layers: list[str]) -> list[Coupling]:
        """One Coupling per set of layers sharing a channel, positions numbered in definition order."""
        by_module: dict[str, list[tuple[str, int]]] = {}
        for node in sorted(self.parent, key=lambda n: n[1]):
            by_module.setdefault(node[0], []).append(node)
        tied = _Channels()  # layers sharing any channel share a space
        first_layer: dict[tuple[str, int], str] = {}
        for name in layers:
            for node in by_module[name]:
                tied.union((first_layer.setdefault(self.find(node), name), 0), (name, 0))
        spaces: dict[tuple[str, int], Coupling] = {}
        used: dict[int, int] = {}  # positions numbered so far, per space
        position: dict[tuple[str, int], tuple[Coupling, int]] = {}
        for name in layers:
            space = spaces.setdefault(tied.find((name, 0)), Coupling({}))
            space.layers[name] = []
            for node in by_module[name]:
                root = self.find(node)
                if root not in position:
                    position[root] = (space, used.get(id(space), 0))
                    used[id(space)] = position[root][1] + 1
                space.layers[name].append(position[root][1])
        for name, nodes in by_module.items():
            if name in layers:
                continue
            for node in nodes:
                if (found := position.get(self.find(node))) is not None:
                    channels, positions = found[0].norms.setdefault(name, ([], []))
                    channels.append(node[1])
                    positions.append(found[1])
        return list(spaces.values())


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
    # layer -> "filters-removed", "channels-removed", "channels-gathered", "reduced-gemm", "csr",
    # "semi-structured", "dense-fallback"
    impl: dict[str, str]
    # per prunable layer, per sample, as it runs: after every removal (consumers' freed inputs too),
    # sparse kernels counting their non-zeros, dense fallbacks every weight
    macs: dict[str, int]
    left_dense: dict[str, str] = field(default_factory=dict)  # planned layer -> why it runs dense


# Errors Torch-Pruning raises on graphs it cannot cut (index errors on grouped convs, zero
# divisions on channel shuffles, ...): any of them only means "leave these channels dense".
_SURGERY_ERRORS = (RuntimeError, ValueError, IndexError, KeyError, TypeError, ZeroDivisionError, AssertionError)
_TOLERANCE = 1e-4  # relative max error, float32


def compact(model: nn.Module, plan: Plan, input_shape: tuple[int, ...]) -> Compacted:
    """A copy of a hard-pruned (masked) model, physically smaller; in eval mode its outputs equal
    the masked model's.

    Pruned filters are removed through the dependency graph, so BatchNorms, consumers' input
    channels, residual partners and depthwise convs shrink with them. A channel-pruned layer's
    dead input channels are removed at their producer where no other layer reads them, and
    gathered away otherwise. Shape, irregular and nm layers run compact kernels. Filters whose
    removal would not be exact (channel-mixing norms, grouped convs, graphs Torch-Pruning cannot
    cut) stay in place, masked, as do layers no sparse kernel takes on this device and dtype;
    `left_dense` says why, and their MACs count dense.
    """
    from .kernels import compact_layer

    masked = model.eval()
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(next(model.parameters()).device)
    reference = Reference(masked, x)
    cuts = [(n, s.type) for n, s in plan.layers.items() if s.type == SparsityType.FILTER]
    cuts += [(n, s.type) for n, s in plan.layers.items() if s.type == SparsityType.CHANNEL]
    model, left_dense = _remove_channels(masked, cuts, input_shape, lambda m: reference.error(m) <= _TOLERANCE)
    modules = dict(model.named_modules())
    layers = trace(model, input_shape)
    impl: dict[str, str] = {}
    for name, spec in plan.layers.items():
        if spec.type == SparsityType.FILTER:
            impl[name] = "dense-fallback" if name in left_dense else "filters-removed"
        elif spec.type == SparsityType.CHANNEL and live_groups(modules[name].weight, SparsityType.CHANNEL).all():
            impl[name] = "channels-removed"
    for name, spec in plan.layers.items():
        if name in impl:
            continue
        replacement = compact_layer(modules[name], spec.type)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, replacement)
        impl[name] = replacement.impl
        if replacement.impl == "dense-fallback":
            left_dense[name] = replacement.why
    macs = {layer.name: layer.macs if impl.get(layer.name, "dense-fallback") == "dense-fallback"
            else layer.macs_with(modules[layer.name].weight.detach(), plan.layers[layer.name].type) for layer in layers}
    return Compacted(model, impl, macs, {n: why for n, why in left_dense.items() if n in plan.layers})


class Reference:
    """What a compacted copy must reproduce on a fixed batch: the masked model's output, or, where
    that output is the same for every input (a zero-initialised head, under which any compaction
    would "match"), every module output that varies, compared wherever the copy has the same shape
    or the shape left once the masked output's all-zero channels (removed filters) are dropped.
    A comparison that would prove nothing is refused: `Unverifiable`."""

    def __init__(self, masked: nn.Module, x: torch.Tensor) -> None:
        self.x = x
        output = _activations(masked, x, ())[""]
        self.expected = {"": output} if _varies(output) else {
            n: a for n, a in _activations(masked, x, None).items() if n and _varies(a)}
        if not self.expected:
            raise Unverifiable("its output and every activation are the same for every input")

    def error(self, model: nn.Module) -> float:
        """The largest relative max error |got - expected| / max|expected| over the compared points."""
        got = _activations(model, self.x, self.expected)
        errors = [((got[n] - e).abs().max() / e.abs().max()).item()
                  for n, e in ((n, _shaped(e, got[n].shape)) for n, e in self.expected.items() if n in got)
                  if e is not None]
        if not errors:
            raise Unverifiable("its output does not vary and the compacted model keeps no varying activation's shape")
        return max(errors)


def _shaped(expected: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """The masked activation as the compacted model should have it: as is, or without its all-zero
    channels (dim 1), when that gives `shape`; else None."""
    if expected.shape == shape:
        return expected
    if expected.dim() < 2:
        return None
    live = expected.transpose(0, 1).flatten(1).ne(0).any(1)
    kept = expected[:, live]
    return kept if kept.shape == shape else None


class Unverifiable(Exception):
    """A compacted model whose equality with the masked one no comparison could show."""


def _varies(t: torch.Tensor) -> bool:
    """Whether a batch of activations differs between samples (and so can tell two models apart)."""
    return t.shape[0] > 1 and bool((t - t[:1]).abs().amax() > 1e-6 * t.abs().amax())


def _activations(model: nn.Module, x: torch.Tensor, names: Iterable[str] | None) -> dict[str, torch.Tensor]:
    """One eval forward: the output under "", and the tensor outputs of the named modules (all if None)."""
    modules = dict(model.named_modules())
    found: dict[str, torch.Tensor] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: object, out: object) -> None:
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                found.setdefault(name, out.detach().clone())
        return hook

    handles = [modules[n].register_forward_hook(record(n)) for n in (modules if names is None else names)
               if n and n in modules]
    try:
        with torch.inference_mode():
            found[""] = model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return found


def _remove_channels(masked: nn.Module, cuts: list[tuple[str, SparsityType]], input_shape: tuple[int, ...],
                     exact: Callable[[nn.Module], bool]) -> tuple[nn.Module, dict[str, str]]:
    """A copy of the masked model with the cuts' dead channels removed, and the layers left dense.

    All cuts at once, checked once; should the result not be exact, again one cut at a time,
    each checked and undone if it changes the output (slow, and only for graphs that surprise).
    """
    model, left_dense = copy.deepcopy(masked), {}
    try:
        graph = _graph(model, input_shape)
    except _SURGERY_ERRORS as e:
        why = f"Torch-Pruning cannot build the dependency graph ({_brief(e)})"
        return model, {n: why for n, kind in cuts if kind == SparsityType.FILTER}
    try:
        for name, kind in cuts:
            _cut(graph, name, kind, left_dense)
        if exact(model):
            return model, left_dense
    except _SURGERY_ERRORS:
        pass
    model, left_dense = copy.deepcopy(masked), {}
    graph = _graph(model, input_shape)
    for name, kind in cuts:
        backup = copy.deepcopy(model)
        try:
            _cut(graph, name, kind, left_dense)
            why = None if exact(model) else "removing them changes the output"
        except _SURGERY_ERRORS as e:
            why = f"Torch-Pruning failed ({_brief(e)})"
        if why:
            model, graph = backup, _graph(backup, input_shape)
            if kind == SparsityType.FILTER:
                left_dense[name] = why
    return model, left_dense


def _graph(model: nn.Module, input_shape: tuple[int, ...]):  # noqa: ANN202 - a Torch-Pruning DependencyGraph
    import torch_pruning as tp

    with warnings.catch_warnings():  # Torch-Pruning warns about ops it treats as element-wise
        warnings.simplefilter("ignore")
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=torch.zeros(1, *input_shape, device=next(model.parameters()).device))


def _brief(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:100]}" if str(e) else type(e).__name__


def _cut(graph, name: str, kind: SparsityType, left_dense: dict[str, str]) -> None:  # noqa: ANN001
    """Remove one planned layer's dead filters (with everything coupled to them), or its dead input
    channels wherever no other layer reads them; layers that cannot be cut go to `left_dense`."""
    import torch_pruning as tp

    layer = graph.model.get_submodule(name)
    dead = (~live_groups(layer.weight, kind)).nonzero().flatten().tolist()
    if kind == SparsityType.FILTER:
        if name in left_dense or not dead:
            return
        group = graph.get_pruning_group(layer, _out_handler(layer), idxs=dead)
    else:
        if not dead or isinstance(layer, nn.Conv2d) and layer.groups != 1 or _reads_through_reshape(graph, layer):
            return
        handler = tp.prune_conv_in_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_in_channels
        dead = _unread(graph.get_pruning_group(layer, handler, idxs=dead))
        if not dead:
            return
        group = graph.get_pruning_group(layer, handler, idxs=dead)
    why = _blocker(group, graph._module2name)
    if not why:
        group.prune()
    elif kind == SparsityType.FILTER:  # the whole coupled group stays
        left_dense.update({graph._module2name[dep.target.module]: why for dep, _ in group
                           if isinstance(dep.target.module, (nn.Conv2d, nn.Linear))
                           and getattr(dep.handler, "__name__", "") == "prune_out_channels"})


def _reads_through_reshape(graph, layer: nn.Module) -> bool:  # noqa: ANN001 - a DependencyGraph
    """Whether a reshape (a flatten) lies between the layer and its producers. Torch-Pruning's index
    mapping then multiplies indices without merging them: VGG's 25088-feature classifier exhausts
    memory. Such layers gather their channels instead."""
    from torch_pruning.ops import OPTYPE

    seen, todo = set(), list(graph.module2node[layer].inputs)
    while todo:
        node = todo.pop()
        if id(node) in seen or node.type in (OPTYPE.CONV, OPTYPE.LINEAR, OPTYPE.DEPTHWISE_CONV):
            continue
        if node.type == OPTYPE.RESHAPE:
            return True
        seen.add(id(node))
        todo.extend(node.inputs)
    return False


def _unread(group) -> list[int]:  # noqa: ANN001 - a Torch-Pruning Group
    """Root indices of the group's channels that every layer reading them reads with zero weights
    and that some layer produces (the model's input channels stay)."""
    produced, read = False, set()
    for item in group.items:
        module, handler = item.dep.target.module, getattr(item.dep.handler, "__name__", "")
        produced |= handler == "prune_out_channels" and isinstance(module, (nn.Conv2d, nn.Linear))
        if handler == "prune_in_channels" and isinstance(module, (nn.Conv2d, nn.Linear)):
            columns = module.weight.detach().transpose(0, 1)
            read |= {root for idx, root in zip(item.idxs, item.root_idxs) if columns[idx].ne(0).any()}
    return sorted(set(group.items[0].root_idxs) - read) if produced else []


def _blocker(group, names: dict) -> str | None:  # noqa: ANN001 - a Torch-Pruning Group
    """Why removing the group's channels would not be exact or not work, or None."""
    for dep, _ in group:
        module, name = dep.target.module, names.get(dep.target.module, "?")
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            return f"{name} ({type(module).__name__}) normalises across channels, so removing one changes the others"
        if isinstance(module, nn.Conv2d) and module.groups > 1 and not module.groups == module.in_channels == module.out_channels:
            return f"{name} is a grouped conv (groups={module.groups}) that Torch-Pruning cannot cut"
    return None


def verified_compact(masked: nn.Module, plan: Plan, input_shape: tuple[int, ...], model_name: str,
                     tolerance: float = _TOLERANCE) -> Compacted:
    """compact(), then a check on a fresh random batch that the compacted model reproduces the
    masked one: never hand back a silently different model."""
    try:
        result = compact(masked, plan, input_shape)
        x = torch.randn(3, *input_shape, generator=torch.Generator().manual_seed(1)).to(next(masked.parameters()).device)
        error = Reference(masked, x).error(result.model)
    except Unverifiable as e:
        raise UserError(f"cannot verify the compacted {model_name}: {e} (random or dead weights?); "
                        "train it first, or load weights") from e
    except _SURGERY_ERRORS as e:
        raise UserError(f"cannot compact {model_name} with this plan ({_brief(e)})") from e
    if error > tolerance:
        raise UserError(f"compacted {model_name} differs from the pruned model (relative error {error:.2g} > "
                        f"{tolerance:g}); please report this model and plan")
    return result


@dataclass
class Measured:
    """A hard-pruned model compacted and timed beside its masked dense form, on one device."""

    compacted: Compacted
    params: dict[str, int]  # weights stored (`kernels.stored_weights`)
    macs: dict[str, int]
    latency_ms: dict[str, float]
    spread: dict[str, float]
    speedup: float
    setting: dict[str, object]  # how it was timed
    origin: dict[str, object] = field(default_factory=dict)  # what it came from (model, dataset, plan, ...)


def measure(masked: nn.Module, plan: Plan, input_shape: tuple[int, ...], model_name: str, device: torch.device,
            batch_size: int) -> Measured:
    """Compact a hard-pruned model (verified) and time it beside its masked dense form, side by side
    in one run on `device`, with params and MACs of both: every measured speedup comes from here.
    The model is compacted where it is, then moved to `device`."""
    from .kernels import stored_weights
    from .profiler.timing import compare

    result = verified_compact(masked, plan, input_shape, model_name)
    dense_macs = sum(layer.macs for layer in trace(masked, input_shape))
    models = {"dense": masked.eval().to(device), "compacted": result.model.to(device)}
    timings = compare(models, torch.randn(batch_size, *input_shape, device=device), reference="dense")
    return Measured(
        result,
        {k: stored_weights(m) for k, m in models.items()},
        {"dense": dense_macs, "compacted": sum(result.macs.values())},
        {k: t.median_ms for k, t in timings.items()},
        {k: t.spread for k, t in timings.items()},
        1 / timings["compacted"].relative,  # per-round ratios: immune to the machine changing speed between rounds
        {"device": str(device), "batch_size": batch_size, "threads": torch.get_num_threads(),
         "rounds": timings["dense"].rounds, "mode": "inference_mode, eval"},
    )


def compact_checkpoint(path: Path, device: torch.device, batch_size: int, data_dir: Path | None = None) -> Measured:
    """`sparsesearch compact`: rebuild a pruned checkpoint, then `measure` it."""
    from . import checkpoint
    from .train import prepare

    meta = checkpoint.read_meta(path)
    if meta.get("kind") != "pruned":
        raise UserError(f"{path} is a {meta.get('kind', 'unknown')} checkpoint; compact the output of `sparsesearch prune`")
    masked, data = prepare(meta["model"], meta["dataset"], data_dir, weights=path)
    plan = Plan.load(Path(path).parent / meta["plan"])
    plan.validate(trace(masked, data.input_shape), dependencies(masked, data.input_shape).couplings)
    measured = measure(masked, plan, data.input_shape, meta["model"], device, batch_size)
    measured.origin = {"model": meta["model"], "dataset": meta["dataset"], "input_shape": list(data.input_shape),
                       "plan": plan.to_dict(), "source": str(path)}
    return measured
