"""The channel widths at which this device's latency steps, read off a scan of one conv.

oneDNN (torch's CPU conv) computes float32 channels in SIMD blocks, 16 wide with AVX-512 and 8 with
AVX2; GPUs tile. A width inside a block costs what the whole block costs (`bench/channel_blocks.py`:
keeping 45 of 64 channels costs what 48 does), so a plan that keeps 45 spends accuracy on three
channels that buy no time. In channels-last it is worse: each set bit of the remainder costs about
a block (`blocks`). The profile times one 3x3 conv at every width of a range, once varying
its outputs and once its inputs, in the profile's memory layout, and finds the period of each
staircase (1 where none stands out of the noise); `profile` records and prints it. The search
keeps filter counts at multiples of it (`Plan.aligned`), and the profile times those counts, in
layers at least `sparsity.MIN_BLOCKS` steps wide: narrower ones gain from every channel removed
(on resnet56 at batch 8, raising its 16- and 32-channel layers to a step left them unpruned and the
network slower, bench/results/alignment-resnet56-fashion-mnist.md).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..runtime import DEFAULT_LAYOUT, in_layout
from .timing import compare

PERIODS = (1, 2, 4, 8, 16, 32)
WIDTHS = range(17, 81)  # two periods of the widest candidate, four of 16
FIXED, SIDE = 64, 16  # the other side of the scanned conv, and its input's height and width
CLEARER = 0.5  # a staircase must leave at most half the squared error a straight line leaves


def blocks(width: int, p: int, tails: bool) -> int:
    """Blocks a kernel of block width `p` runs for `width` channels: ceil(width / p) when a partial
    block costs a whole one (a staircase), or, with `tails`, the whole blocks plus one per set bit
    of the remainder, as oneDNN's channels-last convs run a remainder of 7 in blocks of 4, 2 and 1
    (on the AVX-512 EPYC, 63 output channels cost what 112 would, 64 what 64 do)."""
    return width // p + (bin(width % p).count("1") if tails else int(width % p > 0))


def period(widths: list[int], ms: list[float]) -> int:
    """The block width that best explains `ms` as linear in `blocks(w, p, tails)`, least squares
    over each candidate p and both tail models; the best p, if it beats a straight line (p = 1)
    clearly. A plan keeps a multiple of it: there, in either model, no channel is paid for unused."""
    y = np.asarray(ms, dtype=float)

    def squared_error(p: int, tails: bool) -> float:
        x = np.array([blocks(w, p, tails) for w in widths], dtype=float)
        design = np.stack([np.ones_like(x), x], axis=1)
        fitted = design @ np.linalg.lstsq(design, y, rcond=None)[0]
        return float(((y - fitted) ** 2).sum())

    errors = {p: min(squared_error(p, False), squared_error(p, True)) for p in PERIODS}
    best = min(errors, key=lambda p: (errors[p], p))
    return best if errors[best] <= CLEARER * errors[1] else 1


class _Own(nn.Module):
    """A conv run on an input of its own, so convs of different input widths time side by side."""

    def __init__(self, conv: nn.Conv2d, x: torch.Tensor) -> None:
        super().__init__()
        self.conv, self.x = conv, x

    def forward(self, _ignored: torch.Tensor) -> torch.Tensor:
        return self.conv(self.x)


def scan(device: torch.device, batch_size: int, dtype: torch.dtype, timing: dict[str, float],
         layout: str = DEFAULT_LAYOUT) -> dict[str, object]:
    """Time a 3x3 conv at every width of `WIDTHS` in interleaved rounds (`timing`: the profile's
    per-layer rounds, warm-up and round length), as outputs (FIXED -> w) and as inputs (w -> FIXED),
    in memory `layout` (the steps are the layout's: on an AVX-512 EPYC, channels-last outputs step
    every 16 channels where contiguous ones show no step), and return each staircase's period with
    the timings it was read from."""
    torch.manual_seed(0)
    found: dict[str, object] = {"conv": f"3x3 at {SIDE}x{SIDE}, the other side {FIXED} channels",
                                "widths": list(WIDTHS), "layout": layout}
    for side in ("out", "in"):
        convs = {}
        for w in WIDTHS:
            conv = nn.Conv2d(FIXED if side == "out" else w, w if side == "out" else FIXED, 3, padding=1).to(device, dtype)
            x = torch.randn(batch_size, conv.in_channels, SIDE, SIDE, device=device, dtype=dtype)
            convs[str(w)] = _Own(in_layout(conv, layout), in_layout(x, layout))
        timed = compare(convs, torch.empty(0, device=device), rounds=int(timing["rounds"]),
                        warmup_s=timing["warmup_s"], min_round_s=timing["min_round_s"])
        ms = [timed[str(w)].median_ms for w in WIDTHS]
        found[side] = period(list(WIDTHS), ms)
        found[f"{side}_ms"] = [round(m, 5) for m in ms]
    return found
