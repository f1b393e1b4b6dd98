"""Channel counts aligned to the device's latency steps: the same latency, more channels, more accuracy?

For one case (model, dataset, dense checkpoint) and batch size, the profile's scan finds where this
device's latency steps (`profiler.steps`). Each uniform filter rate gives two plans: as the rate
leaves the counts (`Plan.uniform`), and with each count raised to the next multiple of the step
(`Plan.aligned`, what the search does in layers at least `MIN_BLOCKS` steps wide). Both are trained
alike from the dense weights (ADMM + masked retraining, `--epochs` on `--data` of the training
split; `--no-train` skips this and keeps the dense weights), compacted, and timed side by side
with the dense model in one run (1 thread, interleaved rounds, median ratio to dense; `--no-time`
skips this, for a training run on a core that is not quiet), every network and the scan in
`--layout`.

Usage: python bench/alignment.py --model resnet56 --dataset fashion-mnist --checkpoint PATH
       [--batch 8] [--rates 0.3 0.5] [--epochs 1+3] [--data 0.1] [--layout channels-last] [--no-train | --no-time]
       [--step 16 (align to it, no scan)]
       (run alone, pinned: taskset -c 1)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
from optuna.trial import FixedTrial

sys.path.insert(0, str(Path(__file__).parent))
from common import record  # noqa: E402

from sparsesearch.admm import run_admm  # noqa: E402
from sparsesearch.compact import pruned, verified_compact  # noqa: E402
from sparsesearch.graph import dependencies  # noqa: E402
from sparsesearch.layers import trace  # noqa: E402
from sparsesearch.profiler.measure import TIMING  # noqa: E402
from sparsesearch.profiler.steps import scan  # noqa: E402
from sparsesearch.profiler.timing import compare  # noqa: E402
from sparsesearch.runtime import DEFAULT_LAYOUT, LAYOUTS, in_layout, set_threads  # noqa: E402
from sparsesearch.search import SearchConfig, parse_epochs  # noqa: E402
from sparsesearch.space import Space  # noqa: E402
from sparsesearch.sparsity import MIN_BLOCKS, SparsityType, keep_count  # noqa: E402
from sparsesearch.train import correct, paired_drop, prepare  # noqa: E402

CPU = torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--epochs", default="1+3")
    parser.add_argument("--data", type=float, default=0.1)
    parser.add_argument("--layout", choices=list(LAYOUTS), default=DEFAULT_LAYOUT)
    parser.add_argument("--no-train", action="store_true", help="time the plans on the dense weights, untrained")
    parser.add_argument("--no-time", action="store_true", help="train and score the plans, without timing them")
    parser.add_argument("--step", type=int, help="the output step to align to, instead of scanning for it")
    args = parser.parse_args()
    if args.no_train and args.no_time:
        parser.error("--no-train and --no-time leave nothing to do")
    set_threads(1)
    found = {"out": args.step, "in": 1} if args.step else scan(CPU, args.batch, torch.float32, TIMING, args.layout)
    print(f"batch {args.batch}: latency steps every {found['out']} outputs, {found['in']} inputs", flush=True)
    model, data = prepare(args.model, args.dataset, weights=Path(args.checkpoint))
    model.eval()
    shape, layers, deps = data.input_shape, trace(model, data.input_shape), dependencies(model, data.input_shape)
    spaces = {"as the rate leaves": Space(layers, deps.couplings, ("filter",), {}),
              "aligned": Space(layers, deps.couplings, ("filter",), {}, steps=found)}
    admm_epochs, retrain_epochs = parse_epochs(args.epochs)
    config = replace(SearchConfig(admm_epochs=admm_epochs, retrain_epochs=retrain_epochs).admm(), rungs=())  # a trial's
    trial_data = replace(data, train=data.train.subset(args.data))
    dense_correct = None if args.no_train else correct(model, data.val, CPU)
    widths = {layer.name: layer.weight_shape[0] for layer in layers}
    dense_macs = sum(layer.macs for layer in layers)
    rows = []
    for rate in args.rates:
        compacted, row = {}, {}
        for name, space in spaces.items():  # the search's own uniform plan, without and with the steps
            plan = space.suggest(FixedTrial(space.uniform_params(SparsityType.FILTER, rate)))
            trained = prepare(args.model, args.dataset, weights=Path(args.checkpoint))[0]
            kept = sorted({keep_count(widths[n], s.rate) for n, s in plan.layers.items()})
            row[name] = {"kept counts": kept, "layers pruned": len(plan.layers)}
            if not args.no_train:
                run = run_admm(trained, trial_data, plan, config, CPU, deps)
                drop, se = paired_drop(dense_correct, run.val_correct)
                row[name] |= {"val %": round(run.accuracy["final_val"], 2), "drop": round(drop, 2), "se": round(se, 2)}
            result = (pruned(trained, plan, shape, deps)[1] if args.no_train  # hard-pruned by the plan's projection
                      else verified_compact(trained.cpu().eval(), plan, shape, args.model))
            compacted[name] = in_layout(result.model, args.layout)
            row[name] |= {"MAC reduction": round(dense_macs / sum(result.macs.values()), 2)}
            print(rate, name, row[name], flush=True)
        timings = {} if args.no_time else compare({"dense": in_layout(model, args.layout), **compacted},
                                                  in_layout(torch.randn(args.batch, *shape), args.layout), rounds=30,
                                                  reference="dense", warmup_s=0.5, min_round_s=0.1)
        for name in compacted:
            rows.append({"filter rate": rate, "plan": name, **row[name]} | ({} if args.no_time else {
                "speedup": round(1 / timings[name].relative, 3), "ms": round(timings[name].median_ms, 3)}))
    how = ("untrained: the dense weights, timed only" if args.no_train else
           f"each trained alike ({args.epochs} epochs on {args.data:g} of the training split), accuracy on the "
           "whole validation split (drop paired with the dense model, ± SE)")
    summary = (f"{args.model} on {args.dataset}, uniform filter plans as each rate leaves the counts and aligned to the "
               f"device's latency step (batch {args.batch}, {args.layout}: every {found['out']} outputs, "
               f"{'given' if args.step else 'found by the profile scan'}; layers narrower than {MIN_BLOCKS} steps "
               f"keep the rate's count); {how}; " + (
                   "not timed." if args.no_time else f"speedup = median per-round ratio to the dense model timed "
                   f"side by side, batch {args.batch}, 1 thread, {args.layout}."))
    suffix = ("" if args.layout == DEFAULT_LAYOUT else f"-{args.layout}") + (
        "-timing" if args.no_train else "-accuracy" if args.no_time else "")
    print(record(f"alignment-{args.model}-{args.dataset}{suffix}", rows, summary))


if __name__ == "__main__":
    main()
