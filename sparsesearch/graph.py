"""What pruning must respect, read off Torch-Pruning's dependency graph of one traced forward:
- channel spaces (`Coupling`): prunable layers whose output channels are tied together (the convs
  feeding one residual addition, a depthwise conv and its producer, the producers of a
  concatenation that feeds either), so filter pruning must keep the same positions in all of them
  or nothing can be removed;
- the BatchNorm channels at each position. A pruned filter must zero its BatchNorm entries too,
  or BN(0) = beta - gamma*mean/std leaves a constant "ghost" channel that the masked model uses and
  the compacted model cannot have;
- the layers whose dependencies cannot be followed (`Dependencies.fixed`), with the reason.

The graph follows every operator, so a sparsity type never needs to know about residual blocks.
Torch-Pruning 1.6 on torch 2.x mis-maps some reshapes (attention heads, window partitions) as
flattens whose index lists multiply without bound, and its traversal does not end on a tensor split
by channel slices (RexNet's partial-channel residual); `unfollowable` finds both before any traversal.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import brief
from .layers import prunable

# Errors Torch-Pruning raises on graphs it cannot cut (index errors on grouped convs, zero
# divisions on channel shuffles, ...): any of them only means "leave these channels dense".
SURGERY_ERRORS = (RuntimeError, ValueError, IndexError, KeyError, TypeError, ZeroDivisionError, AssertionError)


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
    """A model's channel spaces, and what could not be read off its graph."""

    spaces: list[Coupling] = field(default_factory=list)  # every prunable layer in exactly one
    problem: str = ""  # why the graph is unknown, if it is: then filters cannot be removed
    fixed: dict[str, str] = field(default_factory=dict)  # layer -> why its dependencies cannot be followed
    input_shape: tuple[int, ...] = ()  # one sample, as traced: what a probe forward through the model needs
    # layers that may collapse to their identity path (`sparsity.identity_mask`) when removed: they keep
    # their input's shape, no residual path bypasses them (there removal drops the branch), and no other
    # layer's filters are tied to theirs
    collapsible: frozenset[str] = frozenset()

    @property
    def couplings(self) -> list[list[str]]:
        """Groups of two or more layers whose output channels must be pruned together."""
        return [list(c.layers) for c in self.spaces if len(c.layers) > 1]

    def space(self, layer: str) -> Coupling | None:
        """The channel space a layer's filters belong to; None when the graph is unknown."""
        return next((c for c in self.spaces if layer in c.layers), None)


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
    fixed, groups = {}, {}
    try:
        graph = build_graph(model, input_shape)
        for name, m in modules.items():
            if why := unfollowable(graph, m, out_handler(m)):
                fixed[name] = why
            else:
                groups[name] = graph.get_pruning_group(m, out_handler(m), idxs=list(range(m.weight.shape[0])))
    except SURGERY_ERRORS as e:
        return Dependencies(problem=f"Torch-Pruning cannot build the dependency graph ({brief(e)})",
                            input_shape=tuple(input_shape))
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
    spaces = channels.spaces(list(modules))
    alone = {n for c in spaces if len(c.layers) == 1 for n in c.layers}
    collapsible = frozenset(n for n, m in modules.items()
                            if n in alone and n not in fixed and _keeps_shape(m) and not _bypassed(graph, m))
    return Dependencies(spaces, fixed=fixed, input_shape=tuple(input_shape), collapsible=collapsible)


def _keeps_shape(module: nn.Module) -> bool:
    """Whether a layer's output has its input's shape, channel for channel (so an identity could stand in)."""
    if isinstance(module, nn.Linear):
        return module.in_features == module.out_features
    if not isinstance(module, nn.Conv2d) or module.groups != 1 or module.in_channels != module.out_channels:
        return False
    if module.padding == "same":  # an even kernel pads unevenly: its centre tap is not the identity
        return all(s == 1 and k % 2 for s, k in zip(module.stride, module.kernel_size))
    padding = (0, 0) if module.padding == "valid" else module.padding
    return all(s == 1 and d * (k - 1) == 2 * p
               for s, d, k, p in zip(module.stride, module.dilation, module.kernel_size, padding))


def _bypassed(graph, module: nn.Module) -> bool:  # noqa: ANN001 - a Torch-Pruning DependencyGraph
    """Whether the network's output is reachable from the layer's input without passing through it
    (a residual shortcut); unknown, so True, for a layer that reads the network's input."""
    node = graph.module2node[module]
    seen, todo = {node}, list(node.inputs)
    if not todo:
        return True
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if not current.outputs:
            return True
        todo += current.outputs
    return False


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


def out_handler(layer: nn.Module):  # noqa: ANN202 - a Torch-Pruning handler
    import torch_pruning as tp

    return tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels


