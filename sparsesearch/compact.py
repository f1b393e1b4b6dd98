"""Physical compaction: a hard-pruned (masked) model made physically smaller with equal outputs,
removing filters and channels through Torch-Pruning's dependency graph (`graph`), other types
through compact kernels (`kernels`); checked against the masked model (`Reference`)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import UserError, brief
from .graph import (SURGERY_ERRORS, Dependencies, build_graph, dependencies, out_handler, reads_through_reshape,
                    unfollowable)
from .layers import trace
from .plan import LayerSparsity, Plan
from .runtime import DEFAULT_LAYOUT, LAYOUTS, in_layout, is_channels_last, layout_of
from .sparsity import REMOVED, SparsityType, collapsed, identity_mask, live_groups


@dataclass
class Compacted:
    """A physically smaller model and how each planned layer was compacted."""

    model: nn.Module
    # layer -> "filters-removed", "branch-removed", "channels-removed", "channels-gathered", "reduced-gemm",
    # "csr", "semi-structured", "dense-fallback"
    impl: dict[str, str]
    # per prunable layer, per sample, as it runs: after every removal (consumers' freed inputs too),
    # sparse kernels counting their non-zeros, dense fallbacks every weight
    macs: dict[str, int]
    left_dense: dict[str, str] = field(default_factory=dict)  # planned layer -> why it runs dense


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
    dead = _emptied(masked, plan)
    try:
        reference = Reference(masked, _batch(masked, input_shape))
        constant = "" not in reference.expected
    except Unverifiable:
        if not dead:
            raise
        constant = True
    if dead and constant:
        raise UserError(f"filter rate {REMOVED:g} empties {', '.join(dead)}, and no residual path bypasses "
                        f"{'it' if len(dead) == 1 else 'them'}: the network's output is the same for every input; "
                        "remove a layer whole only inside a residual branch or where it keeps its input's shape, "
                        "or give it a rate below 1")
    exact = lambda m: reference.error(m) <= _TOLERANCE  # noqa: E731
    model, left_dense, _ = _remove_channels(masked, _cuts(plan, dead), input_shape, exact)
    model, gone = _remove_branches(model, dead, input_shape, reference, left_dense)
    modules = dict(model.named_modules())
    layers = trace(model, input_shape)
    impl: dict[str, str] = {n: BRANCH_REMOVED for n in plan.layers if n in gone}
    impl |= {n: COLLAPSED for n in _collapse(model, _collapsing(modules, plan, dead), input_shape, reference)}
    for name, spec in plan.layers.items():
        if name in impl:
            continue
        if spec.type == SparsityType.FILTER:
            impl[name] = "dense-fallback" if name in left_dense else "filters-removed"
        elif spec.type == SparsityType.CHANNEL and live_groups(modules[name].weight, SparsityType.CHANNEL).all():
            impl[name] = "channels-removed"
    for name, spec in plan.layers.items():
        if name in impl:
            continue
        replacement = compact_layer(modules[name], spec.type)
        model.set_submodule(name, replacement)
        impl[name] = replacement.impl
        if replacement.impl == "dense-fallback":
            left_dense[name] = replacement.why
    macs = {layer.name: layer.macs if impl.get(layer.name, "dense-fallback") == "dense-fallback"
            else layer.macs_with(modules[layer.name].weight.detach(), plan.layers[layer.name].type) for layer in layers}
    macs |= {name: 0 for name in gone}
    macs |= {layer.name: layer.positions * modules[layer.name].weight.shape[0] for layer in layers
             if impl.get(layer.name) == COLLAPSED}  # one multiply-add per output element
    return Compacted(model, impl, macs, {n: why for n, why in left_dense.items() if n in plan.layers})


def _collapsing(modules: dict[str, nn.Module], plan: Plan, dead: list[str]) -> list[str]:
    """Layers planned removed that kept their identity path (`sparsity.identity_mask`): only each
    filter's own channel at the centre tap is left."""
    return [n for n, s in plan.layers.items() if s.type == SparsityType.FILTER and s.rate == REMOVED
            and n not in dead and collapsed(modules[n].weight)]


