"""Compact layers give the masked dense layer's output, and say which kernel they run."""

from __future__ import annotations

import copy
import io
import time
import warnings

import pytest
import torch
from torch import Tensor, nn

from sparsesearch import native
from sparsesearch.kernels import (
    ChannelConv2d,
    ChannelLinear,
    NMConv2d,
    NMLinear,
    ShapeConv2d,
    ShapeLinear,
    SparseConv2d,
    SparseLinear,
    _Windows,
    compact_layer,
    stored_weights,
)
from sparsesearch.sparsity import SparsityType, project

TOLERANCE = 1e-5  # relative max error, float32
GATHER_GEMMS = [(SparsityType.SHAPE, ShapeConv2d), (SparsityType.CHANNEL, ChannelConv2d)]  # compiled-kernel layers


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def masked(module: nn.Module, kind: SparsityType, rate: float) -> nn.Module:
    """The module with its weight projected in place (rate = fraction of groups removed)."""
    with torch.no_grad():
        module.weight.copy_(project([module.weight], kind, rate)[0])
    return module.eval()


@pytest.fixture(autouse=True)
def seeded() -> None:
    torch.manual_seed(0)


def conv(**kw: object) -> nn.Conv2d:
    return nn.Conv2d(**{"in_channels": 4, "out_channels": 6, "kernel_size": 3, **kw})


def image(seed: int = 1) -> Tensor:
    """Odd, non-square input, so that a swapped height/width or an off-by-one shows."""
    return torch.randn(2, 4, 7, 6, generator=torch.Generator().manual_seed(seed))


def assert_same_output(compact: nn.Module, dense: nn.Module, x: Tensor) -> None:
    with torch.no_grad():
        got, want = compact(x), dense(x)
    assert got.shape == want.shape
    assert rel_err(got, want) <= TOLERANCE


