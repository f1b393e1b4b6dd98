"""The one builder of compact layers the profiler times, and the description of any compact layer.

`build_layer` makes, from nothing but a layer and its kept dims, the module `compact()` would put in
its place: a plain Conv2d/Linear of the kept dims for filter pruning, for channels removed at their
producer and for unpruned layers; `kernels.compact_layer` on the reduced layer, its weight projected
at the rate, for channel (gathered), shape, irregular and nm. `describe` reads the same quantities
(kept dims, weights used, implementation) back from a built or a compacted module, so the table and
a compacted model are described by one definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..kernels import compact_layer
from ..runtime import is_channels_last
from ..sparsity import SparsityType, project

PLAIN = "plain"  # a dense layer of the kept dims: filter, channels removed, unpruned
PATTERN_TYPES = ("channel", "shape", "irregular", "nm")  # built by kernels.compact_layer
PLAIN_IMPL = {PLAIN: "dense", "filter": "filters-removed", "channel-removed": "channels-removed"}


def reduced(module: nn.Module, in_keep: int, out_keep: int, groups_keep: int | None = None) -> nn.Module:
    """A fresh layer like `module` (same kernel, stride, padding, bias, device, dtype) with the kept
    input and output channels; random weights, frozen (timing never needs gradients)."""
    weight = module.weight
    factory = {"device": weight.device, "dtype": weight.dtype}
    if isinstance(module, nn.Conv2d):
        layer: nn.Module = nn.Conv2d(in_keep, out_keep, module.kernel_size, module.stride, module.padding,
                                     module.dilation, groups_keep or module.groups, module.bias is not None,
                                     module.padding_mode, **factory)
    elif isinstance(module, nn.Linear):
        layer = nn.Linear(in_keep, out_keep, module.bias is not None, **factory)
    else:
        raise TypeError(f"module must be an nn.Conv2d or nn.Linear, got {type(module).__name__}")
    return layer.requires_grad_(False)


def build_layer(module: nn.Module, kind: str, rate: float, in_keep: int, out_keep: int,
                groups_keep: int | None = None, seed: int = 0) -> tuple[nn.Module, str]:
    """The compacted layer for (layer, type, rate, kept inputs, kept outputs), and its impl.

    `kind` is "plain" (or "filter", "channel-removed": the same plain layer), or a pattern type
    channel/shape/irregular/nm whose weight is projected at `rate` (irregular patterns are random:
    the weights are drawn with `seed`) and compacted by `kernels.compact_layer`, exactly as
    `compact()` does it; `in_keep` is then the layer's input channels, before the pattern.
    """
    layer = reduced(module, in_keep, out_keep, groups_keep)
    if kind in PLAIN_IMPL:
        return layer, PLAIN_IMPL[kind]
    if kind not in PATTERN_TYPES:
        raise ValueError(f"unknown layer type {kind!r}; accepted: {', '.join([*PLAIN_IMPL, *PATTERN_TYPES])}")
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(layer.weight.shape, generator=generator).to(layer.weight)
    layer.weight.copy_(project([weight], SparsityType(kind), rate)[0])
    built = compact_layer(layer, kind)
    return built, built.impl


@dataclass(frozen=True)
class Described:
    """A compact layer as the latency model sees it."""

    family: str  # "plain" for a Conv2d/Linear or a dense fallback, else the impl that runs (reduced-gemm, csr, ...)
    in_keep: int  # channels (features) of the input the layer receives
    out_keep: int
    groups_keep: int
    weights: int  # weights the kernel multiplies with


def _groups(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.groups
    if hasattr(module, "conv_args"):
        return int(module.conv_args[3])
    if hasattr(module, "im2col") and getattr(module, "weight", None) is not None and module.weight.dim() == 3:
        return int(module.weight.shape[0])  # ShapeConv2d: (groups, F/groups, K')
    return 1


def _weights(module: nn.Module, impl: str) -> int:
    csr = getattr(module, "csr", None)
    if csr is not None:
        return int(csr.values.numel())
    weight = getattr(module, "weight", None)
    if weight is None:
        return sum(p.numel() for p in module.parameters() if p.dim() >= 2)
    dense = int(torch.Size(weight.shape).numel())
    return dense // 2 if impl == "semi-structured" else dense  # the GPU format keeps 2 of every 4


def describe(module: nn.Module, in_channels: int, out_channels: int) -> Described:
    """Family, kept dims and weights used of a built or compacted layer that reads `in_channels`
    and writes `out_channels` (from its input and output tensors: some compact layers store neither)."""
    plain = type(module) in (nn.Conv2d, nn.Linear)
    impl = "dense" if plain else str(getattr(module, "impl", type(module).__name__))
    family = PLAIN if plain or impl == "dense-fallback" else impl  # a fallback runs the plain layer
    return Described(family, in_channels, out_channels, _groups(module), _weights(module, impl))


class Stub(nn.Module):
    """Stands in for a prunable layer when timing the rest of a network: returns zeros of the
    layer's output shape (the allocation a real layer makes, none of its arithmetic), laid out as
    its input is, as a conv's output would be."""

    def __init__(self, shape: tuple[int, ...], like: torch.Tensor) -> None:
        super().__init__()
        self.shape = shape
        self.register_buffer("like", like.new_empty(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = torch.channels_last if is_channels_last(x) and len(self.shape) == 4 else torch.contiguous_format
        return torch.empty(self.shape, dtype=self.like.dtype, device=self.like.device, memory_format=layout).zero_()


class Yardstick(nn.Module):
    """A fixed workload timed beside everything a profile times: the machine's speed at that moment.

    Every latency in a profile is stored as its ratio to the yardstick in the same rounds times the
    yardstick's latency when the profile was started, so rows timed minutes apart (a shared 2-vCPU
    VM drifted 8% between two hours and 1.5x within a minute) stay comparable. It ignores its input:
    one yardstick serves layers of every shape."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1))
        self.body.requires_grad_(False).to(device=device, dtype=dtype)
        self.register_buffer("x", torch.randn(1, 64, 16, 16, generator=generator).to(device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG002 - the input is ignored
        return self.body(self.x)
