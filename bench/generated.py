"""The pipeline's properties on randomly generated architectures (tests/test_generated.py), over
every seed, the slow ones included: how many cases hold each property, and which fail and why.

    python bench/generated.py            # all seeds (200 nets x 7 plans x 4 properties)
"""

from __future__ import annotations

import collections
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from common import record

TESTS = Path(__file__).parent.parent / "tests" / "test_generated.py"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pytest", str(TESTS), "-m", "", "-q", "-p", "no:cacheprovider",
                        f"--junitxml={report}"], check=False)
        minutes = (time.perf_counter() - start) / 60
        cases = ET.parse(report).getroot().iter("testcase")
        outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        failures, seeds = [], set()
        for case in cases:
            test, _, param = case.get("name").partition("[")
            seeds.add(param.split("-")[0])
            failed = case.find("failure") if case.find("failure") is not None else case.find("error")
            outcome = "failed" if failed is not None else "skipped" if case.find("skipped") is not None else "passed"
            outcomes[test][outcome] += 1
            if failed is not None:
                failures.append(f"{test}[{param} {(failed.get('message') or '').splitlines()[0][:160]}")
    rows = [{"property": test, **{k: counts[k] for k in ("passed", "failed", "skipped")}}
            for test, counts in outcomes.items()]
    summary = (f"tests/test_generated.py: {len(seeds)} generated nets x 7 plans, in {minutes:.1f} min. Failures: "
               + ("none." if not failures else "\n\n" + "\n".join(f"- {f}" for f in failures)))
    print(record("generated", rows, summary).read_text())


if __name__ == "__main__":
    main()