def _emptied(masked: nn.Module, plan: Plan) -> list[str]:
    """Filter-pruned layers without a filter left (their residual branch goes whole, or nothing does)."""
    modules = dict(masked.named_modules())
    return [n for n, s in plan.layers.items() if s.type == SparsityType.FILTER
            and not live_groups(modules[n].weight, SparsityType.FILTER).any()]


def _batch(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    """The fixed random batch of two a compaction is checked on, on the model's device."""
    return torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(next(model.parameters()).device)


def _cuts(plan: Plan, dead: list[str]) -> list[tuple[str, SparsityType]]:
    """The planned layers whose filters or input channels `_remove_channels` removes, filters first."""
    cuts = [(n, s.type) for n, s in plan.layers.items() if s.type == SparsityType.FILTER and n not in dead]
    return cuts + [(n, s.type) for n, s in plan.layers.items() if s.type == SparsityType.CHANNEL]


@dataclass
class Slim:
    """A masked model's smaller copy to train: the filters and channels `compact` removes, removed,
    and the layers of removed residual branches that compute only zeros replaced by `Zeros`;
    nothing else changed (no kernel, no constant), so it trains like any module and its training is
    the masked model's, at the cost of its MACs. `index` maps each state entry back: per dim, the
    masked model's indices it keeps (None: all); entries of the layers replaced have none (their
    weights take no gradient, and in the masked model compute zeros whatever they hold)."""

    model: nn.Module
    index: dict[str, list[Tensor | None]]

    def take(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Entries of the masked model's state (or of tensors shaped like them) as the slim model has them."""
        return {n: t[_at(self.index[n], t)] for n, t in state.items() if n in self.index}

    def masks(self, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """The masked model's masks as the slim model's, those left all ones dropped."""
        return {n: m for n, m in self.take(masks).items() if not bool(m.all())}

    def write_back(self, model: nn.Module) -> None:
        """Copy the slim model's parameters and buffers into the masked `model` it was made from."""
        state = self.model.state_dict()
        with torch.no_grad():
            for name, full in model.state_dict().items():
                if name in self.index:
                    full[_at(self.index[name], full)] = state[name].to(full.device, full.dtype)


def slimmed(masked: nn.Module, plan: Plan, input_shape: tuple[int, ...]) -> Slim | None:
    """`masked` with the filters and channels `compact` would remove removed, and the layers of its
    removed residual branches that compute only zeros replaced (`_zero_branches`), to be trained in
    its place (`Slim`); None where nothing would be removed, or where the removal could not be
    mapped back to `masked` exactly (every state entry is checked). Why the branches: resnet56 with
    6 of each stage's 9 blocks removed trained at nearly the dense network's cost, its removed
    blocks' convs computing zeros, while their last BatchNorm's shift is all they leave."""
    dead = _emptied(masked, plan)
    cuts = _cuts(plan, dead)
    if not cuts and not dead:
        return None
    training = masked.training
    try:
        reference = Reference(masked, _batch(masked, input_shape))
        exact = lambda m: reference.error(m) <= _TOLERANCE  # noqa: E731
        model, _, removals = _remove_channels(masked, cuts, input_shape, exact)
        zeroed = _zero_branches(model, dead, input_shape, exact)
    except (*SURGERY_ERRORS, Unverifiable):
        return None
    finally:
        masked.train(training)
    index = _index(masked.state_dict(), model.state_dict(), removals)
    if index is None or not zeroed and all(i is None for dims in index.values() for i in dims):
        return None
    return Slim(model.train(training), index)


class Zeros(nn.Module):
    """A layer of a removed residual branch in a `Slim` model: the zeros it computes there (its own
    filters removed, or only zeros coming in and no bias), at no cost, in its input's layout (a
    model training channels-last stays so)."""

    def __init__(self, module: nn.Conv2d | nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.geometry = _geometry(module)
        self.channels = module.out_channels if isinstance(module, nn.Conv2d) else module.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros((x.shape[0], self.channels, *_out_size(self.geometry, x)))
        return in_layout(out, "channels-last") if is_channels_last(x) else out


def _zero_branches(model: nn.Module, dead: list[str], input_shape: tuple[int, ...],
                   exact: Callable[[nn.Module], bool]) -> list[str]:
    """Replace, in place, the convs and BatchNorms of `dead` layers' branches that compute zeros in
    training as in evaluation by `Zeros`; their names. Such a layer is the dead one, a BatchNorm
    whose scale and shift are removed with it, or a conv without bias whose output is zero (all it
    reads is): each output checked zero on the reference batch, the result checked `exact`, else
    nothing is replaced. What the branch leaves (its last BatchNorm's shift) trains as before."""
    if not dead:
        return []
    graph = build_graph(model, input_shape)
    names = graph._module2name
    modules = {names[n.module]: n.module for d in dead for n in _branch(graph, model.get_submodule(d))
               if n.module in names and isinstance(n.module, (nn.Conv2d, nn.modules.batchnorm._BatchNorm))}
    zero = {n: a for n, a in _activations(model, _batch(model, input_shape), list(modules)).items() if n}

    def silent(name: str, module: nn.Module) -> bool:
        if name not in zero or zero[name].any():
            return False
        if isinstance(module, nn.Conv2d):
            return name in dead or module.bias is None
        return all(p is None or not p.any() for p in (module.weight, module.bias))

    chosen = [n for n, m in modules.items() if silent(n, m)]
    for name in chosen:
        model.set_submodule(name, Zeros(modules[name]))
    if chosen and not exact(model):
        for name in chosen:
            model.set_submodule(name, modules[name])
        return []
    return chosen


def _index(full: dict[str, Tensor], slim: dict[str, Tensor], removals: dict[str, dict[str, list[list[int]]]]
           ) -> dict[str, list[Tensor | None]] | None:
    """Per state entry of the slim model, the indices along each dim it keeps of the full one, from
    the channels removed per module and side (a weight's dim 0 is its output side, dim 1 its input;
    a BatchNorm's one dim either); None unless every entry is the full one taken at them."""
    index: dict[str, list[Tensor | None]] = {}
    for name, value in slim.items():
        whole = full.get(name)
        if whole is None or whole.dim() != value.dim():
            return None
        sides = removals.get(name.rpartition(".")[0], {})
        dims: list[Tensor | None] = []
        for d, (n, m) in enumerate(zip(whole.shape, value.shape)):
            kept = None if n == m else next((k for side in (("out", "in") if d == 0 else ("in",) if d == 1 else ())
                                            if side in sides and len(k := _kept(n, sides[side])) == m), None)
            if n != m and kept is None:
                return None
            dims.append(None if kept is None else torch.tensor(kept))
        index[name] = dims
        if not torch.equal(whole[_at(dims, whole)], value):
            return None
    return index


def _at(dims: list[Tensor | None], full: Tensor) -> tuple[Tensor, ...]:
    """Advanced indices that take, from a masked model's state entry `full`, the slim model's."""
    return tuple((torch.arange(n, device=full.device) if i is None else i.to(full.device))
                 .view([-1 if k == d else 1 for k in range(full.dim())])
                 for d, (n, i) in enumerate(zip(full.shape, dims)))


def _kept(size: int, removals: list[list[int]]) -> list[int]:
    """Which of `size` channels remain after removing each list of (then current) positions in turn."""
    kept = list(range(size))
    for idxs in removals:
        gone = set(idxs)
        kept = [k for i, k in enumerate(kept) if i not in gone]
    return kept


def pruned(model: nn.Module, plan: Plan, input_shape: tuple[int, ...], deps: Dependencies | None = None
           ) -> tuple[nn.Module, Compacted]:
    """A copy of `model` (eval, float32, CPU) hard-pruned by `plan` (its projections as masks: what a
    compacted model must match and what it is timed beside) and its compacted form. Pass `deps`
    (the model's dependencies) to skip recomputing them and checking the plan against them."""
    from .admm import apply_masks, prune_masks

    masked = copy.deepcopy(model).cpu().float().eval()
    if deps is None:
        deps = dependencies(masked, input_shape)
        plan.validate(trace(masked, input_shape), deps.couplings)
    apply_masks(masked, prune_masks(masked, plan, deps))
    return masked, compact(masked, plan, input_shape)


def removable(model: nn.Module, input_shape: tuple[int, ...], deps: Dependencies,
              groups: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Of `groups` (layers whose filters go together), those whose filters, all removed, leave a
    residual branch that `compact` replaces by a constant (a block dropped), or a layer collapsed to
    its identity path (`COLLAPSED`: a plain network's layer that keeps its input's shape), tried on `model`, and
    that can all go at once: a plan may remove any of them together (fewer removed leave more
    paths). Not each alone: a net's two branches may each be removable and yet be all the paths
    there, and a plan removing both trained masked to a constant and was refused at export.
    The one-layer groups are tried all at once (where each branch is a block of its own), and a
    set the model cannot lose whole is halved until its parts can go (tv:densenet121's 120 convs,
    which all removed leave a constant); groups of several layers (whose removal usually silences
    a whole stream) one at a time. Then all those found at once, in one compaction where they can
    go together, else halved, each half beside the halves kept before it."""
    def going(tried: list[tuple[str, ...]], kept: tuple[tuple[str, ...], ...] = (),
              grow: bool = False) -> list[tuple[str, ...]]:
        """Those of `tried` that can go beside `kept`: all at once, else by halves (`grow`: each
        half beside the groups found in the halves before it too)."""
        plan = Plan({n: LayerSparsity(SparsityType.FILTER, REMOVED) for g in (*kept, *tried) for n in g})
        try:
            impl = pruned(model, plan, input_shape, deps)[1].impl
        except (*SURGERY_ERRORS, Unverifiable, UserError):
            if len(tried) == 1:
                return []
            first = going(tried[:len(tried) // 2], kept, grow)
            return first + going(tried[len(tried) // 2:], (*kept, *first) if grow else kept, grow)
        return [g for g in tried if all(impl.get(n) in (BRANCH_REMOVED, COLLAPSED) for n in g)]

    found = going(single) if (single := [g for g in groups if len(g) == 1]) else []
    found += [g for g in groups if len(g) > 1 and going([g])]
    found = going(found, grow=True) if len(found) > 1 else found
    return [g for g in groups if g in found]


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
        """The largest relative max error |got - expected| / max|expected| over the compared points
        (not a `ChannelAffine`'s: it computes its layer and the BatchNorm folded into it)."""
        folded = {n for n, m in model.named_modules() if isinstance(m, ChannelAffine)}
        got = _activations(model, self.x, [n for n in self.expected if n not in folded])
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
                     exact: Callable[[nn.Module], bool]
                     ) -> tuple[nn.Module, dict[str, str], dict[str, dict[str, list[list[int]]]]]:
    """A copy of the masked model with the cuts' dead channels removed, the layers left dense, and
    the removals made (`_cut`'s record, for `slimmed` to map the copy back).

    All cuts at once, checked once; should the result not be exact, again one cut at a time,
    each checked and undone if it changes the output (slow, and only for graphs that surprise).
    """
    model, left_dense, removals = copy.deepcopy(masked), {}, {}
    try:
        graph = build_graph(model, input_shape)
    except SURGERY_ERRORS as e:
        why = f"Torch-Pruning cannot build the dependency graph ({brief(e)})"
        return model, {n: why for n, kind in cuts if kind == SparsityType.FILTER}, {}
    try:
        for name, kind in cuts:
            _cut(graph, name, kind, left_dense, removals)
        if exact(model):
            return model, left_dense, removals
    except SURGERY_ERRORS:
        pass
    model, left_dense, removals = copy.deepcopy(masked), {}, {}
    graph = build_graph(model, input_shape)
    for name, kind in cuts:
        backup, noted = copy.deepcopy(model), copy.deepcopy(removals)
        try:
            _cut(graph, name, kind, left_dense, removals)
            why = None if exact(model) else "removing them changes the output"
        except SURGERY_ERRORS as e:
            why = f"Torch-Pruning failed ({brief(e)})"
        if why:
            model, graph, removals = backup, build_graph(backup, input_shape), noted
            if kind == SparsityType.FILTER:
                left_dense[name] = why
    return model, left_dense, removals


BRANCH_REMOVED = "branch-removed"  # the `impl` of a planned layer whose residual branch was replaced by a constant


class Vanished(nn.Module):
    """A layer inside a removed residual branch: a tensor without channels, at the size the layer's
    output has, so that the branch's remaining steps (an activation called on it) cost nothing."""

    impl = BRANCH_REMOVED

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.geometry = _geometry(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0], 0, *_out_size(self.geometry, x)))


class Constant(nn.Module):
    """Where a removed residual branch ends: the constant it leaves (filters all removed, what
    follows adds its bias: a BatchNorm's shift), per channel ((C, 1, 1) for a plane), broadcast over
    the batch and the plane as a view; with `materialize`, as a tensor of its own, for a forward that
    adds into it in place (torchvision's `out += identity`)."""

    impl = BRANCH_REMOVED

    def __init__(self, module: nn.Module, value: torch.Tensor) -> None:
        super().__init__()
        self.geometry = _geometry(module)
        self.materialize = False
        self.register_buffer("value", value.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.value.expand(x.shape[0], self.value.shape[0], *_out_size(self.geometry, x))
        return out.clone() if self.materialize else out


def _geometry(module: nn.Module) -> list[int]:
    """A conv's padding, kernel, stride and dilation per side (h first), or [] for a layer that
    keeps the plane's size; ints, so that a scripted export keeps them."""
    if not isinstance(module, nn.Conv2d):
        return []
    from .kernels import _Geometry

    g = _Geometry.of(module)
    return [g.pads[2] + g.pads[3], g.pads[0] + g.pads[1], *g.kernel_size, *g.stride, *g.dilation]


def _out_size(geometry: list[int], x: torch.Tensor) -> list[int]:
    """The plane a layer of `geometry` makes of x's (none for a 2-D x)."""
    if x.dim() < 3:
        return []
    if not geometry:
        return list(x.shape[2:])
    ph, pw, kh, kw, sh, sw, dh, dw = geometry
    return [(x.shape[2] + ph - dh * (kh - 1) - 1) // sh + 1, (x.shape[3] + pw - dw * (kw - 1) - 1) // sw + 1]


COLLAPSED = "collapsed"  # the `impl` of a planned layer collapsed to its identity path: a per-channel multiply-add


class ChannelAffine(nn.Module):
    """A collapsed layer (`sparsity.identity_mask`), the BatchNorm after it folded in: per channel
    x * scale + shift, one call where a conv and a BatchNorm were two. vgg16-bn at the weight-norm
    seed's widths at 0.9 (near Torch-Pruning's 0.9) with 8 of its 9 collapsible convs collapsed ran
    1.54x as fast as Torch-Pruning's 0.9 at batch 1, 1.23x at 8 (AMD EPYC, 1 thread;
    bench/results/collapse-vgg16-bn-fashion-mnist.md)."""

    impl = COLLAPSED

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x, self.scale)


def _collapse(model: nn.Module, names: list[str], input_shape: tuple[int, ...], reference: Reference) -> list[str]:
    """Replace, in place, each named collapsed layer by a `ChannelAffine`, with the BatchNorm that
    alone reads it folded in (evaluation statistics); those replaced, each checked exact."""
    if not names:
        return []
    graph = build_graph(model, input_shape)
    done = []
    for name in names:
        layer = model.get_submodule(name)
        node = graph.module2node[layer]
        after = node.outputs[0].module if len(node.outputs) == 1 and node.outputs[0].inputs == [node] else None
        foldable = isinstance(after, nn.modules.batchnorm._BatchNorm) and after.running_var is not None
        scale = layer.weight.detach()[identity_mask(layer.weight)]  # channel by channel: the mask's row-major order
        shift = layer.bias.detach() if layer.bias is not None else torch.zeros_like(scale)
        norm_name = graph._module2name.get(after) if foldable else None
        if foldable:
            factor = torch.rsqrt(after.running_var + after.eps) * (after.weight if after.affine else 1)
            scale, shift = scale * factor, (shift - after.running_mean) * factor
            shift = shift + after.bias if after.affine else shift
        view = (-1, *[1] * (layer.weight.dim() - 2))
        model.set_submodule(name, ChannelAffine(scale.detach().view(view), shift.detach().view(view)))
        if norm_name:
            model.set_submodule(norm_name, nn.Identity())
        if reference.error(model) <= _TOLERANCE:
            done.append(name)
            continue
        model.set_submodule(name, layer)
        if norm_name:
            model.set_submodule(norm_name, after)
    return done


_KEEPS_SHAPE = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish,
                nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout)


def _remove_branches(model: nn.Module, dead: list[str], input_shape: tuple[int, ...], reference: Reference,
                     left_dense: dict[str, str]) -> tuple[nn.Module, set[str]]:
    """The model with each dead layer's branch (the layer, whose filters are all removed, and all
    that only it feeds) replaced by the constant the branch leaves where it joins the rest (a
    residual addition), and the names of the layers so removed. A dead layer whose branch cannot be
    replaced exactly goes to `left_dense` (it then runs masked)."""
    gone: set[str] = set()
    for name in dead:
        if name in gone:  # inside a branch removed already
            continue
        backup = copy.deepcopy(model)
        try:
            why = _replace_branch(model, name, input_shape, reference, gone)
        except (*SURGERY_ERRORS, Unverifiable) as e:
            why = f"its branch could not be replaced ({brief(e)})"
        if why:
            model, left_dense[name] = backup, why
    return model, gone


def _replace_branch(model: nn.Module, name: str, input_shape: tuple[int, ...], reference: Reference,
                    gone: set[str]) -> str | None:
    """Replace one dead layer's branch in place (`_remove_branches`); why it could not, or None."""
    graph = build_graph(model, input_shape)
    names = graph._module2name
    region = _branch(graph, model.get_submodule(name))
    exits = [n for n in region if not n.outputs or any(o not in region for o in n.outputs)]
    if any(not n.outputs for n in exits):
        return "removing it leaves the network's output constant"
    ends, todo = set(), list(exits)
    while todo:  # the layers whose outputs leave the branch, directly or through functional steps
        node = todo.pop()
        if node.module in names:
            ends.add(node)
        else:
            todo += [i for i in node.inputs if i in region]
    layers = {names[n.module]: n.module for n in region if n.module in names}
    if odd := [n for n, m in layers.items() if not isinstance(m, (nn.Conv2d, *_KEEPS_SHAPE))]:
        return f"its branch holds {odd[0]} ({type(layers[odd[0]]).__name__}), which a removed branch cannot follow"
    values = {n: a for n, a in _activations(model, reference.x, [names[e.module] for e in ends]).items() if n}
    for end, value in values.items():
        channel = value[:1].flatten(2).transpose(1, 2)[..., :1, :] if value.dim() > 2 else value[:1]
        if (value - channel.reshape(1, -1, *[1] * (value.dim() - 2))).abs().max() > 1e-6 * value.abs().max():
            return f"what its branch leaves at {end} is not one constant per channel"
        values[end] = channel.reshape(-1, *[1] * (value.dim() - 2))  # (C, 1, 1): broadcast over a plane
    for layer, module in layers.items():
        model.set_submodule(layer, Constant(module, values[layer]) if layer in values else Vanished(module))
    for materialize in (False, True):
        for module in model.modules():
            if isinstance(module, Constant):
                module.materialize = materialize
        try:
            if reference.error(model) <= _TOLERANCE:
                gone.update(n for n, m in layers.items() if isinstance(m, nn.Conv2d))
                return None
        except RuntimeError:  # a forward that adds into the view in place
            continue
    return "replacing its branch by a constant changes the output"


def _branch(graph, module: nn.Module) -> set:  # noqa: ANN001 - a Torch-Pruning graph and its Nodes
    """The graph nodes of `module`'s branch: it, and every node all of whose inputs come from the branch."""
    names = graph._module2name
    start = graph.module2node[module]
    region, todo = {start}, [start]
    while todo:
        for node in todo.pop().outputs:
            if node not in region and all(i in region for i in node.inputs) and not _reads_outside(node, names):
                region.add(node)
                todo.append(node)
    return region


def _reads_outside(node, names: dict) -> bool:  # noqa: ANN001 - a Torch-Pruning Node
    """Whether a functional step (an addition, a concatenation) also reads a tensor the graph has no
    node for: the network's input (a residual block right on it) or a buffer, which autograd records
    as None. Such a step joins the branch to the rest, whatever its listed inputs say."""
    return node.module not in names and any(f is None for f, _ in getattr(node.grad_fn, "next_functions", ()))


def _cut(graph, name: str, kind: SparsityType, left_dense: dict[str, str],  # noqa: ANN001
         removals: dict[str, dict[str, list[list[int]]]]) -> None:
    """Remove one planned layer's dead filters (with everything coupled to them), or its dead input
    channels wherever no other layer reads them; layers that cannot be cut go to `left_dense`, and
    what is removed is noted in `removals` (per module, per side: the positions removed, in turn)."""
    import torch_pruning as tp

    layer = graph.model.get_submodule(name)
    dead = (~live_groups(layer.weight, kind)).nonzero().flatten().tolist()
    if kind == SparsityType.FILTER:
        if name in left_dense or not dead:
            return
        if why := unfollowable(graph, layer, out_handler(layer)):
            left_dense[name] = why
            return
        group = graph.get_pruning_group(layer, out_handler(layer), idxs=dead)
    else:
        handler = tp.prune_conv_in_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_in_channels
        if (not dead or isinstance(layer, nn.Conv2d) and layer.groups != 1 or unfollowable(graph, layer, handler)
                or reads_through_reshape(graph, layer)):  # unfollowable first: it knows layers the trace never called
            return
        dead = _unread(graph.get_pruning_group(layer, handler, idxs=dead))
        if not dead:
            return
        group = graph.get_pruning_group(layer, handler, idxs=dead)
    why = _blocker(group, graph._module2name)
    if not why:
        for dep, idxs in group:
            side = _SIDES.get(getattr(dep.handler, "__name__", ""))
            module = graph._module2name.get(dep.target.module)
            if side and module is not None:
                removals.setdefault(module, {}).setdefault(side, []).append([int(i) for i in idxs])
        group.prune()
    elif kind == SparsityType.FILTER:  # the whole coupled group stays
        left_dense.update({graph._module2name[dep.target.module]: why for dep, _ in group
                           if isinstance(dep.target.module, (nn.Conv2d, nn.Linear))
                           and getattr(dep.handler, "__name__", "") == "prune_out_channels"})


_SIDES = {"prune_out_channels": "out", "prune_in_channels": "in"}  # Torch-Pruning's handlers, by the side they cut


def _unread(group) -> list[int]:  # noqa: ANN001 - a Torch-Pruning Group
    """Root indices of the group's channels that every layer reading them reads with zero weights
    and that some layer produces (the model's input channels stay)."""
    produced, read = False, set()
    for item in group.items:
        module, handler = item.dep.target.module, getattr(item.dep.handler, "__name__", "")
        produced |= handler == "prune_out_channels" and isinstance(module, (nn.Conv2d, nn.Linear))
        if handler == "prune_in_channels" and isinstance(module, (nn.Conv2d, nn.Linear)):
            live = module.weight.detach().transpose(0, 1).flatten(1).ne(0).any(1).tolist()  # per input channel
            read |= {root for idx, root in zip(item.idxs, item.root_idxs) if live[idx]}
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
    """compact(), then a check on a fresh random batch, in each memory layout (compact layers take
    other paths for a channels-last input), that the compacted model reproduces the masked one:
    never hand back a silently different model."""
    try:
        result = compact(masked, plan, input_shape)
        x = torch.randn(3, *input_shape, generator=torch.Generator().manual_seed(1)).to(next(masked.parameters()).device)
        error = max(Reference(masked, in_layout(x, layout)).error(result.model) for layout in LAYOUTS)
    except Unverifiable as e:
        raise UserError(f"cannot verify the compacted {model_name}: {e} (random or dead weights?); "
                        "train it first, or load weights") from e
    except SURGERY_ERRORS as e:
        raise UserError(f"cannot compact {model_name} with this plan ({brief(e)})") from e
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
            batch_size: int, channels_last: bool = False) -> Measured:
    """Compact a hard-pruned model (verified) and time it beside its masked dense form, side by side
    in one run on `device`, with params and MACs of both: every measured speedup comes from here.
    The model is compacted where it is, then moved to `device`. With `channels_last` both run in
    that layout, weights and input (a CPU deployment's choice: oneDNN's own layout, and the one
    shape-wise layers gather fastest in); they are handed back in the default layout."""
    from .kernels import stored_weights
    from .profiler.timing import compare

    result = verified_compact(masked, plan, input_shape, model_name)
    dense_macs = sum(layer.macs for layer in trace(masked, input_shape))
    layout = layout_of(channels_last)
    models = {"dense": in_layout(masked.eval().to(device), layout), "compacted": in_layout(result.model.to(device),
                                                                                          layout)}
    timings = compare(models, in_layout(torch.randn(batch_size, *input_shape, device=device), layout),
                      reference="dense")
    for model in models.values():
        in_layout(model, DEFAULT_LAYOUT)
    return Measured(
        result,
        {k: stored_weights(m) for k, m in models.items()},
        {"dense": dense_macs, "compacted": sum(result.macs.values())},
        {k: t.median_ms for k, t in timings.items()},
        {k: t.spread for k, t in timings.items()},
        1 / timings["compacted"].relative,  # per-round ratios: immune to the machine changing speed between rounds
        {"device": str(device), "batch_size": batch_size, "threads": torch.get_num_threads(),
         "rounds": timings["dense"].rounds, "mode": "inference_mode, eval",
         "layout": layout},
    )


def compact_checkpoint(path: Path, device: torch.device, batch_size: int, data_dir: Path | None = None,
                       model: str | None = None, image_size: int | None = None,
                       channels_last: bool = False) -> Measured:
    """`sparsesearch compact`: rebuild a pruned checkpoint, then `measure` it (in `channels_last`).
    `model` confirms a factory of the user's own that the sidecar names (`models.recorded`),
    `image_size` the side."""
    from . import checkpoint
    from .train import prepare

    meta = checkpoint.read_meta(path)
    if meta.get("kind") != "pruned":
        raise UserError(f"{path} is a {meta.get('kind', 'unknown')} checkpoint; compact the output of `sparsesearch prune`")
    name, dataset = checkpoint.trained_with(path, model, None)
    masked, data = prepare(name, dataset, data_dir, image_size=image_size, weights=path)
    plan = Plan.load(Path(path).parent / meta["plan"])
    plan.validate(trace(masked, data.input_shape), dependencies(masked, data.input_shape).couplings)
    measured = measure(masked, plan, data.input_shape, name, device, batch_size, channels_last)
    measured.origin = {"model": name, "dataset": dataset, "input_shape": list(data.input_shape),
                       "plan": plan.to_dict(), "source": str(path)}
    return measured
