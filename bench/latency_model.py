"""How well the latency model predicts end-to-end latency of random compacted plans.

Per model: profile it (the layer grid + the rest of the network, into a fresh table under
bench/results/profiles/), fit the latency model (cross-validated error on the table's rows), then
draw random per-layer plans, compact each, time them end to end and compare with the prediction.
Profiles are reused when present (delete bench/results/profiles/ to re-profile). `profile_s` is
the profile from scratch; `command_s` adds what `sparsesearch profile` does after it (fitting the
latency model and its in-network terms), so it is what a user waits for.
Goals: >= 95% of random plans' predicted speedups within +-10% (nn-Meter reports 99% within +-10%
on mobile CPUs); a ResNet-18-class model profiled in <= 5 minutes at 1 thread.

Run alone, pinned to one core (`taskset -c 1`): another busy process distorts every timing.
Usage: python bench/latency_model.py [--threads T] [--samples N] [--seed S] [--tag TAG] [MODEL[@SIDE] ...]
e.g.   taskset -c 1 python bench/latency_model.py --threads 1 --tag xeon resnet56 tv:resnet18@224 tv:mobilenet_v2@224
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, record  # noqa: E402

from sparsesearch.profiler.measure import CALIBRATION_PLANS, profile_model, target  # noqa: E402
from sparsesearch.profiler.predictor import LatencyModel  # noqa: E402
from sparsesearch.profiler.validate import REMOVE_SHARE, REMOVING_PLANS, Validation, scatter, validate  # noqa: E402
from sparsesearch.runtime import set_threads  # noqa: E402

MODELS = ("resnet56", "tv:resnet18@224", "tv:mobilenet_v2@224")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*", default=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random plans (results get a _seedN suffix)")
    parser.add_argument("--tag", default="", help="appended to the results' names (e.g. the machine)")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    device = torch.device("cpu")
    rows = []
    run_name = f"t{threads}" + (f"_seed{args.seed}" if args.seed else "") + (f"_{args.tag}" if args.tag else "")
    for spec in args.models:
        name, _, side = spec.partition("@")
        slug = spec.replace(":", "-").replace("@", "-")
        begin = time.perf_counter()
        tgt = target(name, image_size=int(side) if side else None)
        run = profile_model(tgt, device, 1, out=RESULTS / "profiles" / f"{slug}-t{threads}-b1-float32{args.tag}.json")
        fitted = LatencyModel().fit(run.profile)
        fit = fitted.in_network(tgt.model, tgt.input_shape)
        command_s = time.perf_counter() - begin
        result = validate(fitted, tgt, args.samples, device, 1, seed=args.seed)
        (RESULTS / "profiles" / f"validate-{slug}-{run_name}.json").write_text(json.dumps(result.to_dict(), indent=1))
        scatter(result, RESULTS / f"latency_model_{slug}_{run_name}.png")
        rows.append({"model": name, "input": "x".join(map(str, tgt.input_shape)), "threads": threads, "batch": 1,
                     "rows": len(run.profile.rows), "skipped": run.skipped, "profile_s": round(run.seconds),
                     "command_s": round(command_s),
                     "cv_median_err_%": round(100 * fitted.cv_error["median_abs"], 1),
                     "offset_ms": round(fit.offset, 3), "slope": round(fit.slope, 3),
                     "ms_per_mweight": round(fit.per_mweight, 4),
                     "ms_per_moutput": round(fit.per_moutput, 3), "ms_per_call": round(fit.per_call, 4),
                     "ms_per_minput": ", ".join(f"{f} {ms:.3f}" for f, ms in fit.per_minput.items()) or "-",
                     "kernel_slope": ", ".join(f"{f} {k:.3f}" for f, k in fit.per_ms.items()) or "-",
                     "plans": len(result.samples), "mape_%": round(100 * result.mean_abs_error, 1),
                     "within_10_%": round(100 * result.within_10), "latency_goal_met": result.within_10 >= 0.95,
                     "speedup_mape_%": round(100 * result.speedup_mean_abs_error, 1),
                     "speedup_within_10_%": round(100 * result.speedup_within_10),
                     "speedup_goal_met": result.speedup_within_10 >= 0.95,
                     **removing(result), "drift": round(result.drift, 2),
                     "total_s": round(time.perf_counter() - begin)})
        print(rows[-1], flush=True)
        summary = (f"Random per-layer plans (types and rates drawn per layer from what the search can offer), compacted "
                   f"and timed end to end (median of interleaved rounds) vs the latency model's prediction (offset + per "
                   f"layer: slope x its predicted isolated latency + ms per million weights kept, per million outputs, "
                   f"and per million inputs of its kernel family; fitted robustly on the profile's {CALIBRATION_PLANS} calibration plans and the dense "
                   f"network timed end to end). speedup_*: predicted speedup (over the dense network as profiled) vs "
                   f"measured speedup (over the dense network timed beside each plan), which is the latency in the machine "
                   f"speed of the profile; drift: the dense network during validation over as profiled. Goal: >= 95% "
                   f"within +-10%. profile_s: the profile from scratch; command_s: with the latency model's fit, as "
                   f"`sparsesearch profile` runs it; skipped: grid points of types no faster than dense at their highest "
                   f"rate; removing_*: the random plans that remove residual branches whole ({REMOVING_PLANS:.0%} "
                   f"of them, each removable branch with probability {REMOVE_SHARE:g}), judged apart. CPU, batch 1, "
                   f"float32, {threads} threads, plans of seed {args.seed}. "
                   f"Scatter plots: latency_model_<model>_{run_name}.png.")
        print(record(f"latency_model_{run_name}", rows, summary), flush=True)  # after each model: a long run keeps what it has


def removing(result: Validation) -> dict[str, object]:
    """The random plans that remove residual branches whole, judged apart: the latency model prices
    a removed branch at nothing."""
    some = bool(result.removing)
    return {"removing_plans": len(result.removing),
            "removing_speedup_mape_%": round(100 * result.removing_speedup_mean_abs_error, 1) if some else "-",
            "removing_speedup_within_10_%": round(100 * result.removing_speedup_within_10) if some else "-"}


if __name__ == "__main__":
    main()
