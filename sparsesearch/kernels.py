"""Compact layers: a masked Conv2d or Linear rebuilt so that its pruned weights cost no time.

Each class takes a layer whose weight already holds its zeros (`sparsity.project`) and gives the
output of that masked dense layer, in inference. `impl` names the kernel actually used: a format
can be unavailable (CSR has no float16 CPU kernel, 2:4 needs an Ampere-or-newer GPU), and then the
layer runs its dense masked weight, says "dense-fallback" and `why`, so that a measured speedup
(or a MAC count) is never credited to a kernel that did not run.

- shape: "reduced-gemm", the im2col GEMM over only the K' weight columns non-zero in some filter; on a
  CPU in inference, by the compiled gather-GEMM (`native`) where that is the faster.
- irregular: "csr", the weight in CSR times the im2col matrix (torch.sparse.mm).
- nm: "semi-structured", a 2:4 weight (torch.sparse.to_sparse_semi_structured) on CUDA.

- channel: "channels-gathered", for input channels that some other layer still reads, so their
  producer cannot drop them: the kept channels gathered, then an ordinary smaller conv, or on a CPU
  in inference the compiled gather-GEMM over them, which builds no gathered copy, where that is faster.

filter sparsity is not layer-local (removing filters changes the consumers' channels too), nor is
the best form of channel sparsity (dropping the producer's filters): the model-level compactor
does those. Weights are frozen (requires_grad=False): these
modules are for timing and deployment, and autograd bookkeeping on some layers only would skew it.
"""

from __future__ import annotations

import threading
import time
import warnings
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .errors import brief
from .runtime import is_channels_last
from .sparsity import SparsityType, live_groups

# A compact kernel's version (by `impl`), raised when its speed changes: a profile re-measures the
# rows it timed with an older one, and the whole networks it calibrated on them. Absent: 1.
KERNEL_VERSIONS = {"reduced-gemm": 8, "channels-gathered": 3}
# reduced-gemm 2: im2col by a flat index, 1.1-2.5x faster; 3: batch folded on small planes; 4: the compiled
# gather-GEMM (`native`) where it is the faster; 5: its NCHW output stored row by row; 6: its call prepared once
# per input size (15-20 us less per call); 7: an unpadded input read in place (1x1 convs); 8: its columns read
# in address order (channels-last: 7-21% faster), and each tile's output lines fetched before it computes (0-6%).
# channels-gathered 2: the compiled gather-GEMM where it is the faster; 3: its columns in address order.
_SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
_KERNEL_ERRORS = (RuntimeError, NotImplementedError, ValueError)  # what torch raises for no kernel
_GROUPED = "a grouped conv would need one sparse product per group (not implemented)"
# oneDNN's own product, which torch's compiler calls on a CPU; None without oneDNN
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


def _frozen(tensor: Tensor | None) -> nn.Parameter | None:
    """A detached copy as a parameter without gradient, so the compact layer owns its weights."""
    return None if tensor is None else nn.Parameter(tensor.detach().clone(), requires_grad=False)


def _gemm_columns(weight: Tensor) -> Tensor:
    """Sorted indices of the GEMM columns non-zero in any row: exact for any weight, not only a
    shape-pruned one. An all-zero weight keeps column 0, so that no GEMM is empty."""
    live = weight.detach().reshape(weight.shape[0], -1).ne(0).any(0)
    live[0] |= ~live.any()
    return live.nonzero().flatten()


def _zero_padded(conv: nn.Conv2d) -> nn.Conv2d:
    """The conv, if it pads with zeros: the only padding the im2col and fallback paths reproduce."""
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"padding_mode {conv.padding_mode!r} is not supported by compact convs; "
            "accepted: 'zeros'"
        )
    return conv


def _conv_args(conv: nn.Conv2d) -> tuple[object, ...]:
    """stride, padding, dilation and groups, as F.conv2d takes them after the weight and bias."""
    conv = _zero_padded(conv)
    return (conv.stride, conv.padding, conv.dilation, conv.groups)