@pytest.mark.parametrize("keep", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kernel_size", [1, 3, (3, 1)])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("padding", [0, 1, (1, 2)])
@pytest.mark.parametrize("stride", [1, 2])
def test_shape_conv_output_equals_masked_conv(
    stride: int, padding: int | tuple[int, int], dilation: int, groups: int,
    kernel_size: int | tuple[int, int], bias: bool, keep: float,
) -> None:
    dense = masked(conv(stride=stride, padding=padding, dilation=dilation, groups=groups,
                        kernel_size=kernel_size, bias=bias), SparsityType.SHAPE, 1 - keep)
    assert_same_output(ShapeConv2d(dense), dense, image())


def test_the_compiled_kernel_builds_on_this_machine() -> None:
    """The setup installs a C compiler: without the kernel, shape-wise layers run 1.2-2x slower."""
    assert native.unavailable() is None and native.kernel() is not None


@pytest.mark.parametrize(("kind", "layer"), GATHER_GEMMS)
@pytest.mark.parametrize("channels_last", [False, True])
# within one vector of a panel, a panel with a tail, and a panel then a tail within one vector (on AVX-512)
@pytest.mark.parametrize("out_channels", [6, 20, 40])
@pytest.mark.parametrize(("stride", "padding", "dilation", "kernel_size", "size"),
                         [(1, 1, 1, 3, (7, 6)), (2, (1, 2), 2, 3, (11, 9)), (1, "same", 2, (3, 2), (5, 8)),
                          (3, 0, 1, 1, (7, 6)), (1, 1, 1, 3, (2, 2)), (1, 0, 1, 1, (2, 2))])
# 1x1 without padding: the input read in place, not copied (but a sliced one); (2, 2): tiles run across samples
def test_gather_gemm_every_form_equals_masked_conv(stride: int, padding: int | tuple[int, int] | str,
                                                   dilation: int, kernel_size: int | tuple[int, int],
                                                   size: tuple[int, int], out_channels: int,
                                                   channels_last: bool, kind: SparsityType, layer: type) -> None:
    """Each form a shape- or channel-wise layer may choose (the compiled kernel on a channels-last or
    planar copy, the eager ones) gives the masked conv's output in the input's layout, batch 1 and 5,
    with and without bias, and on a strided (sliced) input."""
    for bias in (True, False):
        dense = masked(conv(out_channels=out_channels, stride=stride, padding=padding, dilation=dilation,
                            kernel_size=kernel_size, bias=bias), kind, 0.6 if kind == SparsityType.SHAPE else 0.5)
        compact = layer(dense)
        for x in (torch.randn(1, 4, *size), torch.randn(5, 4, *size), torch.randn(5, 8, *size)[:, ::2]):
            x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            ways = compact._ways(x)
            assert "fused" in ways and ("fused planar" in ways) != channels_last
            with torch.no_grad():
                want = dense(x)
                for name, way in ways.items():
                    got = way(x)
                    assert got.shape == want.shape and rel_err(got, want) <= TOLERANCE, name
                    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last, name
            assert compact(x).is_contiguous(memory_format=torch.channels_last) == channels_last  # as chosen


def test_shape_conv_runs_the_fastest_form_and_times_each_input_size_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forms are timed on a layer's first call for an input size and the fastest kept: a slow form
    is not chosen, and a second call of that size times nothing."""
    from sparsesearch import kernels

    assert kernels._fastest({"slow": lambda x: time.sleep(0.01), "quick": lambda x: x}, torch.zeros(1)) == "quick"
    timed = []
    monkeypatch.setattr(kernels, "_fastest", lambda ways, x: timed.append(x.shape) or "fused")
    dense = masked(conv(padding=1), SparsityType.SHAPE, 0.5)
    compact = ShapeConv2d(dense)
    for x in (image(), image(seed=2), torch.randn(3, 4, 9, 9)):
        assert_same_output(compact, dense, x)
    assert timed == [image().shape, (3, 4, 9, 9)]


@pytest.mark.parametrize(("kind", "layer"), GATHER_GEMMS)
def test_gather_gemm_prepared_for_an_input_size_follows_weights_replaced_after_it(
        kind: SparsityType, layer: type, monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer prepares its compiled call once per input size, with its weights packed: weights
    replaced afterwards (a new Parameter, as `to` or a user's surgery makes) or loaded in place are
    the ones used, never the packed copy of the old."""
    from sparsesearch import kernels

    monkeypatch.setattr(kernels, "_fastest", lambda ways, x: "fused")
    dense = masked(conv(padding=1), kind, 0.5)
    compact = layer(dense)
    x = image()
    assert_same_output(compact, dense, x)
    with torch.no_grad():
        dense.weight.mul_(2)
        dense.bias.add_(1)
    compact.weight = nn.Parameter(compact.weight * 2, requires_grad=False)
    compact.bias = nn.Parameter(compact.bias + 1, requires_grad=False)
    assert_same_output(compact, dense, x)
    with torch.no_grad():
        dense.weight.mul_(-1)
    compact.load_state_dict(layer(dense).state_dict())
    assert_same_output(compact, dense, x)
    assert compact.form(x) == "fused"


def test_shape_conv_prepared_calls_do_not_keep_the_layer_alive() -> None:
    """The prepared calls live beside the layer, in a weak mapping: they must hold no reference to it,
    or every compacted model ever run would stay in memory."""
    import gc
    import weakref

    compact = ShapeConv2d(masked(conv(padding=1), SparsityType.SHAPE, 0.5))
    with torch.no_grad():
        compact(image())
    assert compact.form(image()) is not None
    alive = weakref.ref(compact)
    del compact
    gc.collect()
    assert alive() is None


def test_shape_conv_with_weights_of_another_dtype_refuses_as_a_conv_does() -> None:
    """The compiled kernel reads float32 weights only: float64 weights with a float32 input must raise
    as torch's own conv does, never read the weights' bytes as float32."""
    dense = masked(conv(padding=1), SparsityType.SHAPE, 0.5)
    with torch.no_grad(), pytest.raises(RuntimeError):
        dense.double()(image())
    with torch.no_grad(), pytest.raises(RuntimeError):
        ShapeConv2d(dense).double()(image())


def test_convs_without_the_compiled_kernel_run_their_eager_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    """No compiler, a compiler that fails, a cache that cannot be written (or SPARSESEARCH_NATIVE=0): the
    kernel is unavailable, a warning says why (not when the user turned it off), and layers still give
    the masked conv's output."""
    dense = masked(conv(padding=1), SparsityType.SHAPE, 0.5)
    channel = masked(conv(padding=1), SparsityType.CHANNEL, 0.5)
    monkeypatch.setattr(native, "_WARNED", [])
    for setting, reason in ((("CC", "no-such-compiler"), "no C compiler"), (("CC", "false"), "false failed"),
                            (("XDG_CACHE_HOME", "/proc/no-cache"), "cannot write its cache"),
                            (("SPARSESEARCH_NATIVE", "0"), "=0")):
        monkeypatch.setenv(*setting)
        native._built.cache_clear()
        try:
            with warnings.catch_warnings(record=True) as warned:
                warnings.simplefilter("always")
                assert native.kernel() is None and reason in native.unavailable()
                assert_same_output(ShapeConv2d(dense), dense, image())
                assert_same_output(ChannelConv2d(channel), channel, image())
            assert [str(w.message) for w in warned] == (
                [] if setting[0] == "SPARSESEARCH_NATIVE" else
                [f"shape- and channel-wise convs run without their compiled kernel, up to 2x slower: "
                 f"{native.unavailable()}"])
            native._WARNED.clear()
        finally:
            monkeypatch.delenv(setting[0])
            native._built.cache_clear()
    assert native.kernel() is not None


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_shape_conv_folds_the_batch_only_on_small_planes_with_the_same_output(
        groups: int, bias: bool, batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below FOLD_BELOW output pixels a batch runs as one product per group, above it one per sample:
    both give the masked conv's output, and the fold is taken exactly where it should be."""
    monkeypatch.setattr(ShapeConv2d, "FUSED", False)
    dense = masked(conv(padding=1, groups=groups, bias=bias), SparsityType.SHAPE, 0.5)
    x = torch.randn(batch, 4, 7, 6)
    folded, fold = [], ShapeConv2d._folded
    monkeypatch.setattr(ShapeConv2d, "_folded", lambda self, cols: folded.append(1) or fold(self, cols))
    for below in (7 * 6, 7 * 6 + 1):
        monkeypatch.setattr(ShapeConv2d, "FOLD_BELOW", below)
        folded.clear()
        assert_same_output(ShapeConv2d(dense), dense, x)
        assert len(folded) == (batch > 1 and below > 7 * 6)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")  # deprecated, still asked for
@pytest.mark.parametrize(("stride", "padding", "dilation", "groups", "kernel_size"),
                         [(1, 1, 1, 1, 3), (2, (1, 2), 2, 1, 3), (1, 0, 1, 1, (3, 1)), (1, 1, 1, 2, 3)])
def test_shape_conv_of_a_channels_last_input_equals_masked_conv_in_its_layout(
        stride: int, padding: int | tuple[int, int], dilation: int, groups: int, kernel_size: int | tuple[int, int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A channels-last input is gathered in its own order and comes out channels-last (as from
    a conv), by the flat index, past FLAT_INDEX_MAX, with autograd, and traced at another size."""
    monkeypatch.setattr(ShapeConv2d, "FUSED", False)  # the eager forms (`test_shape_conv_every_form_...`: all)
    dense = masked(conv(stride=stride, padding=padding, dilation=dilation, groups=groups, kernel_size=kernel_size),
                   SparsityType.SHAPE, 0.5)
    compact = ShapeConv2d(dense)
    x, other = (t.to(memory_format=torch.channels_last) for t in (image(), torch.randn(3, 4, 11, 9)))
    for rows in (1 << 40, 0):  # torch's product, then oneDNN's where it can
        monkeypatch.setattr(ShapeConv2d, "ONEDNN_ROWS", rows)
        assert_same_output(compact, dense, x)
    with torch.no_grad():
        assert compact(x).is_contiguous(memory_format=torch.channels_last) == (groups == 1)
    grads = []
    for module in (compact, dense):  # oneDNN's product has no gradient: torch's runs under autograd
        leaf = x.clone().requires_grad_()
        module(leaf).square().sum().backward()
        grads.append(leaf.grad)
    assert rel_err(*grads) <= TOLERANCE
    traced = torch.jit.trace(ShapeConv2d(dense), image(seed=3).to(memory_format=torch.channels_last))
    with torch.no_grad():
        assert rel_err(traced(other), dense(other)) <= TOLERANCE
    monkeypatch.setattr(_Windows, "FLAT_INDEX_MAX", 0)
    assert_same_output(ShapeConv2d(dense), dense, other)


def test_shape_conv_multiplies_only_live_columns() -> None:
    dense = masked(conv(), SparsityType.SHAPE, 0.75)
    live = int(dense.weight.reshape(6, -1).ne(0).any(0).sum())
    assert live == 9  # 36 columns, 27 removed
    assert ShapeConv2d(dense).weight.shape == (1, 6, live)


def test_shape_conv_with_one_live_column_works() -> None:
    dense = conv(padding=1).eval()
    with torch.no_grad():
        dense.weight.zero_()
        dense.weight[:, 2, 0, 1] = torch.randn(6)
    compact = ShapeConv2d(dense)
    assert compact.weight.shape[-1] == 1
    assert_same_output(compact, dense, image())


def test_shape_conv_of_all_zero_weight_outputs_bias() -> None:
    dense = conv(padding=1).eval()
    with torch.no_grad():
        dense.weight.zero_()
    assert_same_output(ShapeConv2d(dense), dense, image())


def test_fully_kept_shape_conv_equals_dense_conv() -> None:
    dense = conv(stride=2, padding=1).eval()
    assert_same_output(ShapeConv2d(dense), dense, image())


def test_shape_conv_is_exact_for_columns_live_in_some_filters_only() -> None:
    dense = masked(conv(padding=1), SparsityType.IRREGULAR, 0.8)
    assert_same_output(ShapeConv2d(dense), dense, image())


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")  # torch's
@pytest.mark.parametrize(("kernel_size", "dilation"), [((2, 3), 1), ((3, 2), 1), (3, 2)])
def test_shape_conv_resolves_same_padding_as_torch(
    kernel_size: int | tuple[int, int], dilation: int
) -> None:
    """An even kernel extent pads one pixel more on the right/bottom than on the left/top."""
    dense = masked(conv(padding="same", dilation=dilation, kernel_size=kernel_size),
                   SparsityType.SHAPE, 0.5)
    assert_same_output(ShapeConv2d(dense), dense, image())


@pytest.mark.parametrize("kind", [SparsityType.SHAPE, SparsityType.IRREGULAR, SparsityType.NM])
@pytest.mark.parametrize("groups", [1, 2])  # groups=2: irregular and nm take the dense fallback
def test_compact_conv_refuses_non_zero_padding_mode(kind: SparsityType, groups: int) -> None:
    dense = masked(conv(padding=1, padding_mode="reflect", groups=groups), kind, 0.5)
    with pytest.raises(ValueError, match="padding_mode 'reflect'"):
        compact_layer(dense, kind)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")  # deprecated, still asked for
@pytest.mark.parametrize(("stride", "padding", "dilation", "groups"), [(1, 1, 1, 1), (2, (1, 2), 2, 2)])
def test_shape_conv_gathers_alike_by_flat_index_and_by_strided_view_at_any_input_size(
        stride: int, padding: int | tuple[int, int], dilation: int, groups: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The flat index (made per input size, often first in inference mode) and the strided view it
    falls back to past FLAT_INDEX_MAX gather the same elements; an index made in inference mode
    still serves a forward that autograd records."""
    monkeypatch.setattr(ShapeConv2d, "FUSED", False)
    compact = ShapeConv2d(masked(conv(stride=stride, padding=padding, dilation=dilation, groups=groups),
                                 SparsityType.SHAPE, 0.5))
    sizes = (image(), torch.randn(3, 4, 11, 9))
    with torch.inference_mode():
        flat = [compact(x) for x in sizes]
    assert compact(sizes[0].requires_grad_()).grad_fn is not None
    other = ShapeConv2d(masked(conv(stride=stride, padding=padding, dilation=dilation, groups=groups),
                               SparsityType.SHAPE, 0.5))  # other weights, other live columns
    loaded = copy.deepcopy(compact)
    loaded(sizes[0])
    loaded.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(sizes[0]), other(sizes[0]))  # its columns' index, not the old one
    monkeypatch.setattr(_Windows, "FLAT_INDEX_MAX", 0)
    viewed = copy.deepcopy(compact)  # a new module: no index made yet
    with torch.no_grad():
        assert all(torch.equal(f, viewed(x)) for f, x in zip(flat, sizes))


def test_shape_convs_share_one_scratch_and_each_output_stays_its_own() -> None:
    """Without autograd, a thread's shape layers gather into one reused buffer: what a layer returned
    must not change when the next one runs (and grows the buffer), in or out of inference mode."""
    from sparsesearch import kernels

    small = ShapeConv2d(masked(conv(padding=1), SparsityType.SHAPE, 0.5))
    big = ShapeConv2d(masked(conv(out_channels=8, kernel_size=5, padding=2), SparsityType.SHAPE, 0.3))
    x, large = image(), torch.randn(4, 4, 15, 13)
    with torch.no_grad():
        first = small(x)
        kept = first.clone()
        with torch.inference_mode():
            big(large)
        assert torch.equal(first, kept) and torch.equal(small(x), kept)
    gathered = len(big.im2col.channels) * 4 * 15 * 13  # the big layer's im2col, batch 4
    assert kernels._SCRATCH.buffers[torch.float32, 0].numel() >= gathered  # the gather went through it
    y = small(x.requires_grad_())  # autograd: the eager form, whichever form ran without it
    assert y.grad_fn is not None and rel_err(y.detach(), kept) <= TOLERANCE


def test_shape_conv_traces_to_same_output_for_other_input_sizes() -> None:
    dense = masked(conv(stride=2, padding=(1, 2), groups=2), SparsityType.SHAPE, 0.5)
    traced = torch.jit.trace(ShapeConv2d(dense), image(seed=3))
    x = torch.randn(3, 4, 11, 9)
    with torch.no_grad():
        assert rel_err(traced(x), dense(x)) <= TOLERANCE


def test_shape_conv_exports_to_onnx() -> None:
    onnx = pytest.importorskip("onnx")
    compact = ShapeConv2d(masked(conv(padding=1), SparsityType.SHAPE, 0.5))
    buffer = io.BytesIO()
    torch.onnx.export(compact, (image(),), dynamo=True, verbose=False).save(buffer)
    onnx.checker.check_model(onnx.load_from_string(buffer.getvalue()))


@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12)])
def test_shape_linear_output_equals_masked_linear(shape: tuple[int, ...]) -> None:
    dense = masked(nn.Linear(12, 5), SparsityType.SHAPE, 0.75)
    compact = ShapeLinear(dense)
    assert compact.weight.shape == (5, 3)
    assert_same_output(compact, dense, torch.randn(shape))


