"""Latency of one conv as its channel count falls one by one: does removing a filter always pay?

oneDNN (torch's CPU conv) computes channels in SIMD blocks (16 float32 with AVX-512, 8 with AVX2);
a channel count inside a block costs what the whole block costs. The profile's own scan
(`sparsesearch.profiler.steps.scan`: a 3x3 conv, 64 channels on the other side, 16x16 input, every
width 17-80 as outputs and as inputs, interleaved rounds) is run here at each batch size, and the
period it reads off is what the search aligns channel counts to.

Usage: python bench/channel_blocks.py [--threads 1] [--batch 1 8 32]   (run alone, pinned: taskset -c 1)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import record  # noqa: E402

from sparsesearch.profiler.measure import TIMING  # noqa: E402
from sparsesearch.profiler.steps import scan  # noqa: E402
from sparsesearch.runtime import set_threads  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    threads = set_threads(args.threads)
    rows, periods = [], []
    for batch in args.batch:
        found = scan(torch.device("cpu"), batch, torch.float32, TIMING)
        periods.append(f"batch {batch}: outputs {found['out']}, inputs {found['in']}")
        for w, out_ms, in_ms in zip(found["widths"], found["out_ms"], found["in_ms"]):
            rows.append({"batch": batch, "width": w, "as outputs ms": round(out_ms, 3), "as inputs ms": round(in_ms, 3)})
        print(periods[-1], flush=True)
    flags = " ".join(f for f in ("avx512f", "avx2") if f in Path("/proc/cpuinfo").read_text()) or "unknown"
    print(record("channel_blocks", rows, f"{found['conv']}, median per call, CPU ({flags}), {threads} threads. "
                                         f"Periods of the latency staircase found by the profile's scan: "
                                         f"{'; '.join(periods)} (1: no staircase)."))


if __name__ == "__main__":
    main()