@dataclass(frozen=True)
class _Geometry:
    """Where a conv reads its input: zero padding as F.pad amounts (left, right, top, bottom)."""

    pads: tuple[int, int, int, int]
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def of(cls, conv: nn.Conv2d) -> _Geometry:
        """The conv's geometry; string paddings resolve as torch resolves them."""
        return cls.of_args(tuple(conv.kernel_size), *_conv_args(conv)[:3])

    @classmethod
    def of_args(cls, kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int] | str,
                dilation: tuple[int, int]) -> _Geometry:
        """The geometry of a conv of that kernel size and `_conv_args`."""
        if padding == "valid":
            pads = (0, 0, 0, 0)
        elif padding == "same":  # torch puts the odd pixel of the total on the right/bottom
            th, tw = (d * (k - 1) for d, k in zip(dilation, kernel_size))
            pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
        else:
            ph, pw = padding
            pads = (pw, pw, ph, ph)
        return cls(pads, tuple(kernel_size), tuple(stride), tuple(dilation))

    def pad(self, x: Tensor) -> Tensor:
        return F.pad(x, self.pads) if any(self.pads) else x

    def out_size(self, hp: int, wp: int) -> tuple[int, int]:
        """Output height and width for a padded input of hp x wp."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        return (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1

    def strided(self, x: Tensor, batch_first: bool = True) -> Tensor:
        """The full im2col as a view of the padded input, no copy: (N, C, kh, kw, Hout, Wout), or
        (C, kh, kw, N, Hout, Wout). Sizes and strides follow x's shape, so a trace holds for any
        input size."""
        x = self.pad(x).contiguous()
        n, c, hp, wp = x.shape
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        h, w = self.out_size(hp, wp)
        batch, rest = (n, c * hp * wp), ((c, hp * wp), (kh, dh * wp), (kw, dw))
        dims = (batch, *rest) if batch_first else (*rest, batch)
        sizes, strides = zip(*dims, (h, sh * wp), (w, sw))
        return x.as_strided(sizes, strides)

    def unfold(self, x: Tensor) -> tuple[Tensor, int, int]:
        """The full im2col matrix (N, C*kh*kw, Hout*Wout) in GEMM column order, and Hout, Wout."""
        x = self.pad(x)
        return F.unfold(x, self.kernel_size, self.dilation, 0, self.stride), *self.out_size(*x.shape[2:])


def _live_rows(conv: nn.Conv2d) -> tuple[Tensor, Tensor]:
    """The conv's live GEMM columns, and its F x K' weight matrix over them."""
    columns = _gemm_columns(conv.weight)
    return columns, conv.weight.reshape(conv.out_channels, -1)[:, columns]


class _Windows(nn.Module):
    """im2col restricted to some GEMM columns: (N, groups*K', Hout, Wout), or without batch_first
    (groups*K', N, Hout, Wout), the layout a single 2-D product (CSR) needs without a transpose.
    Rows run group by group, in GEMM column order within a group.

    Batch first, one index_select of the padded input, flattened per sample, by an int32 index of
    every element (made once per input size): layers 1.1-2.5x faster than indexing the strided view
    of the whole im2col by channel, kernel row and kernel column, which computes each element's
    offset from three indices (bench/shape_gather.py: AlexNet conv3 at 15x fewer MACs, batch 8,
    4.6x -> 7.2x over dense). That view
    stays for the CSR layout, for an index of more than FLAT_INDEX_MAX elements (a 224x224 plane:
    there it is no faster, and the index would take tens of MB), and under tracing and export,
    which must follow any input size. Both were measured faster than one gather and slice per
    kernel offset plus a concatenation (121 of them for an 11x11 kernel), and than F.unfold +
    index_select (which builds all C*kh*kw rows).

    Without autograd on a CPU the gather writes into one scratch buffer per thread (`_scratch`),
    reused by every layer: a fresh im2col of 100 MB (vgg16-bn at batch 32) is a fresh mmap whose
    every page faults on first write, which cost as much as the gather itself. The result is valid
    until the thread's next im2col, so a caller consumes it at once (the layers here do).
    """

    FLAT_INDEX_MAX = 1 << 21
    SCRATCH = True  # gather into `_scratch` where it can (False on an instance: a fresh tensor, to measure it)

    def __init__(self, conv: nn.Conv2d, columns: Tensor, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.geometry = _Geometry.of(conv)
        kh, kw = conv.kernel_size
        per_group = conv.in_channels // conv.groups
        self.register_buffer("channels", torch.cat([columns // (kh * kw) + g * per_group
                                                    for g in range(conv.groups)]))
        self.register_buffer("rows", (columns // kw % kh).repeat(conv.groups))
        self.register_buffer("cols", (columns % kw).repeat(conv.groups))

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        """Buffers loaded in place may hold other columns: forget the index made for the old ones
        (a method, not a load hook: an export refuses hooks, which are code)."""
        _INDEXES.pop(self, None)
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if self.batch_first and not _tracing():
            padded = self.geometry.pad(x)
            n, _, hp, wp = padded.shape
            index = self._flat_index(hp, wp)
            if index is not None:
                return self._gather(padded.reshape(n, -1), index).view(n, len(self.channels),
                                                                       *self.geometry.out_size(hp, wp))
        view = self.geometry.strided(x, self.batch_first)
        if self.batch_first:
            return view[:, self.channels, self.rows, self.cols]
        return view[self.channels, self.rows, self.cols]

    def pixel_rows(self, x: Tensor) -> Tensor | None:
        """The im2col of a channels-last input as (N, Hout, Wout, groups*K'), a row per output pixel,
        gathered in the input's own order: a row reads each kernel offset's kept channels, adjacent
        in memory. None where the flat index cannot be used (tracing, too large an index)."""
        if _tracing():
            return None
        padded = self.geometry.pad(x)
        n, c, hp, wp = padded.shape
        index = self._flat_index(hp, wp, channels=c)
        if index is None:
            return None
        h, w = self.geometry.out_size(hp, wp)
        return self._gather(padded.permute(0, 2, 3, 1).reshape(n, -1), index).view(n, h, w, len(self.channels))

    def _gather(self, flat: Tensor, index: Tensor) -> Tensor:
        """flat[:, index], into this thread's scratch buffer where it can (see the class docstring)."""
        if not self.SCRATCH or flat.device.type != "cpu" or (flat.requires_grad and torch.is_grad_enabled()):
            return flat.index_select(1, index)
        out = _scratch(len(flat) * len(index), flat.dtype).view(len(flat), len(index))
        return torch.index_select(flat, 1, index, out=out)

    def _flat_index(self, hp: int, wp: int, channels: int = 0) -> Tensor | None:
        """Each im2col element's offset in a padded sample, or None if there are too many: row by row
        in a (C, hp, wp) sample, or pixel by pixel in a channels-last (hp, wp, C) one of `channels` C."""
        def make() -> Tensor | None:
            (h, w), (sh, sw) = self.geometry.out_size(hp, wp), self.geometry.stride
            if len(self.channels) * h * w > self.FLAT_INDEX_MAX:
                return None
            start, pixel = self._starts(hp, wp, channels), channels or 1
            rows, cols = (torch.arange(size, device=start.device) for size in (h, w))
            window = ((rows[:, None] * (sh * wp) + cols * sw) * pixel).flatten()
            return (window[:, None] + start if channels else start[:, None] + window).flatten().int()
        return self._memo(("flat", hp, wp, channels), make)

    def window_starts(self, hp: int, wp: int, channels: int) -> Tensor:
        """Each kept column's offset from its window's first element in a padded channels-last sample of
        hp x wp pixels of `channels` C, or a (C, hp, wp) one where `channels` is 0 (int32): what the
        compiled kernel reads (`native`)."""
        return self._memo(("starts", hp, wp, channels), lambda: self._starts(hp, wp, channels).int())

    def _starts(self, hp: int, wp: int, channels: int) -> Tensor:
        return _offsets(self.channels, self.rows, self.cols, self.geometry.dilation, hp, wp, channels)

    def _memo(self, key: tuple, make: Callable[[], Tensor | None]) -> Tensor | None:
        """make(), made once per key for these buffers as they are (they move with `to`). Made as a normal
        tensor: one made in inference mode cannot index a forward with autograd."""
        stamp = tuple(b.data_ptr() for b in (self.channels, self.rows, self.cols))
        if self not in _INDEXES or _INDEXES[self][0] != stamp:
            _INDEXES[self] = (stamp, {})
        cache = _INDEXES[self][1]
        if key not in cache:
            with torch.inference_mode(False):
                cache[key] = make()
        return cache[key]


def _offsets(channels: Tensor, rows: Tensor, cols: Tensor, dilation: tuple[int, int], hp: int, wp: int,
             count: int) -> Tensor:
    """Each GEMM column's offset (its input channel, kernel row and kernel column) from its window's first
    element in a padded sample: (C, hp, wp), or channels-last of `count` C (0: not channels-last)."""
    dh, dw = dilation
    pixel, channel = (count, 1) if count else (1, hp * wp)  # strides in the sample
    return channels * channel + (rows * (dh * wp) + cols * dw) * pixel


# each _Windows' flat indices and window starts by input size, for its buffers as they are: a cache beside the
# module, not in it (an export describes a module's attributes as data, and a module loaded from one starts without)
_INDEXES: weakref.WeakKeyDictionary[_Windows, tuple[tuple, dict[tuple, Tensor | None]]] = \
    weakref.WeakKeyDictionary()


_SCRATCH = threading.local()


def _tracing() -> bool:
    """Under tracing or compilation, where an index made for one input size must not be baked in."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def _scratch(numel: int, dtype: torch.dtype, slot: int = 0) -> Tensor:
    """A CPU buffer of `numel` elements, this thread's one per dtype and slot (for a caller that needs
    two at once), grown as needed and kept (it holds the largest im2col the thread has built;
    `_Windows` says why)."""
    return _buffer(numel, dtype, slot)[:numel]


def _buffer(numel: int, dtype: torch.dtype, slot: int = 0) -> Tensor:
    """`_scratch`'s whole buffer, of `numel` elements or more (the compiled kernel takes its address)."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    if (dtype, slot) not in buffers or buffers[dtype, slot].numel() < numel:
        with torch.inference_mode(False):  # an inference tensor could not be written outside inference mode
            buffers[dtype, slot] = torch.empty(numel, dtype=dtype)
    return buffers[dtype, slot]


class _GatherGemm(nn.Module, ABC):
    """A conv that reads only some GEMM columns of its im2col (shape-wise: the live ones; channel-wise:
    every kernel offset of the kept channels), run by `native`'s compiled gather-GEMM, which reads each
    pixel's columns where they lie, or by the subclass's eager form (`_eager`), whichever the layer's
    first call for an input size, layout and thread count times faster (`_fastest`); from then on that
    form is called as prepared. Subclasses say which columns (`_starts`), with which weights
    (`_matrix`) and geometry (`_geometry`), and what they run traced (`_traced`)."""

    FUSED = True  # the compiled kernel where it can run (False on an instance: the eager forms, to measure them)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        """Weights loaded in place: forget the panels packed from the old ones and the prepared calls (a
        method, not a load hook: an export refuses hooks, which are code)."""
        _PANELS.pop(self, None)
        _WAYS.pop(self, None)
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        """The chosen form for this input; traced, `_traced`, which holds for any input size."""
        if _tracing():
            return self._traced(x)
        key = self._key(x)
        way = self._chosen().get(key)
        if way is None:  # the first call of this size, or not one the kernel can run (each time: cheap)
            if not (self.FUSED and native.usable(x, self.weight) and self._fusable()):
                return self._eager(x)
            ways = self._ways(x)
            name = _fastest(ways, x)
            way = self._chosen()[key] = (name, None if name == "eager" else ways[name])
        return self._eager(x) if way[1] is None else way[1](x)

    def form(self, x: Tensor) -> str | None:
        """The form this layer runs inputs like x in, once one has run: "fused", "fused planar" or "eager"."""
        way = self._chosen().get(self._key(x))
        return way and way[0]

    @abstractmethod
    def _eager(self, x: Tensor) -> Tensor:
        """The layer in torch's own operators: where the kernel cannot run, and one of the forms timed."""

    def _traced(self, x: Tensor) -> Tensor:
        return self._eager(x)

    def _fusable(self) -> bool:
        """Whether the kernel can run this layer at all (it takes no groups)."""
        return True

    @abstractmethod
    def _matrix(self) -> Tensor:
        """The F x K' weights by GEMM column, in `_starts`' order."""

    @abstractmethod
    def _geometry(self) -> _Geometry:
        """Where the conv reads its input."""

    @abstractmethod
    def _starts(self, hp: int, wp: int, channels: int) -> Tensor:
        """Each GEMM column's offset in a window of a padded sample (int32, `_offsets`)."""

    def _stamp(self) -> tuple:
        """The data pointers of the tensors a prepared call reads: replaced, it is prepared again."""
        return self.weight.data_ptr(), self.bias is not None and self.bias.data_ptr()

    def _chosen(self) -> dict[tuple, _Way]:
        """Each input size's chosen form (None: the eager one), for the weights and columns as they are
        now: moved or replaced (`to`, a new Parameter), they are chosen and prepared again."""
        stamp = self._stamp()
        if self not in _WAYS or _WAYS[self][0] != stamp:
            _WAYS[self] = (stamp, {})
        return _WAYS[self][1]

    @staticmethod
    def _key(x: Tensor) -> tuple:
        """What a prepared call depends on; under autograd (the kernel has no gradient) never prepared."""
        return (tuple(x.shape), x.stride(), x.dtype, x.device, torch.get_num_threads(),
                x.requires_grad and torch.is_grad_enabled())

    def _ways(self, x: Tensor) -> dict[str, Callable[[Tensor], Tensor]]:
        """The forms to choose from: the compiled kernel reading a channels-last copy of the padded input,
        and for an NCHW input also an NCHW copy (no transpose: AlexNet's conv1, 3 channels, where the
        transposing copy costs as much as the product), and the eager form (on small or thin layers,
        and at several threads, torch's own product can still win)."""
        ways = {"eager": self._eager, "fused": self._compiled(x)}
        if not is_channels_last(x):
            ways["fused planar"] = self._compiled(x, gathered=False)
        return ways

    def _compiled(self, x: Tensor, gathered: bool = True) -> Callable[[Tensor], Tensor]:
        """The conv, for inputs shaped and strided as x, by `native`'s gather-GEMM, which reads each
        pixel's columns where they lie in a padded copy of the input, channels-last where `gathered`
        (an input that needs no padding and is laid out so, in place): AlexNet's conv2-5 at 15x fewer
        MACs, channels-last, batch 1 and 8, run at 0.59-0.75 of their MAC reduction with the im2col
        built first, and at 0.69-0.83 without it (bench/results/shape_ceiling.md, README). The output
        keeps the input's layout. The columns run in address order, so that each pixel's reads walk
        forward through its window and adjacent kept channels share cache lines: channels-last, in the
        weights' (channel, row, column) order they jumped a pixel at a time, and AlexNet's conv2-5 at
        15x fewer MACs ran 7-21% slower (Xeon, batch 1 and 8). Tiles that run across samples (planes
        of fewer pixels than a tile) are gathered once per tile for all panels: vgg16-bn's 2x2 planes at
        batch 8. Prepared once per input size: at batch 1 the per-call work in Python (arguments,
        caches, scratch) had cost 15 us a layer, a sixth of a 15x-pruned AlexNet conv's time."""
        kernel = native.kernel()
        n, c, h, w = x.shape
        geometry = self._geometry()
        left, right, top, bottom = geometry.pads
        hp, wp = h + top + bottom, w + left + right
        oh, ow = geometry.out_size(hp, wp)
        f = self._matrix().shape[0]
        channels_last = is_channels_last(x)
        gathered |= channels_last
        start = self._starts(hp, wp, c if gathered else 0)
        order = start.argsort()
        panels, bias = self._panels(kernel.panel_width, order)
        start = start[order]
        pack = channels_last and n > 1 and oh * ow < kernel.tile_pixels
        strides = (oh * ow * f, f, 1) if channels_last else (f * oh * ow, 1, oh * ow)
        call = kernel.shape_conv(x, (top, left, hp, wp, *geometry.stride, oh, ow, gathered), start, panels, bias, f,
                                 strides)
        size, packed = n * hp * wp * c, kernel.packed_floats(len(start)) if pack else 0
        layout = torch.channels_last if channels_last else torch.contiguous_format

        def run(x: Tensor) -> Tensor:
            y = torch.empty((n, f, oh, ow), dtype=x.dtype, memory_format=layout)
            call.run(x, _buffer(size, x.dtype).data_ptr(), _buffer(packed, x.dtype, 1).data_ptr() if pack else None, y)
            return y
        return run

    def _panels(self, width: int, order: Tensor) -> tuple[Tensor, Tensor | None]:
        """The weights as the kernel reads them: panels of `width` output channels, each K' rows of
        `width` (zero past the last channel) with the columns in `order`, and the bias padded alike;
        packed once."""
        stamp = (*self._stamp(), width, order.numpy().tobytes())
        if self not in _PANELS or _PANELS[self][0] != stamp:
            weight = self._matrix().detach()[:, order]
            f, k = weight.shape
            count = -(-f // width)
            with torch.inference_mode(False):
                panels = weight.new_zeros(count * width, k)
                panels[:f] = weight
                panels = panels.view(count, width, k).transpose(1, 2).contiguous()
                pad = weight.new_zeros(count * width - f)
                bias = None if self.bias is None else torch.cat([self.bias.detach(), pad])
            _PANELS[self] = (stamp, (panels, bias))
        return _PANELS[self][1]


class ShapeConv2d(_GatherGemm):
    """Shape sparsity: the conv as one GEMM of F x K' weights by the K' live im2col rows.

    On a CPU in inference, in float32 without groups, the compiled kernel multiplies the im2col without
    building it; the eager forms (`_eager`) build it and call torch's product (`_GatherGemm`). The
    output keeps the input's memory format, as a conv's does. A channels-last input is gathered pixel
    by pixel in its own order and multiplied in one product over the whole batch, whose output is
    channels-last as it comes: tv:alexnet at 93.3% shape, batch 8, 2.9x over the channels-last dense
    network against 2.2x contiguous over contiguous (bench/shape_gather.py, eager)."""

    impl = "reduced-gemm"

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        columns, rows = _live_rows(conv)
        self.im2col = _Windows(conv, columns)
        self.weight = _frozen(rows.reshape(conv.groups, conv.out_channels // conv.groups, -1))
        self.bias = _frozen(conv.bias)

    FOLD_BELOW = 256  # output pixels per sample under which one product over the whole batch is faster

    def _traced(self, x: Tensor) -> Tensor:
        """One product per sample, which holds for any input size."""
        return self._per_sample(self.im2col(x))

    def _fusable(self) -> bool:
        return self.weight.shape[0] == 1

    def _matrix(self) -> Tensor:
        return self.weight[0]

    def _geometry(self) -> _Geometry:
        return self.im2col.geometry

    def _starts(self, hp: int, wp: int, channels: int) -> Tensor:
        return self.im2col.window_starts(hp, wp, channels)

    def _stamp(self) -> tuple:
        return (*super()._stamp(), self.im2col.channels.data_ptr())

    def _eager(self, x: Tensor) -> Tensor:
        """Channels-last (`pixel_rows`), folded over the batch on small planes (`_folded`), or one product
        per sample."""
        if is_channels_last(x) and self.weight.shape[0] == 1 and (rows := self.im2col.pixel_rows(x)) is not None:
            return self._pixel_product(rows).permute(0, 3, 1, 2)
        cols = self.im2col(x)
        n, _, h, w = cols.shape
        return self._folded(cols) if n > 1 and h * w < self.FOLD_BELOW else self._per_sample(cols)

    ONEDNN_ROWS = 1024  # output pixels over the batch from which oneDNN's product is the faster

    def _pixel_product(self, rows: Tensor) -> Tensor:
        """The weights by the channels-last im2col, (N, Hout, Wout, F). oneDNN's product where it is tall:
        on the AMD EPYC at 1 thread it runs vgg16-bn's 64-channel conv at 32x32, 30% shape, batch 32,
        at 0.82x of the dense conv against MKL's 0.62x (both channels-last), and loses on short ones
        (batch 1). It has no gradient and takes float32 only: elsewhere torch's own."""
        weight = self.weight[0]
        if (_ONEDNN_LINEAR is not None and rows.numel() > self.ONEDNN_ROWS * rows.shape[-1]
                and rows.device.type == "cpu" and rows.dtype == torch.float32
                and not (rows.requires_grad and torch.is_grad_enabled())):
            return _ONEDNN_LINEAR(rows, weight, self.bias, "none", [], "")
        return F.linear(rows, weight, self.bias)

    def _per_sample(self, cols: Tensor) -> Tensor:
        """One batched product per sample and group, the bias as its initial value (baddbmm): a
        separate bias add costs one more pass over the output (AlexNet conv1 at shape 93.3%, batch 8:
        3.5x over dense against 2.5x). Without groups the expands and reshapes are views."""
        n, _, h, w = cols.shape
        groups, f, k = self.weight.shape
        cols = cols.view(n * groups, k, h * w)
        weight = self.weight.expand(n, groups, f, k).reshape(n * groups, f, k)
        if self.bias is None:
            return torch.bmm(weight, cols).view(n, groups * f, h, w)
        bias = self.bias.view(1, groups, f, 1).expand(n, groups, f, h * w).reshape(n * groups, f, h * w)
        return torch.baddbmm(bias, weight, cols).view(n, groups * f, h, w)

    def _folded(self, cols: Tensor) -> Tensor:
        """The batch folded into the columns of one product per group: a product per sample with a
        few output pixels runs far below the GEMM's rate (vgg16-bn's 512-channel convs on 2x2 planes at
        batch 32, 30% shape: 0.09x of the dense conv per sample, 1.03x folded; 16x16 planes and larger
        run faster per sample). Costs one transposed copy of the im2col and one of the output."""
        n, _, h, w = cols.shape
        groups, f, k = self.weight.shape
        cols = cols.view(n, groups, k, h * w).permute(1, 2, 0, 3).reshape(groups, k, n * h * w)
        if self.bias is None:
            out = torch.bmm(self.weight, cols)
        else:
            out = torch.baddbmm(self.bias.view(groups, f, 1).expand(groups, f, n * h * w), self.weight, cols)
        return out.view(groups * f, n, h, w).permute(1, 0, 2, 3).contiguous()


# each _GatherGemm's weights packed for the compiled kernel, and its fastest form by input size, layout and
# threads (name, and the prepared call, which holds no reference to the module): beside the module like `_INDEXES`
_PANELS: weakref.WeakKeyDictionary[_GatherGemm, tuple[tuple, tuple[Tensor, Tensor | None]]] = \
    weakref.WeakKeyDictionary()
_Way = tuple[str, Callable[[Tensor], Tensor] | None]
_WAYS: weakref.WeakKeyDictionary[_GatherGemm, tuple[tuple, dict[tuple, _Way]]] = weakref.WeakKeyDictionary()


def _fastest(ways: dict[str, Callable[[Tensor], Tensor]], x: Tensor, rounds: int = 5) -> str:
    """The way that runs x fastest: each timed `rounds` times in turn after one warm-up call, best time.
    Which form wins depends on the layer's shape and the CPU (the compiled kernel's tile is set by its
    vector registers), so it is measured, as cuDNN's benchmark mode does, not guessed."""
    best = dict.fromkeys(ways, float("inf"))
    for round_ in range(rounds + 1):
        for name, way in ways.items():
            start = time.perf_counter()
            way(x)
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return min(best, key=best.__getitem__)


class ShapeLinear(nn.Module):
    """Shape sparsity of a Linear: drop the dead input columns, then a smaller Linear."""

    impl = "reduced-gemm"

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        columns = _gemm_columns(linear.weight)
        self.register_buffer("columns", columns)
        self.weight = _frozen(linear.weight[:, columns])
        self.bias = _frozen(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.index_select(-1, self.columns), self.weight, self.bias)


def _live_channels(weight: Tensor) -> Tensor:
    """Sorted input channels that some weight reads (channel 0 if none, so that no conv is empty)."""
    live = live_groups(weight, SparsityType.CHANNEL)
    live[0] |= ~live.any()
    return live.nonzero().flatten()


class ChannelConv2d(_GatherGemm):
    """Channel sparsity where the channels stay in the network (another layer still reads them, so their
    producer cannot drop them): the kept input channels gathered, then the ordinary (cuDNN/oneDNN) conv
    over them (`_eager`), or the compiled gather-GEMM over every kernel offset of the kept channels,
    which reads them where they lie and builds no gathered copy (`_GatherGemm`), whichever is faster.
    The kernel wins mostly on 1x1 convs (read in place, no copy) and small planes, channels-last; after
    a gather oneDNN's conv stays the faster on most 3x3 convs over large planes and on NCHW inputs.
    tv:resnet18 / tv:resnet50 at channel 50%, 224 px, batch 8, channels-last, 1 thread (Intel Xeon),
    side by side with every such layer gathering: 1.78x -> 2.04x and 1.88x -> 2.10x over dense; NCHW
    unchanged within 3%."""

    impl = "channels-gathered"

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.groups != 1:
            raise ValueError("channel sparsity needs an ungrouped conv (groups=1)")
        channels = _live_channels(conv.weight)
        self.register_buffer("channels", channels)
        self.weight = _frozen(conv.weight[:, channels])
        self.bias = _frozen(conv.bias)
        self.conv_args = _conv_args(conv)

    def _eager(self, x: Tensor) -> Tensor:
        """The gather keeps the input's layout. On a channels-last input an index_select over dim 1
        returns NCHW, which the conv converts back (tv:resnet50 at channel 50%, batch 8: 461 ms of
        layout copies in a 994 ms network), and one over the last dim of the NHWC view is slower
        still; a gather of the pixel-by-channel matrix with the index broadcast over its rows is
        8x faster than either (bench/results/where_time_goes.md)."""
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            n, c, h, w = x.shape
            pixels = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view: channels-last is NHWC in memory
            kept = pixels.gather(1, self.channels.expand(pixels.shape[0], -1)).view(n, h, w, -1).permute(0, 3, 1, 2)
        else:
            kept = x.index_select(1, self.channels)
        return F.conv2d(kept, self.weight, self.bias, *self.conv_args)

    def _matrix(self) -> Tensor:
        """Kept channel by kernel row by kernel column, the order of `_starts` (and of a conv's weight)."""
        return self.weight.reshape(self.weight.shape[0], -1)

    def _geometry(self) -> _Geometry:
        return _Geometry.of_args(tuple(self.weight.shape[2:]), *self.conv_args[:3])

    def _starts(self, hp: int, wp: int, channels: int) -> Tensor:
        kh, kw = self.weight.shape[2:]
        offsets = torch.arange(kh * kw, device=self.channels.device).repeat(len(self.channels))
        return _offsets(self.channels.repeat_interleave(kh * kw), offsets // kw, offsets % kw,
                        self._geometry().dilation, hp, wp, channels).int()

    def _stamp(self) -> tuple:
        return (*super()._stamp(), self.channels.data_ptr())


class ChannelLinear(ShapeLinear):
    """Channel sparsity of a Linear: its input features are its channels, so a reduced GEMM."""

    impl = "channels-gathered"


class _CSR(nn.Module):
    """A matrix in CSR, held as three dense buffers so that .to(), state_dict and deepcopy work
    (a sparse CSR buffer cannot be deep-copied); the CSR tensor is re-wrapped per call, no copy."""

    def __init__(self, matrix: Tensor) -> None:
        super().__init__()
        with warnings.catch_warnings():  # torch warns once that CSR is beta; it is what we time
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = matrix.detach().to_sparse_csr()
        self.register_buffer("crow_indices", csr.crow_indices())
        self.register_buffer("col_indices", csr.col_indices())
        self.register_buffer("values", csr.values())
        self.shape = tuple(matrix.shape)

    def mm(self, dense: Tensor) -> Tensor:
        matrix = torch.sparse_csr_tensor(
            self.crow_indices, self.col_indices, self.values, self.shape, check_invariants=False)
        return torch.sparse.mm(matrix, dense)


def _csr_or_none(matrix: Tensor) -> tuple[_CSR | None, str]:
    """The matrix in CSR, or None and why, where no CSR kernel takes its dtype and device (one probe)."""
    try:
        csr = _CSR(matrix)
        csr.mm(matrix.new_zeros(matrix.shape[1], 1))
    except _KERNEL_ERRORS:
        return None, f"no CSR kernel for {str(matrix.dtype).removeprefix('torch.')} on {matrix.device.type}"
    return csr, ""


def _dense_conv(layer: SparseConv2d | NMConv2d, x: Tensor) -> Tensor:
    """The fallback: the masked dense weight through the ordinary conv."""
    return F.conv2d(x, layer.weight, layer.bias, *layer.conv_args)


class SparseLinear(nn.Module):
    """Irregular sparsity of a Linear: y = (W_csr x^T)^T, only non-zero weights stored and used."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.csr, self.why = _csr_or_none(linear.weight)
        self.impl = "dense-fallback" if self.csr is None else "csr"
        self.weight = _frozen(linear.weight) if self.csr is None else None
        self.bias = _frozen(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.csr is None:
            return F.linear(x, self.weight, self.bias)
        out = self.csr.mm(x.reshape(-1, x.shape[-1]).t()).t().reshape(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias


class SparseConv2d(nn.Module):
    """Irregular sparsity of a conv: CSR weight times the im2col matrix of its live columns.

    Grouped convs run dense (one CSR product per group would be needed; not worth it here).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        columns, rows = _live_rows(conv)
        self.csr, self.why = _csr_or_none(rows) if conv.groups == 1 else (None, _GROUPED)
        self.impl = "dense-fallback" if self.csr is None else "csr"
        self.im2col = _Windows(conv, columns, batch_first=False) if self.csr is not None else None
        self.weight = _frozen(conv.weight) if self.csr is None else None
        self.bias = _frozen(conv.bias)
        self.conv_args = _conv_args(conv)

    def forward(self, x: Tensor) -> Tensor:
        if self.csr is None:
            return _dense_conv(self, x)
        cols = self.im2col(x)
        k, n, h, w = cols.shape
        out = self.csr.mm(cols.view(k, -1)).view(-1, n, h, w).transpose(0, 1).contiguous()
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


def _is_2_4(matrix: Tensor) -> bool:
    """Whether every block of 4 consecutive weights of a row holds at most 2 non-zeros."""
    if matrix.shape[1] % 4:
        return False
    return bool(matrix.reshape(matrix.shape[0], -1, 4).ne(0).sum(-1).le(2).all())


def _semi_structured_or_none(matrix: Tensor) -> tuple[Tensor | None, str]:
    """The matrix as a 2:4 semi-structured tensor, or None and why, where no GPU kernel takes it.

    Needs CUDA with compute capability >= 8.0, float16/bfloat16 and a 2:4 pattern; the kernels'
    shape limits (multiples of 16-64 rows and columns) are left to the conversion and one probe.
    """
    if not matrix.is_cuda:
        return None, f"no 2:4 kernel on {matrix.device.type} (semi-structured sparsity needs a CUDA GPU)"
    if matrix.dtype not in _SEMI_STRUCTURED_DTYPES:
        return None, f"2:4 kernels take float16/bfloat16 weights, not {str(matrix.dtype).removeprefix('torch.')}"
    if not _is_2_4(matrix):
        return None, "the weight is not 2:4 (at most 2 non-zeros in every 4, rows a multiple of 4 long)"
    if torch.cuda.get_device_capability(matrix.device) < (8, 0):
        return None, "2:4 kernels need a GPU of compute capability 8.0 or newer"
    try:
        sparse = torch.sparse.to_sparse_semi_structured(matrix.detach().contiguous())
        F.linear(matrix.new_zeros(1, matrix.shape[1]), sparse)
    except _KERNEL_ERRORS as e:
        return None, f"the 2:4 kernel refused this shape ({brief(e, 80)})"
    return sparse, ""


def _nm_weight(matrix: Tensor, dense: Tensor) -> tuple[nn.Parameter, str, str]:
    """The 2:4 weight where a GPU kernel takes it, else the dense masked weight; its impl, and why
    it fell back."""
    sparse, why = _semi_structured_or_none(matrix)
    if sparse is None:
        return _frozen(dense), "dense-fallback", why
    return nn.Parameter(sparse, requires_grad=False), "semi-structured", ""


class NMLinear(nn.Module):
    """N:M sparsity of a Linear: the 2:4 weight through F.linear (dense on other devices)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight, self.impl, self.why = _nm_weight(linear.weight, linear.weight)
        self.bias = _frozen(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class NMConv2d(nn.Module):
    """N:M sparsity of a conv: the 2:4 weight times the im2col matrix (dense conv elsewhere).

    The full F.unfold keeps GEMM column order, which the 2:4 blocks are defined along.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.geometry = _Geometry.of(conv)
        if conv.groups == 1:
            rows = conv.weight.reshape(conv.out_channels, -1)
            self.weight, self.impl, self.why = _nm_weight(rows, conv.weight)
        else:
            self.weight, self.impl, self.why = _frozen(conv.weight), "dense-fallback", _GROUPED
        self.bias = _frozen(conv.bias)
        self.conv_args = _conv_args(conv)

    def forward(self, x: Tensor) -> Tensor:
        if self.impl == "dense-fallback":
            return _dense_conv(self, x)
        cols, h, w = self.geometry.unfold(x)
        n, k, positions = cols.shape
        out = F.linear(cols.transpose(1, 2).reshape(-1, k), self.weight, self.bias)
        return out.view(n, positions, -1).transpose(1, 2).reshape(n, -1, h, w)


_COMPACT: dict[tuple[SparsityType, type[nn.Module]], type[nn.Module]] = {
    (SparsityType.CHANNEL, nn.Conv2d): ChannelConv2d,
    (SparsityType.CHANNEL, nn.Linear): ChannelLinear,
    (SparsityType.SHAPE, nn.Conv2d): ShapeConv2d,
    (SparsityType.SHAPE, nn.Linear): ShapeLinear,
    (SparsityType.IRREGULAR, nn.Conv2d): SparseConv2d,
    (SparsityType.IRREGULAR, nn.Linear): SparseLinear,
    (SparsityType.NM, nn.Conv2d): NMConv2d,
    (SparsityType.NM, nn.Linear): NMLinear,
}


def stored_weights(model: nn.Module) -> int:
    """The weights a model stores, as a deployed file holds them: its parameters, counting a 2:4
    weight as its kept half, plus the values of CSR layers (buffers, so that .to() moves them)."""
    semi = getattr(torch.sparse, "SparseSemiStructuredTensor", ())
    count = sum(p.numel() // 2 if isinstance(p.data, semi) else p.numel() for p in model.parameters())
    return count + sum(m.values.numel() for m in model.modules() if isinstance(m, _CSR))


def compact_layer(module: nn.Module, kind: SparsityType | str) -> nn.Module:
    """The compact module for an already-masked Conv2d or Linear, on its device and dtype."""
    kind = SparsityType(kind)
    if kind == SparsityType.FILTER:
        raise ValueError(
            "filter sparsity is not compacted layer by layer: removing whole output filters changes "
            "the consumers' input channels too, so the model-level compactor removes them; "
            "compact_layer accepts channel, shape, irregular and nm"
        )
    for layer_type in (nn.Conv2d, nn.Linear):
        if isinstance(module, layer_type):
            return _COMPACT[kind, layer_type](module)
    raise TypeError(f"module must be an nn.Conv2d or nn.Linear, got {type(module).__name__}")