@pytest.mark.parametrize("rate", [0.5, 0.9])
@pytest.mark.parametrize(("stride", "padding", "dilation"), [(1, 0, 1), (2, 1, 1), (1, (1, 2), 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_conv_output_equals_masked_conv(
    rate: float, stride: int, padding: int | tuple[int, int], dilation: int, bias: bool
) -> None:
    dense = masked(conv(stride=stride, padding=padding, dilation=dilation, bias=bias),
                   SparsityType.IRREGULAR, rate)
    compact = SparseConv2d(dense)
    assert compact.impl == "csr"
    assert_same_output(compact, dense, image())


@pytest.mark.parametrize("rate", [0.5, 0.9])
def test_sparse_grouped_conv_falls_back_to_dense(rate: float) -> None:
    dense = masked(conv(groups=2, padding=1), SparsityType.IRREGULAR, rate)
    compact = SparseConv2d(dense)
    assert compact.impl == "dense-fallback"
    assert_same_output(compact, dense, image())


@pytest.mark.parametrize("rate", [0.5, 0.9])
@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12)])
def test_sparse_linear_output_equals_masked_linear(rate: float, shape: tuple[int, ...]) -> None:
    dense = masked(nn.Linear(12, 5), SparsityType.IRREGULAR, rate)
    compact = SparseLinear(dense)
    assert compact.impl == "csr"
    assert_same_output(compact, dense, torch.randn(shape))


