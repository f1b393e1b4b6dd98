"""Sparsity types and their Euclidean projections Proj_S(W), as in StructADMM.

A conv weight W of shape (F, C/groups, kh, kw) is read as its GEMM matrix, F rows by
C/groups*kh*kw columns; a Linear weight (out, in) already is one. Each type partitions that
matrix into groups, and S is the set of weights with at most k groups non-zero:

- filter: whole rows (output filters).
- channel: the kh*kw columns of one input channel (Linear: one input column).
- shape: single columns, one (c, i, j) position across all filters (Linear: same as channel).
- irregular: single weights.
- nm: N of every M consecutive weights of a row (GPU semi-structured sparsity, 2:4 by default).

This module is pure tensor math: it chooses what to keep and knows nothing of models.
"""

import math
from collections.abc import Sequence
from enum import Enum

import torch
from torch import Tensor, nn

NM_M = 4  # block size M of nm sparsity; 4 is what GPU semi-structured (2:4) kernels use
_ROUNDING_SLACK = 1e-6  # lets rate*n reach its integer despite float error (0.57*100 = 56.99...)


class SparsityType(str, Enum):
    """The groups a projection keeps or zeroes together."""

    FILTER = "filter"
    CHANNEL = "channel"
    SHAPE = "shape"
    IRREGULAR = "irregular"
    NM = "nm"

    @property
    def couples_layers(self) -> bool:
        """Whether removing a group changes a layer's output or input channels.

        Only then must the tensors sharing those channels (a coupled group) keep the same indices.
        """
        return self in (SparsityType.FILTER, SparsityType.CHANNEL)


# types that keep a layer's dims: their speed is the layer's own, and needs a kernel of its own
LAYER_LOCAL = (SparsityType.SHAPE, SparsityType.IRREGULAR, SparsityType.NM)


def _applicability(module: nn.Module) -> tuple[tuple[SparsityType, ...], str]:
    """The types that fit a layer, and why the others do not."""
    is_conv = isinstance(module, nn.Conv2d)
    if isinstance(module, nn.Linear) or (is_conv and module.groups == 1):
        return tuple(SparsityType), ""
    if is_conv and module.weight.shape[1] == 1:
        return (SparsityType.FILTER,), (
            "a depthwise conv filter is a single kh*kw kernel on one input channel, so a channel "
            "group would be the whole layer and shape/irregular/nm would only prune inside "
            "kernels of kh*kw weights; removing whole filters is what shrinks it"
        )
    if is_conv:
        kept = (SparsityType.FILTER, SparsityType.SHAPE, SparsityType.IRREGULAR, SparsityType.NM)
        return kept, (
            "in a grouped conv, weight column c belongs to a different input channel in each "
            "group of filters, so zeroing it removes no input channel"
        )
    return (), f"{type(module).__name__} is neither nn.Conv2d nor nn.Linear"


def applicable_types(module: nn.Module) -> tuple[SparsityType, ...]:
    """Sparsity types that can be applied to a layer; empty for layers without prunable weights."""
    return _applicability(module)[0]


def check_applicable(module: nn.Module, kind: SparsityType) -> None:
    """Raise ValueError, with the reason, if `kind` cannot be applied to `module`."""
    types, reason = _applicability(module)
    if kind not in types:
        accepted = ", ".join(t.value for t in types) or "none"
        raise ValueError(
            f"{kind.value} sparsity does not apply to {module}: {reason} "
            f"(applicable: {accepted})"
        )


def _gemm_view(weight: Tensor) -> Tensor:
    """The weight as the (rows, cols) matrix its layer multiplies: F x C/groups*kh*kw."""
    return weight.reshape(weight.shape[0], -1)


def _group_view(weight: Tensor, kind: SparsityType) -> Tensor:
    """The weight as (outer, groups, inner), so that group g is view[:, g, :].

    Every group-wise function goes through this one definition of the groups.
    """
    rows = _gemm_view(weight)
    match kind:
        case SparsityType.FILTER:
            return rows.unsqueeze(0)
        case SparsityType.CHANNEL:
            return rows.reshape(rows.shape[0], weight.shape[1], -1)
        case SparsityType.SHAPE:
            return rows.unsqueeze(2)
        case SparsityType.IRREGULAR:
            return rows.reshape(1, -1, 1)
    raise ValueError("nm sparsity has no groups: it keeps N of every M weights of each row")


def num_groups(weight: Tensor, kind: SparsityType) -> int:
    """How many groups of `kind` the weight has (not defined for nm)."""
    return _group_view(weight, kind).shape[1]