def couplings(model: nn.Module, input_shape: tuple[int, ...]) -> list[list[str]]:
    """Groups of layers whose output channels must be pruned together."""
    return dependencies(model, input_shape).couplings


def build_graph(model: nn.Module, input_shape: tuple[int, ...]):  # noqa: ANN202 - a Torch-Pruning DependencyGraph
    """Torch-Pruning's graph of one traced forward, with the nodes it cannot follow (`_mis_mapped`,
    `_split_by_slices`) found once, for `unfollowable`."""
    import torch_pruning as tp

    with warnings.catch_warnings():  # Torch-Pruning warns about ops it treats as element-wise
        warnings.simplefilter("ignore")
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    graph.sparsesearch_blocked = {**_mis_mapped(graph), **_split_by_slices(graph)}
    return graph


def unfollowable(graph, module: nn.Module, handler) -> str | None:  # noqa: ANN001
    """Why Torch-Pruning cannot follow `handler`'s channels of `module` (and get_pruning_group
    would fail, or grow without bound), or None. Follows the dependencies its traversal would, over
    (node, handler) pairs without index lists, so at most twice the graph's nodes are visited."""
    import torch_pruning as tp

    if module not in graph.module2node:
        return "the traced forward uses its weight without calling it as a module, so its channels cannot be followed"
    blocked = graph.sparsesearch_blocked
    if isinstance(module, nn.Conv2d) and module.groups == module.out_channels > 1 and handler is out_handler(module):
        handler = tp.pruner.function.prune_depthwise_conv_out_channels  # as Torch-Pruning itself switches
    start = (graph.module2node[module], handler)
    seen, todo = {start}, [start]
    while blocked and todo:
        node, fn = todo.pop()
        if node in blocked:
            return f"its channels reach {blocked[node]}"
        for dep in node.dependencies:
            if dep.is_triggered_by(fn) and (dep.target, dep.handler) not in seen:
                seen.add((dep.target, dep.handler))
                todo.append((dep.target, dep.handler))
    return None


def _mis_mapped(graph) -> dict:  # noqa: ANN001 - a Torch-Pruning DependencyGraph
    """Reshape nodes carrying a flatten index mapping that is not one: node -> a description.

    Torch-Pruning 1.6 looks for `_saved_self_sizes`, which torch 2.x calls `_saved_self_sym_sizes`,
    and falls back to mapping every reshape whose channel counts differ as a flatten of stride
    out // in. Genuine: a channel-first flatten (N, C, *rest) whose stride is prod(rest) (VGG's
    512x7x7 -> 25088), or the unflatten of an (N, C). An attention head split or a window partition
    is not, and each hop through it multiplies the index lists.
    """
    from torch_pruning.dependency.index_mapping import _FlattenIndexMapping
    from torch_pruning.ops import OPTYPE

    found = {}
    for node in graph.module2node.values():
        if node.type != OPTYPE.RESHAPE:
            continue
        sizes = next((tuple(int(n) for n in getattr(node.grad_fn, a)) for a in ("_saved_self_sym_sizes", "_saved_self_sizes")
                      if hasattr(node.grad_fn, a)), None)
        touching = list(node.dependencies) + [d for n in node.inputs + node.outputs for d in n.dependencies if d.target is node]
        for dep in touching:
            for mapping in dep.index_mapping:
                if not isinstance(mapping, _FlattenIndexMapping):
                    continue
                stride = mapping._stride
                flatten = dep.target is node and dep.source in node.inputs or dep.source is node and dep.target in node.inputs
                genuine = sizes is not None and (len(sizes) >= 3 and math.prod(sizes[2:]) == stride if flatten
                                                 else len(sizes) == 2 and sizes[1] % stride == 0)
                if not genuine:
                    found[node] = (f"a reshape of {list(sizes) if sizes else '?'}, which Torch-Pruning maps as a "
                                   "flatten (its index lists would grow without bound)")
    return found


def _split_by_slices(graph) -> dict:  # noqa: ANN001 - a Torch-Pruning DependencyGraph
    """Slice nodes of a tensor that two or more slices split (RexNet's `cat([x[:, :c] + s, x[:, c:]])`):
    node -> a description. Torch-Pruning 1.6 follows such a split round the concatenation that
    joins it again, its index lists shifting on every pass, for minutes."""
    from torch_pruning.ops import OPTYPE

    found = {}
    for node in graph.module2node.values():
        slices = [n for n in node.outputs if n.type == OPTYPE.SLICE]
        if len(slices) >= 2:
            found.update({n: ("a tensor split by channel slices (x[:, :c], x[:, c:]), which Torch-Pruning cannot "
                              "follow (its traversal does not end)") for n in slices})
    return found


def reads_through_reshape(graph, layer: nn.Module) -> bool:  # noqa: ANN001 - a DependencyGraph
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