def test_csr_stores_only_the_non_zero_weights() -> None:
    dense = masked(conv(), SparsityType.IRREGULAR, 0.9)
    compact = SparseConv2d(dense)
    assert compact.csr.values.numel() == int(dense.weight.ne(0).sum()) == 22  # 216 - 194
    assert stored_weights(compact) == 22 + dense.bias.numel()  # the CSR values count, though buffers


@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_csr_falls_back_to_dense_for_float16_on_cpu(layer: str) -> None:
    source = conv(padding=1) if layer == "conv" else nn.Linear(36, 6)
    x = image() if layer == "conv" else torch.randn(3, 36)
    dense = masked(source, SparsityType.IRREGULAR, 0.5).half()
    compact = compact_layer(dense, SparsityType.IRREGULAR)
    assert compact.impl == "dense-fallback" and compact.why == "no CSR kernel for float16 on cpu"
    with torch.no_grad():
        assert torch.equal(compact(x.half()), dense(x.half()))


@pytest.mark.parametrize("bias", [True, False])
def test_nm_conv_fallback_equals_masked_conv(bias: bool) -> None:
    dense = masked(conv(stride=2, padding=1, bias=bias), SparsityType.NM, 0.5)
    compact = NMConv2d(dense)
    assert compact.impl == "dense-fallback" and compact.why.startswith("no 2:4 kernel on cpu")
    assert_same_output(compact, dense, image())


