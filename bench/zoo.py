"""Every torchvision classifier (and the timm families of the slow suite) compacted with uniform
filter, channel and shape plans: the time `compact` takes (what a user waits for: dependency graph,
surgery, compact kernels, the equality check), the wall time of each whole case (model built with
random weights, BatchNorm calibrated, plan masked, compacted, checked again), what it left dense,
and whether the compacted model still equals the masked one. It runs the slow test `test_zoo_compacts_with_equal_outputs`
(tests/test_compact.py), one model per process, at one thread on one core.

    taskset -c 1 python bench/zoo.py                 # all of them (hours on a 2-core machine)
    taskset -c 1 python bench/zoo.py swin vit_b      # models whose name contains one of these;
                                                     # their rows replace the old ones in the results
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from common import RESULTS, record

ROOT = Path(__file__).parent.parent
TEST = "tests/test_compact.py::test_zoo_compacts_with_equal_outputs"
PLANS = ("filter", "channel", "shape")
LIMIT_S = 180  # the goal: `compact` of each plan within 3 minutes
TIMEOUT_S = 900  # per model; a case past it is reported as a timeout, the others go on


def main(patterns: list[str]) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_compact import ZOO

    chosen = [m for m in ZOO if not patterns or any(p in m for p in patterns)]
    old = _old_rows() if patterns else {}
    for i, name in enumerate(chosen, 1):
        row = _run(name)
        old[name] = row
        print(f"[{i}/{len(chosen)}] {name}: {row['total_s']} s {row['status']}", flush=True)
        rows = [old[m] for m in ZOO if m in old]
        record("zoo", rows, _summary(rows))


def _run(name: str) -> dict[str, object]:
    """One model's three cases in a fresh process (a clean heap; a hang costs only this model)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        start = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        try:
            subprocess.run([sys.executable, "-m", "pytest", *(f"{TEST}[{name}-{p}]" for p in PLANS), "-m", "",
                            "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1", f"--junitxml={report}"],
                           cwd=ROOT, env=env, timeout=TIMEOUT_S, capture_output=True, check=False)
        except subprocess.TimeoutExpired:
            return {"model": name, "side": "", **{p: "" for p in PLANS}, "compact_s": "",
                    "total_s": round(time.perf_counter() - start), "status": f"timeout after {TIMEOUT_S} s",
                    "left dense": ""}
        cases = {c.get("name", "").rsplit("-", 1)[-1].rstrip("]"): c
                 for c in ET.parse(report).getroot().iter("testcase")}
    row: dict[str, object] = {"model": name, "side": ""}
    failures, left, compact_s = [], {}, []
    for plan in PLANS:
        case = cases.get(plan)
        if case is None:
            row[plan] = ""
            failures.append(f"{plan}: not run")
            continue
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        row["side"] = props.get("side", row["side"])
        row[plan] = round(float(case.get("time", 0)), 1)
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            failures.append(f"{plan}: {(problem.get('message') or '').splitlines()[0][:160]}")
        left[plan] = len(json.loads(props.get("left_dense", "{}")))
        compact_s.append(float(props.get("compact_s", "nan")))
    row["compact_s"] = " / ".join(f"{c:.1f}" for c in compact_s)
    row["total_s"] = round(sum(v for p in PLANS if isinstance(v := row[p], float)), 1)
    slow = [c for c in compact_s if c > LIMIT_S]
    row["status"] = "; ".join(failures) or ("ok" if not slow else f"ok, compact over {LIMIT_S} s")
    row["left dense"] = " / ".join(f"{left[p]}" if p in left else "-" for p in PLANS)
    return row


def _old_rows() -> dict[str, dict[str, object]]:
    path = RESULTS / "zoo.json"
    return {r["model"]: r for r in json.loads(path.read_text())["rows"]} if path.is_file() else {}


def _summary(rows: list[dict[str, object]]) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    slow = sorted((r for r in rows if r["status"] != "ok"), key=lambda r: -float(r["total_s"]))
    return (f"{len(rows)} models, 1 thread on one core, random weights; filter / channel / shape: seconds per "
            f"whole case (model built, BatchNorm calibrated, plan masked, compacted, checked equal on two fresh "
            f"batches); compact_s: of those, the seconds `compact` itself took (graph, surgery, kernels, its "
            f"equality check) per plan; total_s: the three cases; side: input side; left dense: planned layers "
            f"left dense per plan. Uniform plans: filter 0.5, channel 0.5, shape 0.7. {len(ok)} of {len(rows)} "
            f"compact every plan with equal outputs within {LIMIT_S} s"
            + (f"; the rest: {', '.join(str(r['model']) + ' (' + str(r['status']) + ')' for r in slow)}." if slow else "."))


if __name__ == "__main__":
    main(sys.argv[1:])
