"""Training in channels-last where it is faster, measured: `fit`'s layout verdict against the time
of the same training steps in each layout.

For each case, `training_layout`'s verdict (its own timing: a step of a copy in each layout), then
`fit` run for the same steps (a share of an epoch, no validation) with each layout forced, the two
interleaved over `ROUNDS` rounds; median seconds per step, and their ratio. The verdict pays where
the ratio is at least `CHANNELS_LAST_GAIN`, and costs nothing where it is not (it keeps torch's
layout). Digits-size nets take steps under `STEP_FLOOR_S` and are not timed at all.

Run alone on a quiet core: `taskset -c 1 python bench/train_layout.py [--tag=MACHINE]`.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_tag, record  # noqa: E402

from sparsesearch import train  # noqa: E402
from sparsesearch.runtime import set_threads  # noqa: E402
from sparsesearch.train import TrainConfig, fit, prepare, training_layout  # noqa: E402

CPU = torch.device("cpu")
CASES = [("resnet56", "fashion-mnist", 128, 15), ("resnet20", "fashion-mnist", 128, 20),
         ("vgg16-bn", "fashion-mnist", 128, 8), ("lenet5", "fashion-mnist", 128, 200)]  # model, data, batch, steps

ROUNDS = 3  # the median drops a first round's one-time costs


def seconds_per_step(model_name: str, dataset_name: str, batch: int, steps: int, layout: str) -> float:
    """A fresh seeded model trained `steps` steps by `fit` with its layout verdict forced to `layout`."""
    model, ds = prepare(model_name, dataset_name, seed=0)
    x, y = next(ds.train.batches(batch))
    train._LAYOUTS.clear()  # the verdict forced, and cached before the clock starts: `fit` reads it
    kept = train.CHANNELS_LAST_GAIN, train.STEP_FLOOR_S
    train.CHANNELS_LAST_GAIN, train.STEP_FLOOR_S = 0.0, 0.0 if layout == "channels-last" else float("inf")
    assert training_layout(model, x, y, CPU) == layout
    train.CHANNELS_LAST_GAIN, train.STEP_FLOOR_S = kept
    start = time.perf_counter()
    fit(model, ds, TrainConfig(epochs=steps * batch / len(ds.train), batch_size=batch), CPU, validate=False)
    return (time.perf_counter() - start) / steps


def main() -> None:
    suffix, _ = machine_tag(sys.argv[1:])
    set_threads(1)
    rows = []
    for model_name, dataset_name, batch, steps in CASES:
        model, ds = prepare(model_name, dataset_name, seed=0)
        train._LAYOUTS.clear()
        start = time.perf_counter()
        verdict = training_layout(model, *next(ds.train.batches(batch)), CPU)
        verdict_s = time.perf_counter() - start
        times: dict[str, list[float]] = {"contiguous": [], "channels-last": []}
        for _ in range(ROUNDS):
            for layout in times:
                times[layout].append(seconds_per_step(model_name, dataset_name, batch, steps, layout))
        contiguous, last = (statistics.median(t) for t in times.values())
        rows.append({"model": model_name, "data": dataset_name, "batch": batch, "steps": steps,
                     "contiguous s/step": contiguous, "channels-last s/step": last,
                     "channels-last speedup": contiguous / last, "verdict": verdict, "verdict s": verdict_s,
                     "trains so (speedup)": contiguous / (last if verdict == "channels-last" else contiguous)})
        print(rows[-1], flush=True)
    summary = (f"`fit` for {', '.join(f'{s}' for *_, s in CASES)} steps, each layout forced, interleaved over "
               f"{ROUNDS} rounds (median s/step, 1 thread, seeded fresh models); `verdict`: what "
               f"`training_layout` chose (trains channels-last at a timed step >= {train.STEP_FLOOR_S:g} s and "
               f">= {train.CHANNELS_LAST_GAIN:g}x faster so), `verdict s` what choosing cost, once per process.")
    print(record(f"train_layout{suffix}", rows, summary))


if __name__ == "__main__":
    main()
