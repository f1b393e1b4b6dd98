"""Shape-wise convs, measured: a conv compacted to `reduced-gemm` timed beside the dense conv.

`layers`, `networks` (the eager form's im2col): built by the flat index (the default) and by indexing
the strided view by channel, kernel row and kernel column (what it did before, and still does past
`_Windows.FLAT_INDEX_MAX`), on AlexNet's conv2-5 at 224 px, resnet56's 16- and 64-channel convs and a
VGG 128-channel conv at 50% and 93.3% (the paper's 15x), batch 1 and 8; then whole networks
(`NETWORKS`) with the im2col gathered into the thread's reused scratch buffer and into a fresh tensor
per call: a fresh 100 MB tensor is a fresh mmap whose pages fault on first write.

`layouts`: the same networks, dense and compacted, in both memory layouts, compacted with the eager
forms only and as they run now (the compiled kernel where faster).

`ceiling`: AlexNet's conv2-5 at 93.3%, both layouts: the layer as it runs against its eager form, and
where the eager form spends its time (the gather alone, the product alone, and the dense conv's own
im2col GEMM, whose rate against oneDNN's direct conv bounds any form that builds the im2col).

Random weights; 1 thread, interleaved rounds, median. Run alone on a quiet core:
`taskset -c 1 python bench/shape_gather.py [layers] [networks] [layouts] [ceiling] [--tag=MACHINE]`
(`--tag`: appended to the results' names).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_tag, record  # noqa: E402

from sparsesearch.compact import pruned  # noqa: E402
from sparsesearch.kernels import ShapeConv2d, _Windows  # noqa: E402
from sparsesearch.layers import trace  # noqa: E402
from sparsesearch.models import create  # noqa: E402
from sparsesearch.plan import LayerSparsity, Plan  # noqa: E402
from sparsesearch.profiler.timing import compare  # noqa: E402
from sparsesearch.runtime import set_threads  # noqa: E402
from sparsesearch.sparsity import SparsityType, project  # noqa: E402

LAYERS = [("alexnet conv2", 64, 192, 5, 2, 27), ("alexnet conv3", 192, 384, 3, 1, 13),
          ("alexnet conv4", 384, 256, 3, 1, 13), ("alexnet conv5", 256, 256, 3, 1, 13),
          ("resnet56 16ch 32x32", 16, 16, 3, 1, 32), ("resnet56 64ch 8x8", 64, 64, 3, 1, 8),
          ("vgg 128ch 16x16", 128, 128, 3, 1, 16)]
RATES, BATCHES = (0.5, 0.933), (1, 8)
NETWORKS = [("vgg16-bn", (3, 32, 32), 0.3, 32), ("vgg16-bn", (3, 32, 32), 0.5, 32),
            ("tv:alexnet", (3, 224, 224), 0.933, 1), ("tv:alexnet", (3, 224, 224), 0.933, 8)]
LAYOUT_NETWORKS = NETWORKS[:1] + [("vgg16-bn", (3, 32, 32), 0.3, 1)] + NETWORKS[1:]


def shape_pruned(name: str, shape: tuple[int, ...], rate: float) -> tuple[nn.Module, nn.Module]:
    """A seeded network with every conv at `rate` shape sparsity: masked, and compacted."""
    torch.manual_seed(0)
    model = create(name, in_channels=shape[0]).eval()
    plan = Plan({layer.name: LayerSparsity(SparsityType.SHAPE, rate)
                 for layer in trace(model, shape) if layer.kind == "conv"})
    masked, compacted = pruned(model, plan, shape)
    return masked, compacted.model


def variant(model: nn.Module, kind: type, **settings: object) -> nn.Module:
    """A copy of `model` whose `kind` modules each carry `settings` (as their own attributes: the
    class's, which `model` keeps, stay as they are)."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if isinstance(module, kind):
            vars(module).update(settings)
    return copied


class _ChannelsLast(nn.Module):
    """A model run channels-last, weights and input (the input converted on each call, as a
    deployment fed NCHW images would)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


def layouts() -> list[dict[str, object]]:
    """Whole networks, every conv shape-pruned, dense and compacted, in both memory layouts; compacted
    with its eager forms only (before) and with the compiled kernel where faster (now)."""
    rows = []
    for name, shape, rate, batch in LAYOUT_NETWORKS:
        masked, compacted = shape_pruned(name, shape, rate)
        eager = variant(compacted, ShapeConv2d, FUSED=False)
        t = compare({"dense": masked, "eager": eager, "compacted": compacted, "dense cl": _ChannelsLast(masked),
                     "eager cl": _ChannelsLast(eager), "compacted cl": _ChannelsLast(compacted)},
                    torch.randn(batch, *shape), rounds=9, reference="dense")
        over_cl = t["dense cl"].relative
        rows.append({"network": name, "rate": rate, "batch": batch, "dense ms": round(t["dense"].median_ms, 2),
                     "NCHW, eager": round(1 / t["eager"].relative, 2),
                     "NCHW, compiled": round(1 / t["compacted"].relative, 2),
                     "dense channels-last": round(1 / over_cl, 2),
                     "channels-last, eager": round(over_cl / t["eager cl"].relative, 2),
                     "channels-last, compiled": round(over_cl / t["compacted cl"].relative, 2)})
        print(rows[-1], flush=True)
    return rows


class _Fixed(nn.Module):
    """One step of a compact conv on an operand prepared beforehand (the input it is given is ignored),
    so that `compare` times that step alone, interleaved with the whole layer."""

    def __init__(self, step: object, operand: torch.Tensor) -> None:
        super().__init__()
        self.step, self.operand = step, operand

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.step(self.operand)


def ceiling() -> list[dict[str, object]]:
    """AlexNet's conv2-5 at the paper's 15x, in both layouts: the layer as it runs (the compiled kernel,
    which never builds the im2col, where faster) and its eager form, beside the dense conv; the layer
    with every column kept, as it runs (the kernel's own rate against oneDNN's, where no per-call cost
    is large beside the product: what the speedup over MACs would be if the copy of the padded input
    and the writing of the output shrank with the MACs, which they do not); channels-last, the eager
    form's two steps alone, and the speedup a product at the rate of the dense conv's own GEMM would
    reach with a free gather."""
    torch.manual_seed(0)
    rows = []
    for name, cin, cout, k, pad, side in LAYERS[:4]:
        for channels_last in (True, False):
            conv = nn.Conv2d(cin, cout, k, padding=pad).eval()
            with torch.no_grad():
                conv.weight.copy_(project([conv.weight], SparsityType.SHAPE, 0.933)[0])
            layout = torch.channels_last if channels_last else torch.contiguous_format
            conv = conv.to(memory_format=layout)
            every = copy.deepcopy(conv)
            with torch.no_grad():  # every column live: the shape form of the dense conv, its full im2col GEMM
                every.weight.add_(1e-3)
            compact, full = ShapeConv2d(conv).eval(), ShapeConv2d(every).eval()
            eager = copy.deepcopy(compact)
            eager.FUSED = False
            for batch in BATCHES:
                x = torch.randn(batch, cin, side, side).contiguous(memory_format=layout)
                models = {"dense": conv, "compact": compact, "eager": eager, "every column": full}
                if channels_last:
                    models |= {"gather": _Fixed(eager.im2col.pixel_rows, x),
                               "product": _Fixed(eager._pixel_product, eager.im2col.pixel_rows(x).clone()),
                               "dense GEMM": _Fixed(full._pixel_product, full.im2col.pixel_rows(x).clone())}
                with torch.no_grad():
                    t = compare(models, x, rounds=9, reference="dense")
                reduction = conv.weight.numel() / compact.weight.numel()
                speedup, before = 1 / t["compact"].relative, 1 / t["eager"].relative
                row = {"layer": name, "layout": "channels-last" if channels_last else "NCHW", "batch": batch,
                       "dense conv ms": round(t["dense"].median_ms, 3), "MAC reduction": round(reduction, 1),
                       "speedup": round(speedup, 2), "speedup / MACs": round(speedup / reduction, 2),
                       "form": compact.form(x), "every column kept": round(1 / t["every column"].relative, 2),
                       "eager speedup": round(before, 2), "eager / MACs": round(before / reduction, 2)}
                steps = {"eager gather ms": "gather", "eager product ms": "product",
                         "dense GEMM / conv ms": "dense GEMM"}
                row |= {column: "" for column in [*steps, "GEMM-rate bound"]}  # channels-last only
                if channels_last:
                    row |= {column: round(t[step].median_ms, 3) for column, step in steps.items()}
                    row |= {"dense GEMM / conv ms": round(t["dense GEMM"].relative, 2),
                            "GEMM-rate bound": round(reduction / t["dense GEMM"].relative, 1)}
                rows.append(row)
                print(rows[-1], flush=True)
    return rows


def networks() -> list[dict[str, object]]:
    """Whole networks, every conv shape-pruned: the scratch buffer against a fresh im2col per call."""
    rows = []
    for name, shape, rate, batch in NETWORKS:
        masked, compacted = shape_pruned(name, shape, rate)
        compacted = variant(compacted, ShapeConv2d, FUSED=False)  # the eager form, whose im2col this compares
        fresh = variant(compacted, _Windows, SCRATCH=False)
        t = compare({"dense": masked, "fresh": fresh, "scratch": compacted}, torch.randn(batch, *shape),
                    rounds=9, reference="dense")
        rows.append({"layer": f"{name} (network)", "rate": rate, "batch": batch,
                     "dense ms": round(t["dense"].median_ms, 3), "fresh im2col": round(1 / t["fresh"].relative, 2),
                     "scratch": round(1 / t["scratch"].relative, 2)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    set_threads(1)
    suffix, parts = machine_tag(sys.argv[1:])
    parts = parts or ["layers", "networks", "layouts", "ceiling"]
    if "ceiling" in parts:
        print(record(f"shape_ceiling{suffix}", ceiling(), "AlexNet's conv2-5 (224 px input) at 93.3% shape sparsity "
                     "(random weights), channels-last and NCHW, timed beside the dense conv (oneDNN's direct conv, "
                     "in the same layout): the layer as it runs (`form`: the compiled gather-GEMM on a channels-last "
                     "(`fused`) or NCHW (`fused planar`) copy of the padded input, or the eager form, whichever its "
                     "first call timed faster) and its eager form (the reduced im2col built, then torch's product: "
                     "before). Channels-last, the eager form's two steps alone, and the dense conv computed as the "
                     "same product over all its columns (`dense GEMM / conv ms`: that GEMM's time over the conv's); "
                     "`GEMM-rate bound`: the speedup of a product at that GEMM's rate with a free gather. `every "
                     "column kept`: the layer with no column pruned, as it runs, over the dense conv (the kernel's own "
                     "rate against oneDNN's, where the per-call copy of the padded input and the writing of the "
                     "output are small beside the product; at 15x fewer MACs they are not). 1 thread, median of 9 "
                     "interleaved rounds."))
    if "layouts" in parts:
        print(record(f"shape_layouts{suffix}", layouts(), "Whole networks, every conv shape-pruned (random weights), "
                     "dense and compacted, each in NCHW (contiguous) and channels-last (weights and input; the input "
                     "converted on each call); compacted with its eager forms only (before the compiled kernel) and "
                     "as it runs now (each shape-wise layer in the faster of the compiled kernel and its eager "
                     "form). NCHW speedups are over the NCHW dense network, channels-last ones over the "
                     "channels-last dense network (`dense channels-last`: its speedup over NCHW). 1 thread, median "
                     "of 9 interleaved rounds."))
    if "networks" in parts:
        print(record(f"shape_scratch{suffix}", networks(), "Whole networks, every conv shape-pruned (random weights), "
                     "speedup over the masked dense network with the im2col gathered into a fresh tensor per call "
                     "(before) and into the thread's reused scratch buffer (now); 1 thread, median of 9 interleaved "
                     "rounds."))
    if "layers" in parts:
        layers(suffix)


def layers(suffix: str = "") -> None:
    torch.manual_seed(0)
    rows = []
    for name, cin, cout, k, pad, side in LAYERS:
        for rate in RATES:
            conv = nn.Conv2d(cin, cout, k, padding=pad).eval()
            with torch.no_grad():
                conv.weight.copy_(project([conv.weight], SparsityType.SHAPE, rate)[0])
            flat = ShapeConv2d(conv).eval()
            flat.FUSED = False  # the eager form, whose im2col this compares
            viewed = copy.deepcopy(flat)
            viewed.im2col.FLAT_INDEX_MAX = 0  # this module only: the strided view
            for batch in BATCHES:
                t = compare({"dense": conv, "view": viewed, "flat": flat}, torch.randn(batch, cin, side, side),
                            rounds=9, reference="dense")
                rows.append({"layer": name, "rate": rate, "batch": batch, "dense ms": round(t["dense"].median_ms, 3),
                             "strided view": round(1 / t["view"].relative, 2),
                             "flat index": round(1 / t["flat"].relative, 2),
                             "MAC reduction": round(conv.weight.numel() / flat.weight.numel(), 1)})
                print(rows[-1], flush=True)
    print(record(f"shape_gather{suffix}", rows, "Speedup over the dense conv of one shape-wise conv compacted to "
                 "reduced-gemm, its im2col built by indexing the strided view (before) and by the flat index (now, "
                 "into the thread's scratch buffer); 1 thread, median of 9 interleaved rounds."))


if __name__ == "__main__":
    main()
