"""What every benchmark writes beside its numbers: the command, the machine, the versions, the date."""

from __future__ import annotations

import datetime
import shlex
import sys
from pathlib import Path
from typing import Any

from sparsesearch.files import write_json
from sparsesearch.runtime import machine, versions

RESULTS = Path(__file__).parent / "results"
CHECKPOINTS = Path(__file__).parent / "checkpoints"


def case_name(model: str, dataset: str) -> str:
    """A benchmark case as a file name: model and dataset (a tv:/timm: prefix's colon made a dash)."""
    return f"{model}-{dataset}".replace(":", "-")


def dense_checkpoint(model: str, dataset: str, given: str = "") -> str:
    """`given`, else the committed dense model of the case (bench/checkpoints/CASE/dense.pt)."""
    return given or str(CHECKPOINTS / case_name(model, dataset) / "dense.pt")


def machine_tag(args: list[str]) -> tuple[str, list[str]]:
    """The suffix `--tag=MACHINE` asks for ("_MACHINE": results of another machine kept beside this one's),
    and the other arguments."""
    tag = next((a.split("=", 1)[1] for a in args if a.startswith("--tag=")), "")
    return f"_{tag}" if tag else "", [a for a in args if not a.startswith("--tag=")]


def record(name: str, rows: list[dict[str, Any]], summary: str) -> Path:
    """Write bench/results/NAME.json (rows + provenance) and a readable NAME.md table."""
    provenance = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv]),
        "machine": machine(),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(RESULTS / f"{name}.json", {"schema": 1, **provenance, "summary": summary, "rows": rows})
    header = list(rows[0])
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(_cell(r[h]) for h in header) + " |" for r in rows]
    md = [f"# {name}", "", summary, "", *table, "",
          f"- command: `{provenance['command']}`",
          f"- machine: {provenance['machine']}",
          f"- versions: {provenance['versions']}",
          f"- date: {provenance['date']}", ""]
    (RESULTS / f"{name}.md").write_text("\n".join(md))
    return RESULTS / f"{name}.md"


def _cell(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)