def _squared_norms(view: Tensor) -> Tensor:
    """Squared L2 norm of each group of a group view, in at least float32.

    Half precision would overflow (300**2 > 65504) and tie groups that differ.
    """
    wide = view.to(torch.promote_types(view.dtype, torch.float32))
    return wide.square().sum(dim=(0, 2))


def group_scores(weight: Tensor, kind: SparsityType) -> Tensor:
    """Squared L2 norm of each group of `kind`, 1-D (irregular: w**2 flattened; not for nm)."""
    return _squared_norms(_group_view(weight, kind))


def keep_count(n_groups: int, rate: float) -> int:
    """Groups to keep when a fraction `rate` in [0, 1] of `n_groups` is removed.

    removed = floor(rate * n_groups + 1e-6): rounding down never prunes more than asked, and the
    1e-6 stops float error (0.57 * 100 = 56.99...) from pruning less. Below rate 1 at least one
    group is kept; rate 1 keeps none (`REMOVED`: a whole residual branch's filters).
    """
    if not 0 <= rate <= 1:
        raise ValueError(f"rate, the fraction of groups removed, must be in [0, 1], got {rate}")
    if n_groups < 1:
        raise ValueError(f"n_groups must be at least 1, got {n_groups}")
    if rate == REMOVED:
        return 0
    removed = math.floor(rate * n_groups + _ROUNDING_SLACK)
    return max(n_groups - removed, 1)


# Filter pruning at this rate removes a layer whole: where a residual path bypasses it, its branch
# leaves a constant, and `compact` replaces the branch by that constant (a residual block dropped);
# where none does, a layer that keeps its input's shape collapses to its identity path (`identity_mask`).
REMOVED = 1.0
MIN_BLOCKS = 4  # a layer narrower than this many steps is not aligned: small convs gain from every channel


def aligned_keep(n_groups: int, rate: float, step: int) -> int:
    """Channels to keep of `n_groups` at `rate`, raised to the next multiple of `step`, the width at
    which this device's latency steps (`profiler.steps`): where a remainder costs a whole block or
    more (oneDNN's channels-last convs), the multiple keeps more channels for no more time. Layers
    narrower than MIN_BLOCKS steps keep `keep_count`: on resnet56 their 16 and 32 channels raised to
    one step left them unpruned, and slower (bench/results/alignment-resnet56-fashion-mnist.md)."""
    kept = keep_count(n_groups, rate)
    if step <= 1 or n_groups < MIN_BLOCKS * step:
        return kept
    return min(math.ceil(kept / step) * step, n_groups)


def nm_keep(rate: float, m: int = NM_M) -> int:
    """N, the weights kept in every block of M, for an nm rate of 1 - N/M."""
    n = m * (1 - rate)
    if not (0 <= rate < 1 and abs(n - round(n)) <= _ROUNDING_SLACK):
        accepted = ", ".join(f"{1 - k / m:g}" for k in range(m, 0, -1))
        raise ValueError(f"nm rate {rate} is not 1 - N/{m} for a whole N; accepted: {accepted}")
    return round(n)