def test_nm_linear_fallback_equals_masked_linear() -> None:
    dense = masked(nn.Linear(12, 5), SparsityType.NM, 0.5)
    compact = NMLinear(dense)
    assert compact.impl == "dense-fallback"
    assert_same_output(compact, dense, torch.randn(3, 12))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="2:4 semi-structured kernels need a CUDA GPU of compute capability >= 8.0",
)
@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_nm_uses_semi_structured_kernel_on_ampere(layer: str) -> None:
    source = (nn.Conv2d(64, 64, 3, padding=1) if layer == "conv" else nn.Linear(256, 128))
    dense = masked(source.cuda().half(), SparsityType.NM, 0.5)
    compact = compact_layer(dense, SparsityType.NM)
    assert compact.impl == "semi-structured"
    x = torch.randn(2, 64, 8, 8) if layer == "conv" else torch.randn(32, 256)
    x = x.cuda().half()
    with torch.no_grad():
        assert rel_err(compact(x).float(), dense(x).float()) <= 1e-2  # float16 accumulation order


@pytest.mark.parametrize(
    ("kind", "layer", "expected", "impl"),
    [
        (SparsityType.CHANNEL, "conv", ChannelConv2d, "channels-gathered"),
        (SparsityType.CHANNEL, "linear", ChannelLinear, "channels-gathered"),
        (SparsityType.SHAPE, "conv", ShapeConv2d, "reduced-gemm"),
        (SparsityType.SHAPE, "linear", ShapeLinear, "reduced-gemm"),
        (SparsityType.IRREGULAR, "conv", SparseConv2d, "csr"),
        (SparsityType.IRREGULAR, "linear", SparseLinear, "csr"),
        (SparsityType.NM, "conv", NMConv2d, "dense-fallback"),
        (SparsityType.NM, "linear", NMLinear, "dense-fallback"),
    ],
)
def test_compact_layer_picks_the_kernel_for_kind_and_records_it(
    kind: SparsityType, layer: str, expected: type[nn.Module], impl: str
) -> None:
    source = conv(padding=1) if layer == "conv" else nn.Linear(36, 6)
    x = image() if layer == "conv" else torch.randn(3, 36)
    dense = masked(source, kind, 0.5)
    compact = compact_layer(dense, kind.value)
    assert type(compact) is expected and compact.impl == impl
    assert_same_output(compact, dense, x)


