"""The one timing harness every latency in sparsesearch goes through.

Models are timed side by side in interleaved rounds (A, B, A, B, ...), so a change in machine load
hits all of them alike; each round runs enough calls to last `min_round_s`, after a warm-up; the
result is the median per-call time and its spread. Against a `reference` model, each model's time is
also read as the median of its per-round ratios to the reference: on a VM whose speed wanders by
1.5x over minutes (measured on the 2-vCPU CI class), a ratio taken within one round holds while
absolute milliseconds do not. CUDA is timed with events after a synchronize.
A model carrying forward hooks is refused: a hook left by a MAC counter once made a dense
MobileNetV2 look 13x slower.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Timing:
    median_ms: float
    spread: float  # (p75 - p25) / median over rounds
    rounds: int
    calls_per_round: int
    relative: float | None = None  # median over rounds of (this model's time / the reference's)
    relative_spread: float | None = None  # (p75 - p25) / median of those ratios

    @property
    def steadiness(self) -> float:
        """The spread that says whether this timing can be trusted: of the ratio when there is one."""
        return self.spread if self.relative_spread is None else self.relative_spread


def _check_clean(name: str, model: nn.Module) -> None:
    hooked = [n or "(root)" for n, m in model.named_modules()
              if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]
    if hooked:
        raise ValueError(f"model '{name}' has hooks on {', '.join(hooked[:3])}: they would be timed too; remove them")


def call_seconds(model: Callable[[Tensor], object], x: Tensor, calls: int) -> float:
    """Seconds per call of `model` on x over `calls` calls (on CUDA, between events after a synchronize)."""
    if x.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(x.device)
        start.record()
        for _ in range(calls):
            model(x)
        end.record()
        torch.cuda.synchronize(x.device)
        return start.elapsed_time(end) / 1000 / calls
    begin = time.perf_counter()
    for _ in range(calls):
        model(x)
    return (time.perf_counter() - begin) / calls


def compare(models: dict[str, nn.Module], x: Tensor, rounds: int = 15, warmup_s: float = 0.3,
            min_round_s: float = 0.05, max_spread: float | None = None, max_rounds: int = 0,
            retries: int = 0, reference: str | None = None) -> dict[str, Timing]:
    """Median per-call latency of each model on input `x`, measured in interleaved rounds; with
    `reference` (one of `models`), also each model's median per-round ratio to it.

    With `max_spread`, rounds go on (up to `max_rounds`) for the models whose spread (of their ratio,
    against a reference) exceeds it, beside the reference; the steady ones are done (on tv:resnet18
    at 224 px, one unsteady layer kept its eight neighbours timing for 15 rounds). Then, up to
    `retries` times, the models still above it are timed again from scratch (beside the reference)
    and each keeps its steadier timing: on a shared machine, load comes in bursts of seconds that
    more rounds only average in, while a later run often misses them."""
    if reference is not None and reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models timed")
    timings = _compare(models, x, rounds, warmup_s, min_round_s, max_spread, max_rounds, reference)
    for _ in range(retries if max_spread is not None else 0):
        unsettled = {name: models[name] for name, t in timings.items()
                     if t.steadiness > max_spread and name != reference}
        if not unsettled:
            break
        if reference is not None:
            unsettled[reference] = models[reference]
        again = _compare(unsettled, x, rounds, warmup_s, min_round_s, max_spread, max_rounds, reference)
        timings |= {name: t for name, t in again.items()
                    if name != reference and t.steadiness < timings[name].steadiness}
    return timings


def _compare(models: dict[str, nn.Module], x: Tensor, rounds: int, warmup_s: float, min_round_s: float,
             max_spread: float | None, max_rounds: int, reference: str | None) -> dict[str, Timing]:
    for name, model in models.items():
        _check_clean(name, model)
        model.eval()
    samples: dict[str, list[float]] = {name: [] for name in models}
    calls: dict[str, int] = {}

    def summaries() -> dict[str, Timing]:
        return {name: _summary(s, calls.get(name, 1), None if reference in (None, name) else samples[reference])
                for name, s in samples.items()}

    with torch.inference_mode():
        for name, model in models.items():  # warm-up, and size each round to last min_round_s
            once, deadline = call_seconds(model, x, 1), time.perf_counter() + warmup_s
            while time.perf_counter() < deadline:
                once = min(once, call_seconds(model, x, 1))
            calls[name] = max(1, int(min_round_s / max(once, 1e-7)))
        timed = dict(models)
        for done in range(max(rounds, max_rounds)):
            if done >= rounds:  # past the minimum, only the models still unsteady go on (and the reference)
                unsteady = {name for name, t in summaries().items()
                            if max_spread is not None and name != reference and t.steadiness > max_spread}
                if not unsteady:
                    break
                timed = {name: m for name, m in models.items() if name in unsteady or name == reference}
            for name, model in timed.items():
                samples[name].append(call_seconds(model, x, calls[name]))
    return summaries()


def _median_spread(values: list[float]) -> tuple[float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return median, (q3 - q1) / median


def _summary(seconds: list[float], calls: int, reference: list[float] | None = None) -> Timing:
    median, spread = _median_spread(seconds)
    if reference is None:
        return Timing(median * 1000, spread, len(seconds), calls)
    relative, relative_spread = _median_spread([s / r for s, r in zip(seconds, reference)])
    return Timing(median * 1000, spread, len(seconds), calls, relative, relative_spread)
