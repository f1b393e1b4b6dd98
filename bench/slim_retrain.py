"""Retraining on the slim model, measured: the same masked-retraining steps run on the whole masked
model (as before) and on its slim copy (`compact.slimmed`: the pruned filters and channels removed),
the two interleaved over `ROUNDS` rounds, median seconds per step, and their ratio. A trial
(1 ADMM + 3 retraining epochs) and a full run (4 + 2) spend their ADMM steps at the dense cost
either way; what each then costs relative to before follows from the ratio.

Run alone on a quiet core: `taskset -c 1 python bench/slim_retrain.py [--tag=MACHINE]`.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_tag, record  # noqa: E402

from sparsesearch.admm import ADMMConfig, apply_masks, masked_hooks, prune_masks  # noqa: E402
from sparsesearch.compact import slimmed  # noqa: E402
from sparsesearch.graph import dependencies  # noqa: E402
from sparsesearch.layers import trace  # noqa: E402
from sparsesearch.plan import Plan  # noqa: E402
from sparsesearch.runtime import set_threads  # noqa: E402
from sparsesearch.sparsity import SparsityType  # noqa: E402
from sparsesearch.train import TrainConfig, fit, prepare  # noqa: E402

CPU = torch.device("cpu")
CASES = [("vgg16-bn", 8), ("resnet56", 15)]  # on fashion-mnist: model, steps timed per round
PLANS = [(SparsityType.FILTER, 0.3), (SparsityType.FILTER, 0.5), (SparsityType.FILTER, 0.7),
         (SparsityType.CHANNEL, 0.5)]
ROUNDS = 3  # the median drops a first round's one-time costs


def seconds_per_step(model: torch.nn.Module, masks: dict, data, steps: int) -> float:  # noqa: ANN001
    """`steps` masked-retraining steps of a copy of `model` (the recipe's batch, no validation)."""
    model = copy.deepcopy(model)
    batch = ADMMConfig().batch_size
    start = time.perf_counter()
    fit(model, data, TrainConfig(epochs=steps * batch / len(data.train), batch_size=batch), CPU,
        masked_hooks(model, masks), validate=False)
    return (time.perf_counter() - start) / steps


def main() -> None:
    suffix, _ = machine_tag(sys.argv[1:])
    set_threads(1)
    rows = []
    for model_name, steps in CASES:
        model, data = prepare(model_name, "fashion-mnist", seed=0)
        deps = dependencies(model, data.input_shape)
        layers = trace(model, data.input_shape)
        for kind, rate in PLANS:
            plan = Plan.uniform(layers, kind, rate)
            masked = copy.deepcopy(model)
            masks = prune_masks(masked, plan, deps)
            apply_masks(masked, masks)
            slim = slimmed(masked, plan, data.input_shape)
            assert slim is not None, f"{model_name} {kind.value} {rate}: nothing to remove"
            times: dict[str, list[float]] = {"masked": [], "slim": []}
            for _ in range(ROUNDS):
                times["masked"].append(seconds_per_step(masked, masks, data, steps))
                times["slim"].append(seconds_per_step(slim.model, slim.masks(masks), data, steps))
            masked_s, slim_s = (statistics.median(times[k]) for k in ("masked", "slim"))
            ratio = masked_s / slim_s
            rows.append({"model": model_name, "plan": f"{kind.value} {rate:.0%}",
                         "params kept": sum(p.numel() for p in slim.model.parameters())
                         / sum(p.numel() for p in masked.parameters()),
                         "masked ms/step": 1000 * masked_s, "slim ms/step": 1000 * slim_s, "retraining speedup": ratio,
                         "trial 1+3 speedup": 4 / (1 + 3 / ratio), "full run 4+2 speedup": 6 / (4 + 2 / ratio)})
            print(rows[-1], flush=True)
    record(f"slim_retrain{suffix}", rows,
           f"Masked retraining steps (batch {ADMMConfig().batch_size}, 1 thread, fashion-mnist, seeded weights), on the "
           f"whole masked model and on its slim copy, interleaved, median of {ROUNDS} rounds. `trial` and `full run`: "
           "the run's whole cost before over after, its ADMM epochs costing the same (dense) either way.")


if __name__ == "__main__":
    main()
