"""Collapsed layers against Torch-Pruning, timed side by side.

A plain network's layer that keeps its input's shape, removed, collapses to its identity path
(`compact.ChannelAffine`: one multiply-add per channel where a 3x3 conv and a BatchNorm ran). This
compacts Torch-Pruning's global pruning and the weight-norm seeds with and without collapsed layers
(plans as `bench/recipes.py` names them, e.g. norm:0.9+0/1/1/1/1) from the dense weights and times
them all in one run, interleaved round by round beside the dense model (1 thread, one core, batch 1
and 8, NCHW as the study prices them and channels-last), so that their ratios share the machine's
state. What each plan loses is `bench/recipes.py`'s to measure (a full run per plan).

Usage: taskset -c 1 python bench/collapse.py --model vgg16-bn --tp 0.9 --runs norm:0.9 norm:0.9+0/1/1/1/1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import optuna
import torch

sys.path.insert(0, str(Path(__file__).parent))
from arms import BATCHES, predicted, torch_pruned, tp_plan  # noqa: E402
from common import case_name, dense_checkpoint, record  # noqa: E402
from recipes import plan_of  # noqa: E402

from sparsesearch import search  # noqa: E402
from sparsesearch.admm import apply_masks, prune_masks  # noqa: E402
from sparsesearch.compact import COLLAPSED, verified_compact  # noqa: E402
from sparsesearch.profiler.timing import compare  # noqa: E402
from sparsesearch.runtime import LAYOUTS, in_layout, set_threads  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vgg16-bn")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--tp", nargs="*", type=float, default=[0.9], help="Torch-Pruning's global pruning ratios")
    parser.add_argument("--runs", nargs="*", default=[], help="FAMILY:RATE plans as bench/recipes.py names them")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    set_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    case = case_name(args.model, args.dataset)
    config = search.SearchConfig(model=args.model, dataset=args.dataset,
                                 checkpoint=dense_checkpoint(args.model, args.dataset))
    with tempfile.TemporaryDirectory() as tmp:
        built = search.build(config, torch.device("cpu"), tmp, notify=print)
        built.removable = built.find_removable()
        built.offer(built.withheld)
        models, rows = {"dense": built.fresh_model().eval()}, {}
        for ratio in args.tp:
            name = f"torch-pruning {ratio:g}"
            models[name] = torch_pruned(built, ratio).eval()
            rows[name] = {"plan": name, "predicted": predicted(built, tp_plan(built, models[name])), "collapsed": 0}
        for spec in args.runs:
            family, rate = spec.split(":")
            plan = plan_of(built, family, rate)
            model = built.fresh_model()
            apply_masks(model, prune_masks(model, plan, built.deps))
            compacted = verified_compact(model, plan, built.input_shape, args.model)
            models[spec] = compacted.model.eval()
            rows[spec] = {"plan": spec, "predicted": predicted(built, plan),
                          "collapsed": sum(i == COLLAPSED for i in compacted.impl.values())}
        cores = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {max(cores)})  # at 1 thread torch computes on the caller
        for layout in LAYOUTS:
            laid = {name: in_layout(m, layout) for name, m in models.items()}
            for batch in BATCHES:
                x = in_layout(torch.randn(batch, *built.input_shape), layout)
                with torch.inference_mode():
                    timings = compare(laid, x, rounds=args.rounds, reference="dense")
                column = f"speedup b{batch}{'' if layout == 'contiguous' else ' ' + layout}"
                for name, timing in timings.items():
                    if name != "dense":
                        rows[name][column] = 1 / timing.relative
                print(column, {n: round(r.get(column, 0), 2) for n, r in rows.items()}, flush=True)
    record(f"collapse-{case}", list(rows.values()),
           f"{args.model} on {args.dataset}: Torch-Pruning's global pruning and plans of the study's space with "
           "layers collapsed to their identity path, compacted from the dense weights and timed in one run, "
           f"interleaved beside the dense model ({args.rounds} rounds, median ratio; 1 thread, one core). "
           "`predicted`: the study's latency model; `collapsed`: layers run as one multiply-add per channel.")


if __name__ == "__main__":
    main()
