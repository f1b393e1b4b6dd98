"""Residual blocks removed whole against filter pruning of every block, on resnet56 at batch 1.

A plan that empties a block's inner conv (filter rate 1, `sparsity.REMOVED`) compacts to the constant
the block's branch leaves (`compact.Constant`); what is left of the block is its shortcut and the
addition. Filter pruning thins every block but keeps each one's convs, norms and calls. Both are
timed beside the dense network (seeded weights: latency does not depend on them), 1 thread,
interleaved rounds, with the MACs each leaves and the speedup the shipped profile predicts.

Run alone on a quiet core: `taskset -c 1 python bench/blocks.py [--profile PATH]`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import record  # noqa: E402

from sparsesearch.compact import pruned  # noqa: E402
from sparsesearch.layers import trace  # noqa: E402
from sparsesearch.models import create  # noqa: E402
from sparsesearch.plan import LayerSparsity, Plan  # noqa: E402
from sparsesearch.profiler.predictor import dense_latency, latency_model_for, predict_latency  # noqa: E402
from sparsesearch.profiler.timing import compare  # noqa: E402
from sparsesearch.runtime import set_threads  # noqa: E402
from sparsesearch.sparsity import REMOVED, SparsityType  # noqa: E402

SHAPE = (1, 32, 32)  # Fashion-MNIST as the resnet56 benchmarks feed it
PROFILE = Path(__file__).parent.parent / "hardware_profiles" / "cpu-amd-epyc-t1-b1-float32.json"


def plans(model: torch.nn.Module) -> dict[str, Plan]:
    """k of the 24 blocks without a shortcut conv removed, spread evenly over the stages; and every
    block's inner conv at a uniform filter rate."""
    inner = [layer.name for layer in trace(model, SHAPE) if layer.name.endswith(".conv1")]
    removable = [n for n in inner if not n.endswith(".0.conv1")]  # a stage's first block changes shape
    found = {f"{k} of {len(removable)} blocks removed": Plan({n: LayerSparsity(SparsityType.FILTER, REMOVED)
                                                            for n in removable[:: len(removable) // k][:k]})
             for k in (4, 8, 12)}
    return found | {f"inner convs at filter {r:.0%}": Plan({n: LayerSparsity(SparsityType.FILTER, r) for n in inner})
                    for r in (0.3, 0.5, 0.7)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", type=Path, default=PROFILE)
    args = parser.parse_args()
    set_threads(1)
    torch.manual_seed(0)
    model = create("resnet56", in_channels=SHAPE[0]).eval()
    latency = latency_model_for(model, SHAPE, torch.device("cpu"), 1, path=args.profile)
    dense_ms = dense_latency(latency, model, SHAPE).total_ms
    dense_macs = sum(layer.macs for layer in trace(model, SHAPE))
    compacted, rows = {"dense": model}, []
    for label, plan in plans(model).items():
        result = pruned(model, plan, SHAPE)[1]
        compacted[label] = result.model
        rows.append({"plan": label, "MAC reduction": round(dense_macs / sum(result.macs.values()), 2),
                     "predicted": round(dense_ms / predict_latency(latency, model, SHAPE, plan).total_ms, 2)})
    with torch.inference_mode():
        timings = compare(compacted, torch.randn(1, *SHAPE), rounds=15, reference="dense")
    for row in rows:
        row["measured"] = round(1 / timings[row["plan"]].relative, 2)
        row["ms"] = round(timings[row["plan"]].median_ms, 3)
        print(row, flush=True)
    print(record("blocks", rows, f"resnet56 at {SHAPE[1]}x{SHAPE[2]}, {SHAPE[0]} channel, batch 1, 1 thread: residual "
                 f"blocks removed whole (filter rate 1 on their inner conv) against every block's inner conv "
                 f"filter-pruned; speedup over the dense network ({timings['dense'].median_ms:.3f} ms) measured side "
                 f"by side (median of per-round ratios, 15 interleaved rounds) and predicted by {args.profile.name}; "
                 "MAC reduction over all convs and the classifier. Seeded untrained weights."))


if __name__ == "__main__":
    main()
