"""Measured speedup of compaction: MAC reduction vs latency speedup, per sparsity type and rate.

For each model, type and rate, a uniform plan is projected onto the (seeded, untrained) weights,
the masked model is compacted, and masked-dense and compacted are timed side by side in one run
(`profiler.timing.compare`: interleaved rounds, warm-up, median; inference mode; threads pinned)
at batch 1 and 32. The goal of the compaction issue: for filter/channel at batch >= 8, measured
speedup >= 0.95x the MAC reduction. Latency does not depend on the weights' values, only on which
are zero, so untrained weights time the same as trained ones.

Run alone (`make bench`): another busy process on the same cores distorts torch's threads.
Usage: python bench/compaction.py [MODEL ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import record  # noqa: E402

from sparsesearch.compact import dependencies, pruned  # noqa: E402
from sparsesearch.layers import trace  # noqa: E402
from sparsesearch.models import create  # noqa: E402
from sparsesearch.plan import Plan  # noqa: E402
from sparsesearch.profiler.timing import compare  # noqa: E402
from sparsesearch.runtime import set_threads  # noqa: E402
from sparsesearch.sparsity import SparsityType  # noqa: E402

# CIFAR-size models at their 32 px; torchvision ImageNet models at 64 px (224 px at batch 32
# takes seconds per call on 2 cores; the layers' relative costs are what the ratio measures)
MODELS = {"vgg16-bn": (3, 32, 32), "resnet56": (3, 32, 32), "tv:resnet18": (3, 64, 64), "tv:mobilenet_v2": (3, 64, 64)}
TYPES = (SparsityType.FILTER, SparsityType.CHANNEL, SparsityType.SHAPE, SparsityType.IRREGULAR)
RATES = (0.3, 0.5, 0.7, 0.9)
BATCHES = (1, 32)


def measure(name: str, shape: tuple[int, int, int]) -> list[dict[str, object]]:
    torch.manual_seed(0)
    base = create(name, in_channels=shape[0]).eval()
    deps = dependencies(base, shape)
    layers = trace(base, shape)
    dense_macs = sum(layer.macs for layer in layers)
    inputs = {b: torch.randn(b, *shape) for b in BATCHES}
    rows = []
    for kind in TYPES:
        for rate in RATES:
            masked, compacted = pruned(base, Plan.uniform(layers, kind, rate), shape, deps)
            macs = dense_macs / max(sum(compacted.macs.values()), 1)
            impls = sorted(set(compacted.impl.values()))
            for batch, x in inputs.items():
                t = compare({"dense": masked, "compacted": compacted.model}, x, rounds=9)
                speedup = t["dense"].median_ms / t["compacted"].median_ms
                rows.append({"model": name, "input": "x".join(map(str, shape)), "type": kind.value, "rate": rate,
                             "batch": batch, "mac_reduction": round(macs, 2),
                             "dense_ms": round(t["dense"].median_ms, 3), "compacted_ms": round(t["compacted"].median_ms, 3),
                             "speedup": round(speedup, 2), "speedup/mac": round(speedup / macs, 2),
                             "spread": round(max(t["dense"].spread, t["compacted"].spread), 3),
                             "impl": ",".join(impls), "left_dense": len(compacted.left_dense)})
                print(rows[-1], flush=True)
    return rows


def summarise(rows: list[dict[str, object]]) -> str:
    goal = [r for r in rows if r["type"] in ("filter", "channel") and r["batch"] >= 8]
    met = [r for r in goal if r["speedup/mac"] >= 0.95]
    short = ", ".join(f"{r['model']} {r['type']} {r['rate']:.0%} ({r['speedup']}x vs {r['mac_reduction']}x MACs)"
                      for r in goal if r["speedup/mac"] < 0.95)
    return (f"Goal (filter/channel, batch >= 8: speedup >= 0.95x MAC reduction) met in {len(met)}/{len(goal)} cases. "
            f"Short: {short or 'none'}. Untrained seeded weights, uniform plans, CPU, "
            f"{torch.get_num_threads()} threads, median of 9 interleaved rounds.")


def main() -> None:
    set_threads(2)
    names = sys.argv[1:] or list(MODELS)
    begin = time.time()
    rows = [row for name in names for row in measure(name, MODELS[name])]
    print(record("compaction", rows, summarise(rows) + f" Took {time.time() - begin:.0f} s."))


if __name__ == "__main__":
    main()