def _nm_mask(weight: Tensor, n: int, m: int) -> Tensor:
    """Keep the N largest |w| of every M consecutive weights along each GEMM row.

    A row whose length is not a multiple of M is padded with zeros, as the GPU format does; the
    padding must count against N, so the trailing partial block keeps its top min(N, length).
    Padding scores -1, below any |w|, so it is never kept over a real weight.
    """
    rows = _gemm_view(weight)
    cols = rows.shape[1]
    padded = torch.nn.functional.pad(rows.abs(), (0, -cols % m), value=-1.0)
    blocks = padded.reshape(rows.shape[0], -1, m)
    order = blocks.argsort(dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    return keep.reshape(rows.shape[0], -1)[:, :cols].reshape(weight.shape)


def _joint_mask(weights: Sequence[Tensor], kind: SparsityType, rate: float,
                positions: Sequence[Tensor] | None = None) -> list[Tensor]:
    """Keep the same k groups in every tensor: those with the largest summed squared norm.

    Without `positions` the tensors have equal numbers of groups and group g of each is one
    position. With them, tensor i's group g sits at position positions[i][g] of a shared space
    (a concatenation gives each producer its own slice of it); rate counts positions, and below
    `REMOVED` a tensor left without any group keeps its best one beyond the k, so that no layer is
    removed whole unless asked.
    """
    views = [_group_view(w, kind) for w in weights]
    if positions is None:
        counts = [v.shape[1] for v in views]
        if len(set(counts)) != 1:
            raise ValueError(
                f"coupled tensors must have equal numbers of {kind.value} groups, got {counts}"
            )
        scores = sum(_squared_norms(v) for v in views)
        keep = _top(scores, keep_count(counts[0], rate))
        return [keep.view(1, -1, 1).expand_as(v).reshape(w.shape) for v, w in zip(views, weights)]
    if [len(p) for p in positions] != [v.shape[1] for v in views]:
        raise ValueError("positions must give one position per group of each tensor")
    positions = [p.to(weights[0].device) for p in positions]
    size = max(int(p.max()) for p in positions) + 1
    norms = [_squared_norms(v) for v in views]
    scores = torch.zeros(size, dtype=norms[0].dtype, device=weights[0].device)
    for n, p in zip(norms, positions):
        scores.index_add_(0, p, n)
    keep = _top(scores, keep_count(size, rate))
    for p in positions if rate < REMOVED else ():  # a member left without any group keeps its best one
        if not keep[p].any():
            keep[p[scores[p].argmax()]] = True
    return [keep[p].view(1, -1, 1).expand_as(v).reshape(w.shape) for v, w, p in zip(views, weights, positions)]


def identity_mask(weight: Tensor) -> Tensor:
    """The centre tap of each filter's own channel: what is left of a layer removed where no residual
    path bypasses it (`graph.Dependencies.collapsible`). It computes a per-channel scale, which with
    the BatchNorm after it `compact` folds into one multiply-add: the layer's call goes, its channel
    path stays. Its ADMM projection is this mask, like any other type's."""
    keep = torch.zeros_like(weight, dtype=torch.bool)
    centre = tuple(k // 2 for k in weight.shape[2:])
    channels = torch.arange(min(weight.shape[:2]), device=weight.device)
    keep[(channels, channels, *centre)] = True
    return keep


def collapsed(weight: Tensor) -> bool:
    """Whether a square layer's weights lie on its `identity_mask` (what a collapsed layer keeps)."""
    return weight.shape[0] == weight.shape[1] and not (weight.detach() * ~identity_mask(weight)).any()


def _top(scores: Tensor, k: int) -> Tensor:
    """A bool mask of the k largest scores; stable, so the lower index wins ties (NaN counts as
    largest, as in a descending sort). By the k-th largest value rather than a full sort: 8x faster
    on a 512x512x3x3 layer's weights (70 vs 530 ms), which every irregular projection ranks."""
    n = scores.numel()
    if k >= n or k <= 0:
        return torch.full_like(scores, k > 0, dtype=torch.bool)
    scores = torch.nan_to_num(scores, nan=math.inf, posinf=math.inf, neginf=-math.inf)
    threshold = torch.kthvalue(scores, n - k + 1).values
    keep = scores > threshold
    ties = (scores == threshold).nonzero().flatten()[: k - int(keep.sum())]
    keep[ties] = True
    return keep


def mask(
    weights: Sequence[Tensor], kind: SparsityType, rate: float, *, m: int = NM_M,
    positions: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """Boolean keep-masks of the exact Euclidean projection onto "at most k groups non-zero".

    `weights` is a coupled group. For filter and channel it is projected jointly: squared norms
    are summed over the tensors and the same k = keep_count(n, rate) indices are kept in each;
    `positions` maps each tensor's groups into a shared space when they are not simply equal
    (see `_joint_mask`). Shape, irregular and nm change no layer's channels, so nothing needs to
    agree: each tensor is projected on its own at `rate`. For nm, rate = 1 - N/M with block size
    `m`. Ties keep the lower group index.
    """
    if not weights:
        raise ValueError("weights must hold at least one tensor")
    if kind == SparsityType.NM:
        n = nm_keep(rate, m)
        return [_nm_mask(w, n, m) for w in weights]
    if kind.couples_layers:
        return _joint_mask(weights, kind, rate, positions)
    return [_joint_mask([w], kind, rate)[0] for w in weights]


def project(
    weights: Sequence[Tensor], kind: SparsityType, rate: float, *, m: int = NM_M,
    positions: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """Proj_S(W) of each tensor as a new tensor of the same dtype and device; inputs untouched."""
    keeps = mask(weights, kind, rate, m=m, positions=positions)
    return [w.masked_fill(~keep, 0) for w, keep in zip(weights, keeps)]


def live_groups(weight: Tensor, kind: SparsityType) -> Tensor:
    """Which groups of `kind` hold a non-zero weight: one bool per group (not defined for nm)."""
    return _group_view(weight.detach(), kind).ne(0).any(dim=2).any(dim=0)


def achieved_rate(weight: Tensor, kind: SparsityType) -> float:
    """Fraction of groups that are entirely zero (nm: fraction of weights that are zero)."""
    if kind == SparsityType.NM:
        return int((weight == 0).sum()) / weight.numel()
    live = live_groups(weight, kind)
    return int((~live).sum()) / live.numel()