@pytest.mark.parametrize("kind", [SparsityType.CHANNEL, SparsityType.SHAPE, SparsityType.IRREGULAR, SparsityType.NM])
def test_compact_conv_takes_a_channels_last_input(kind: SparsityType) -> None:
    """A CPU deployment may run the network channels-last; the gathered channels stay in that layout,
    as the dense conv's output does (an NCHW gather made the next conv convert it back)."""
    dense = masked(conv(padding=1), kind, 0.5)
    x = image().contiguous(memory_format=torch.channels_last)
    compact = compact_layer(dense, kind)
    assert_same_output(compact, dense, x)
    if kind == SparsityType.CHANNEL:
        with torch.no_grad():
            assert compact(x).is_contiguous(memory_format=torch.channels_last)


def test_compact_layer_refuses_filter_removal() -> None:
    with pytest.raises(ValueError, match="filter sparsity is not compacted layer by layer"):
        compact_layer(conv(), SparsityType.FILTER)


def test_compact_layer_refuses_other_modules() -> None:
    with pytest.raises(TypeError, match="nn.Conv2d or nn.Linear, got BatchNorm2d"):
        compact_layer(nn.BatchNorm2d(4), SparsityType.SHAPE)


@pytest.mark.parametrize("kind", [SparsityType.SHAPE, SparsityType.IRREGULAR, SparsityType.NM])
@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_compact_layer_keeps_float64(kind: SparsityType, layer: str) -> None:
    source = conv(padding=1) if layer == "conv" else nn.Linear(36, 6)
    x = image() if layer == "conv" else torch.randn(3, 36)
    dense = masked(source.double(), kind, 0.5)
    compact = compact_layer(dense, kind)
    tensors = [*compact.parameters(), *compact.buffers()]
    assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.float64}
    assert {t.device for t in tensors} == {dense.weight.device}
    with torch.no_grad():
        got = compact(x.double())
    assert got.dtype == torch.float64
    assert rel_err(got, dense(x.double()).detach()) <= 1e-12


@pytest.mark.parametrize("kind", [SparsityType.SHAPE, SparsityType.IRREGULAR, SparsityType.NM])
def test_compact_conv_follows_module_to_dtype(kind: SparsityType) -> None:
    dense = masked(conv(padding=1), kind, 0.5)
    compact = compact_layer(dense, kind).to(torch.float64)
    x = image().double()
    with torch.no_grad():
        got = compact(x)
        assert got.dtype == torch.float64
        assert rel_err(got, dense.double()(x)) <= 1e-12


@pytest.mark.parametrize("kind", [SparsityType.SHAPE, SparsityType.IRREGULAR, SparsityType.NM])
def test_compact_conv_survives_deepcopy_and_state_dict(kind: SparsityType) -> None:
    dense = masked(conv(padding=1), kind, 0.5)
    compact = compact_layer(dense, kind)
    clone = copy.deepcopy(compact)
    clone.load_state_dict(compact.state_dict())
    assert_same_output(clone, dense, image())
