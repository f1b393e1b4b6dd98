"""Latency of one conv as its channel count falls one by one: does removing a filter always pay?

oneDNN (torch's CPU conv) computes channels in SIMD blocks (16 float32 with AVX-512, 8 with AVX2);
a channel count inside a block costs what the whole block costs. This is why the compaction
benchmark's speedups trail its MAC reductions: a 64-channel layer pruned 30% keeps 45 channels and
runs as 48. Each width timed alone (warm-up, 9 rounds, median), batch 32, 3x3 conv, c -> c channels.

Usage: python bench/channel_blocks.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import record  # noqa: E402

from sparsesearch.profiler.timing import compare  # noqa: E402
from sparsesearch.runtime import set_threads  # noqa: E402

CASES = ((16, 32, 64), (8, 96, 128))  # (input side, fewest channels, most channels)


def main() -> None:
    threads = set_threads(2)
    torch.manual_seed(0)
    rows = []
    for side, low, high in CASES:
        convs = {str(c): nn.Conv2d(c, c, 3, padding=1).eval() for c in range(low, high + 1)}
        for c, conv in convs.items():
            t = compare({c: conv}, torch.randn(32, int(c), side, side), rounds=9)[c]
            rows.append({"input": f"32x{c}x{side}x{side}", "channels": int(c), "ms": round(t.median_ms, 3),
                         "ms_per_mmac": round(t.median_ms / (32 * int(c) ** 2 * 9 * side * side / 1e6), 4),
                         "spread": round(t.spread, 3)})
            print(rows[-1], flush=True)
    flags = " ".join(f for f in ("avx512f", "avx2") if f in Path("/proc/cpuinfo").read_text()) or "unknown"
    print(record("channel_blocks", rows, f"3x3 conv c->c, batch 32, CPU ({flags}), {threads} threads, median of 9 "
                                          "rounds. Look for latency steps every 8 or 16 channels."))


if __name__ == "__main__":
    main()
