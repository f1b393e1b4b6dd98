"""The bisection that picks which front plans `finalize` retrains at the full budget."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import optuna
import pytest

from sparsesearch.errors import Busy
from sparsesearch.finalize import FINALIZING, bisect, finalize


def run(numbers: list[int], within: dict[int, bool], oracle: dict[int, bool]) -> tuple[int | None, list[int]]:
    """Bisect to the end, asking `oracle` (a full run) whenever the bisection names a plan."""
    probes = []
    while True:
        best, probe = bisect(numbers, within)
        if probe is None:
            return best, probes
        assert probe not in within, "a plan already retrained is never asked for again"
        probes.append(probe)
        within[probe] = oracle[probe]


@pytest.mark.parametrize("n", [1, 2, 5, 10, 17])
def test_bisection_finds_the_fastest_plan_within_the_limit_in_log2_full_runs(n: int) -> None:
    """On a front whose retrained drop grows with speed, for every place of the boundary."""
    numbers = random.Random(n).sample(range(100), n)  # trial numbers in no particular order
    for boundary in range(n + 1):  # the first `boundary` plans (slowest first) are within the limit
        oracle = {m: i < boundary for i, m in enumerate(numbers)}
        best, probes = run(numbers, {}, oracle)
        assert best == (numbers[boundary - 1] if boundary else None)
        assert len(probes) <= math.ceil(math.log2(n + 1))


def test_bisection_reuses_earlier_full_runs() -> None:
    """Exports a user ran before count: knowing plan 3 within and plan 6 beyond leaves 4 and 5."""
    numbers = list(range(10))
    oracle = {m: m <= 4 for m in numbers}
    best, probes = run(numbers, {3: True, 6: False}, oracle)
    assert best == 4 and set(probes) <= {4, 5} and len(probes) == 2


def test_a_faster_plan_found_within_the_limit_wins_over_a_slower_one_beyond_it() -> None:
    """Noise can make the retrained drops non-monotone; what was measured within the limit ships."""
    best, probe = bisect([10, 11, 12, 13], {11: False, 12: True})
    assert best == 12 and probe == 13
    assert bisect([10, 11, 12, 13], {11: False, 12: True, 13: False}) == (12, None)


def test_a_second_worker_finalizing_the_same_study_is_refused_before_it_trains(tmp_path: Path) -> None:
    """Two would retrain the same plan into one export folder; the second is told who holds it."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}", study_name="s",
                                directions=["maximize", "maximize"])
    study.set_user_attr(FINALIZING, {"by": "otherhost:4242", "at": time.time()})
    with pytest.raises(Busy, match="worker otherhost:4242 is finalizing study 's'"):
        finalize(None, study, 0.5, 1.0, 1.0, tmp_path)  # type: ignore[arg-type]  # refused before any use
    assert not any(tmp_path.glob("trial-*"))
