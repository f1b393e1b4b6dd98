"""The speedup a user deploys: compacted vs dense in eager PyTorch and as frozen TorchScript.

sparsesearch measures (and profiles) eager modules. A deployment may instead freeze the traced
model (`torch.jit.freeze` + `torch.jit.optimize_for_inference`: BatchNorm folded into the conv,
weights prepacked for oneDNN), which makes the dense network itself faster; the speedup that
counts there is compacted-frozen over dense-frozen. For each model, uniform filter plans are
projected onto seeded weights and compacted; dense and compacted, eager and frozen, are timed side
by side in one run (interleaved rounds, median), 1 thread, and each frozen output is checked
against its eager model.

Run alone, pinned (`taskset -c 1`). Usage: python bench/deploy_forms.py [MODEL@SIDE ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import record  # noqa: E402

from sparsesearch.compact import dependencies, pruned  # noqa: E402
from sparsesearch.layers import trace  # noqa: E402
from sparsesearch.models import create  # noqa: E402
from sparsesearch.plan import Plan  # noqa: E402
from sparsesearch.profiler.timing import compare  # noqa: E402
from sparsesearch.runtime import set_threads  # noqa: E402
from sparsesearch.sparsity import SparsityType  # noqa: E402

RATES = (0.3, 0.5, 0.7)
BATCHES = (1, 8)


def frozen(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The model as a frozen, inference-optimised TorchScript module, its output checked."""
    with torch.no_grad():
        out = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, x)))
        error = (out(x) - model(x)).abs().max().item() / model(x).abs().max().item()
    if error > 1e-3:
        raise AssertionError(f"frozen model differs from eager by {error:.2g} (relative)")
    return out


def measure(name: str, side: int, batch: int) -> list[dict[str, object]]:
    channels = 1 if name == "resnet56" else 3  # resnet56 as the arms benchmark runs it, on Fashion-MNIST
    shape = (channels, side, side)
    torch.manual_seed(0)
    dense = create(name, in_channels=channels).eval()
    deps, layers = dependencies(dense, shape), trace(dense, shape)
    nets = {"dense": dense} | {f"filter {rate:.0%}": pruned(dense, Plan.uniform(layers, SparsityType.FILTER, rate),
                                                             shape, deps)[1].model.eval() for rate in RATES}
    x = torch.randn(batch, *shape)
    models = {f"{net} {form}": model if form == "eager" else frozen(model, x)
              for net, model in nets.items() for form in ("eager", "frozen")}
    with torch.inference_mode():
        t = compare(models, x, rounds=15, reference="dense eager")
    ms = {k: v.median_ms for k, v in t.items()}
    return [{"model": f"{name}@{side}", "batch": batch, "network": net,
             "eager ms": round(ms[f"{net} eager"], 3), "frozen ms": round(ms[f"{net} frozen"], 3),
             "frozen gain": round(ms[f"{net} eager"] / ms[f"{net} frozen"], 2),
             "speedup eager": round(ms["dense eager"] / ms[f"{net} eager"], 2),
             "speedup frozen": round(ms["dense frozen"] / ms[f"{net} frozen"], 2),
             "vs dense frozen, eager": round(ms["dense frozen"] / ms[f"{net} eager"], 2)}
            for net in nets]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*", default=["resnet56@32", "tv:resnet18@224"])
    args = parser.parse_args()
    set_threads(1)
    begin, rows = time.time(), []
    for spec in args.models:
        name, _, side = spec.partition("@")
        for batch in BATCHES:
            rows += measure(name, int(side or 224), batch)
            print(rows[-1], flush=True)
    summary = (f"Uniform filter plans on seeded weights, compacted; dense and compacted timed side by side, eager and "
               f"as frozen TorchScript (trace + torch.jit.freeze + optimize_for_inference), median of 15 interleaved "
               f"rounds, 1 thread. speedup eager / frozen: over the dense network in the same form; vs dense frozen, "
               f"eager: the eager compacted network over the frozen dense one. Took {time.time() - begin:.0f} s.")
    print(record("deploy_forms", rows, summary))


if __name__ == "__main__":
    main()
