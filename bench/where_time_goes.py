"""Where a compacted network's time goes, by operator, against the dense network: why a speedup
falls short of its MAC reduction.

For each model, a uniform filter and channel plan at 50% is projected onto seeded weights and
compacted; the dense, filter and channel networks are timed side by side (interleaved rounds,
median, `profiler.timing.compare`) for the speedup, then run under torch.profiler for each
operator's own CPU time (convolution, max pooling, batch norm, ReLU, residual additions, the
channel gathers and layout copies). Both memory layouts are measured: NCHW (what a model is by
default, and what sparsesearch times) and channels-last (`model.to(memory_format=...)`, which a
CPU deployment may choose). 1 thread; run alone, pinned (`taskset -c 1`).

Usage: python bench/where_time_goes.py [--batch B] [MODEL@SIDE ...]   (default tv:resnet18@224 tv:resnet50@224)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from common import record  # noqa: E402

from sparsesearch.compact import dependencies, pruned  # noqa: E402
from sparsesearch.layers import trace  # noqa: E402
from sparsesearch.models import create  # noqa: E402
from sparsesearch.plan import Plan  # noqa: E402
from sparsesearch.profiler.timing import compare  # noqa: E402
from sparsesearch.runtime import set_threads  # noqa: E402
from sparsesearch.sparsity import SparsityType  # noqa: E402

# operator (aten name, as the profiler reports it) -> the column it is counted in
OPS = {"aten::mkldnn_convolution": "conv", "aten::_slow_conv2d_forward": "conv",  # NCHW 1x1 convs take the latter
       "aten::max_pool2d_with_indices": "max pool", "aten::max_pool2d": "max pool",
       "aten::native_batch_norm": "batch norm", "aten::clamp_min_": "relu", "aten::clamp_min": "relu",
       "aten::add_": "add", "aten::index_select": "gather", "aten::gather": "gather", "aten::copy_": "copy"}
# "compiled": the time of a call outside any torch operator: the compiled kernel's calls (shape-wise layers, and
# channel-wise ones where it is the faster), which the profiler does not see, plus Python between operators
COLUMNS = ("conv", "compiled", "max pool", "batch norm", "relu", "add", "gather", "copy", "other")
LAYOUTS = {"NCHW": torch.contiguous_format, "channels-last": torch.channels_last}


def by_operator(models: dict[str, nn.Module], x: torch.Tensor, rounds: int = 3) -> dict[str, dict[str, float]]:
    """Each model's own CPU ms per call by column, from torch.profiler: one call per model per
    round, models interleaved (a VM's speed drifts between minutes), after one warm-up call each."""
    spent: dict[str, Counter[str]] = {name: Counter() for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(x)
        for _ in range(rounds):
            for name, model in models.items():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    start = time.perf_counter()
                    model(x)
                    wall = (time.perf_counter() - start) * 1000
                in_ops = 0.0
                for event in prof.key_averages():
                    spent[name][OPS.get(event.key, "other")] += event.self_cpu_time_total / 1000 / rounds
                    in_ops += event.self_cpu_time_total / 1000
                spent[name]["compiled"] += max(wall - in_ops, 0.0) / rounds
    return {name: {column: ops[column] for column in COLUMNS} for name, ops in spent.items()}


def measure(name: str, side: int, batch: int) -> list[dict[str, object]]:
    shape = (3, side, side)
    torch.manual_seed(0)
    dense = create(name).eval()
    deps, layers = dependencies(dense, shape), trace(dense, shape)
    dense_macs = sum(layer.macs for layer in layers)
    networks: dict[str, tuple[nn.Module, float]] = {"dense": (dense, 1.0)}
    for kind in (SparsityType.FILTER, SparsityType.CHANNEL):
        compacted = pruned(dense, Plan.uniform(layers, kind, 0.5), shape, deps)[1]
        networks[f"{kind.value} 50%"] = (compacted.model, dense_macs / sum(compacted.macs.values()))
    rows = []
    for layout, fmt in LAYOUTS.items():
        x = torch.randn(batch, *shape).contiguous(memory_format=fmt)
        models = {arm: model.to(memory_format=fmt) for arm, (model, _) in networks.items()}
        with torch.inference_mode():
            timing = compare(models, x, rounds=7, reference="dense")
        spent = by_operator(models, x)
        for arm, (_, reduction) in networks.items():
            ops = spent[arm]
            speedup = timing["dense"].median_ms / timing[arm].median_ms
            conv_speedup = (spent["dense"]["conv"] + spent["dense"]["compiled"]) / (ops["conv"] + ops["compiled"])
            rows.append({"model": f"{name}@{side}", "batch": batch, "layout": layout, "network": arm,
                         "ms": round(timing[arm].median_ms, 1), "MAC reduction": round(reduction, 2),
                         "speedup": round(speedup, 2), "speedup / MACs": round(speedup / reduction, 2),
                         "conv speedup": round(conv_speedup, 2),
                         **{f"{column} ms": round(ops[column], 1) for column in COLUMNS}})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*", default=["tv:resnet18@224", "tv:resnet50@224"])
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    set_threads(1)
    begin = time.time()
    rows = []
    for spec in args.models:
        name, _, side = spec.partition("@")
        rows += measure(name, int(side or 224), args.batch)
    summary = (f"Uniform filter and channel plans at 50% on seeded weights, compacted, timed side by side with "
               f"the dense network (median of 7 interleaved rounds, 1 thread), batch {args.batch}; the `... ms` "
               f"columns are each operator's own CPU time per call under torch.profiler (separate runs, the networks "
               f"interleaved, so they need not sum to `ms`); `compiled ms`: the time outside any torch operator (the "
               f"compiled kernel, which the profiler does not see, and Python between operators). conv speedup: the "
               f"convolutions' time (conv + compiled), dense over compacted. Took {time.time() - begin:.0f} s.")
    print(record("where_time_goes", rows, summary))


if __name__ == "__main__":
    main()
