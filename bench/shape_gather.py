"""The shape-wise im2col, two ways: a conv compacted to `reduced-gemm` timed beside the dense conv,
with its im2col built by the flat index (the default) and by indexing the strided view by channel,
kernel row and kernel column (what it did before, and still does past `_Windows.FLAT_INDEX_MAX`).
AlexNet's conv2-5 at 224 px, resnet56's 16- and 64-channel convs, a VGG 128-channel conv; random
weights projected to shape sparsity at 50% and 93.3% (the paper's 15x); batch 1 and 8; 1 thread,
interleaved rounds, median.
Then whole networks (`NETWORKS`), every conv shape-pruned, timed beside the masked dense network with
the im2col gathered into the thread's reused scratch buffer (now) and into a fresh tensor per call
(before): a fresh 100 MB tensor is a fresh mmap whose pages fault on first write.

Then (`layouts`) the same networks, dense and compacted, each in both memory layouts: NCHW and
channels-last, in which shape-wise gathers each pixel's columns in the input's own order.

Then (`ceiling`) where a channels-last AlexNet conv2-5 at 93.3% spends its time: the gather alone, the
product alone, and the dense conv's own im2col GEMM (all K columns, gathered beforehand), whose rate
against oneDNN's direct conv bounds any im2col form.

Run alone on a quiet core: `taskset -c 1 python bench/shape_gather.py [networks] [layers] [layouts]`.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import record  # noqa: E402

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
    """Whole networks, every conv shape-pruned, dense and compacted, in both memory layouts."""
    rows = []
    for name, shape, rate, batch in LAYOUT_NETWORKS:
        masked, compacted = shape_pruned(name, shape, rate)
        unfolded = variant(compacted, ShapeConv2d, FOLD_BELOW=0)  # a product per sample at any plane size
        t = compare({"dense": masked, "unfolded": unfolded, "compacted": compacted, "dense cl": _ChannelsLast(masked),
                     "compacted cl": _ChannelsLast(compacted)}, torch.randn(batch, *shape), rounds=9, reference="dense")
        rows.append({"network": name, "rate": rate, "batch": batch, "dense ms": round(t["dense"].median_ms, 2),
                     "compacted, per sample": round(1 / t["unfolded"].relative, 2),
                     "compacted": round(1 / t["compacted"].relative, 2),
                     "dense channels-last": round(1 / t["dense cl"].relative, 2),
                     "compacted channels-last": round(1 / t["compacted cl"].relative, 2),
                     "channels-last over channels-last": round(t["dense cl"].relative / t["compacted cl"].relative, 2)})
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
    """AlexNet's conv2-5 at the paper's 15x, channels-last: each step of the compact form timed beside
    the dense conv, and the speedup the product would reach at the rate of the dense conv's own GEMM."""
    torch.manual_seed(0)
    rows = []
    for name, cin, cout, k, pad, side in LAYERS[:4]:
        conv = nn.Conv2d(cin, cout, k, padding=pad).eval()
        with torch.no_grad():
            conv.weight.copy_(project([conv.weight], SparsityType.SHAPE, 0.933)[0])
        conv = conv.to(memory_format=torch.channels_last)
        every = copy.deepcopy(conv)
        with torch.no_grad():  # every column live: the shape form of the dense conv, its full im2col GEMM
            every.weight.add_(1e-3)
        compact, full = ShapeConv2d(conv).eval(), ShapeConv2d(every).eval()
        for batch in BATCHES:
            x = torch.randn(batch, cin, side, side).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                t = compare({"dense": conv, "compact": compact,
                             "gather": _Fixed(compact.im2col.pixel_rows, x),
                             "product": _Fixed(compact._pixel_product, compact.im2col.pixel_rows(x).clone()),
                             "dense GEMM": _Fixed(full._pixel_product, full.im2col.pixel_rows(x).clone())},
                            x, rounds=9, reference="dense")
            reduction = conv.weight.numel() / compact.weight.numel()
            speedup = 1 / t["compact"].relative
            rows.append({"layer": name, "batch": batch, "dense conv ms": round(t["dense"].median_ms, 3),
                         "MAC reduction": round(reduction, 1), "speedup": round(speedup, 2),
                         "speedup / MACs": round(speedup / reduction, 2),
                         "gather ms": round(t["gather"].median_ms, 3), "product ms": round(t["product"].median_ms, 3),
                         "product alone": round(1 / t["product"].relative, 2),
                         "dense GEMM / conv ms": round(t["dense GEMM"].relative, 2),
                         "GEMM-rate bound": round(reduction / t["dense GEMM"].relative, 1)})
            print(rows[-1], flush=True)
    return rows


def networks() -> list[dict[str, object]]:
    """Whole networks, every conv shape-pruned: the scratch buffer against a fresh im2col per call."""
    rows = []
    for name, shape, rate, batch in NETWORKS:
        masked, compacted = shape_pruned(name, shape, rate)
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
    parts = sys.argv[1:] or ["layers", "networks", "layouts", "ceiling"]
    if "ceiling" in parts:
        print(record("shape_ceiling", ceiling(), "AlexNet's conv2-5 (224 px input) at 93.3% shape sparsity "
                     "(random weights), channels-last, timed beside the dense conv (oneDNN's direct conv, "
                     "channels-last): the compact layer; its two steps alone, the gather of the reduced im2col "
                     "and the product over it; and the dense conv computed as the same product over all its "
                     "columns (`dense GEMM / conv ms`: that GEMM's time over the conv's). `GEMM-rate bound`: the "
                     "speedup of a product at that GEMM's rate with a free gather, MAC reduction / that ratio. "
                     "1 thread, median of 9 interleaved rounds."))
    if "layouts" in parts:
        print(record("shape_layouts", layouts(), "Whole networks, every conv shape-pruned (random weights), dense "
                     "and compacted, each in NCHW (contiguous) and channels-last (weights and input; the input "
                     "converted on each call). Speedups over the NCHW dense network; `per sample`: one product per "
                     "sample on every plane (before the batch was folded on small planes); the last column, "
                     "compacted over dense, both channels-last. 1 thread, median of 9 interleaved rounds."))
    if "networks" in parts:
        print(record("shape_scratch", networks(), "Whole networks, every conv shape-pruned (random weights), "
                     "speedup over the masked dense network with the im2col gathered into a fresh tensor per call "
                     "(before) and into the thread's reused scratch buffer (now); 1 thread, median of 9 interleaved "
                     "rounds."))
    if "layers" in parts:
        layers()


def layers() -> None:
    torch.manual_seed(0)
    rows = []
    for name, cin, cout, k, pad, side in LAYERS:
        for rate in RATES:
            conv = nn.Conv2d(cin, cout, k, padding=pad).eval()
            with torch.no_grad():
                conv.weight.copy_(project([conv.weight], SparsityType.SHAPE, rate)[0])
            flat = ShapeConv2d(conv).eval()
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
    print(record("shape_gather", rows, "Speedup over the dense conv of one shape-wise conv compacted to reduced-gemm, "
                 "its im2col built by indexing the strided view (before) and by the flat index (now, into the "
                 "thread's scratch buffer); 1 thread, median of 9 interleaved rounds."))


if __name__ == "__main__":
    main()
