"""Training in bfloat16 on a CPU, measured (groundwork; `fit` trains in float32): the same training
steps in float32 and under `torch.autocast("cpu", torch.bfloat16)`, in each memory layout, the four
interleaved over `ROUNDS` rounds, median seconds per step. On CPUs with AMX or AVX-512 BF16, oneDNN
runs bfloat16 convolutions on those units; elsewhere autocast may be slower than float32. Speed
only: what bfloat16 training does to accuracy is not measured here.

Run alone on a quiet core: `taskset -c 1 python bench/train_precision.py [--tag=MACHINE]`.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_tag, record  # noqa: E402

from sparsesearch.models import create  # noqa: E402
from sparsesearch.runtime import set_threads  # noqa: E402

CASES = [("vgg16-bn", 4), ("resnet56", 8)]  # on 1x32x32 inputs (Fashion-MNIST as the benchmarks pad it): model, steps
BATCH = 64  # the ADMM recipe's
ROUNDS = 3


def seconds_per_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, bf16: bool) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    suffix, _ = machine_tag(sys.argv[1:])
    set_threads(1)
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").is_file() else ""
    units = [f for f in ("amx_bf16", "avx512_bf16") if f in flags] or ["none"]
    rows = []
    for name, steps in CASES:
        torch.manual_seed(0)
        x, y = torch.randn(BATCH, 1, 32, 32), torch.randint(0, 10, (BATCH,))
        forms = {}
        for layout in ("contiguous", "channels-last"):
            fmt = torch.channels_last if layout == "channels-last" else torch.contiguous_format
            model = create(name, num_classes=10, in_channels=1).to(memory_format=fmt).train()
            for bf16 in (False, True):
                forms[layout, bf16] = (model, x.contiguous(memory_format=fmt))
        times: dict[tuple[str, bool], list[float]] = {k: [] for k in forms}
        for _ in range(ROUNDS):
            for (layout, bf16), (model, data) in forms.items():
                seconds_per_step(model, data, y, 1, bf16)  # warm-up: oneDNN primitives of this form
                times[layout, bf16].append(seconds_per_step(model, data, y, steps, bf16))
        base = statistics.median(times["contiguous", False])
        for (layout, bf16), ts in times.items():
            rows.append({"model": name, "layout": layout, "precision": "bf16 autocast" if bf16 else "float32",
                         "ms/step": 1000 * statistics.median(ts), "speedup over float32 contiguous":
                         base / statistics.median(ts)})
            print(rows[-1], flush=True)
    record(f"train_precision{suffix}", rows,
           f"Training steps (batch {BATCH}, 1 thread, SGD, seeded weights) in float32 and under bfloat16 autocast, "
           f"each layout, interleaved, median of {ROUNDS} rounds. CPU bfloat16 units: {', '.join(units)}.")


if __name__ == "__main__":
    main()
