"""The bisection that picks which front plans `finalize` retrains at the full budget."""

from __future__ import annotations

import math
import random
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from sparsesearch import finalize as finalizing, report, search
from sparsesearch.errors import Diverged, UserError
from sparsesearch.finalize import FINALIZING, bisect, candidates, finalize, state
from sparsesearch.report import EXPORTED


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


def test_workers_side_by_side_split_the_stretch_the_others_leave_open() -> None:
    """A plan another worker retrains is never proposed; the next worker halves the widest gap left."""
    plans = list(range(10))
    assert bisect(plans, {}) == (None, 4)
    assert bisect(plans, {}, busy={4}) == (None, 7)  # gaps -1..4 and 4..10: the wider one, halved
    assert bisect(plans, {}, busy={4, 7}) == (None, 1)
    assert bisect(plans, {2: True, 4: False}, busy={3}) == (2, None), "nothing left to this worker"


VGG_PRICES = [156, 142, 136, 121, 166, 137, 61, 78, 54, 40, 54]  # the promoted vgg16-bn arm's front: trial seconds


def priced_run(prices: list[float], boundary: int, cost: bool) -> tuple[int | None, float, int]:
    """Bisect a front priced `prices` (slowest first) whose first `boundary` plans are within, with or
    without the prices: the pick, what its full runs cost, how many there were."""
    plans, within = list(range(len(prices))), {}
    while True:
        best, probe = bisect(plans, within, cost=dict(enumerate(prices)) if cost else None)
        if probe is None:
            return best, sum(prices[p] for p in within), len(within)
        within[probe] = probe < boundary


def test_priced_bisection_retrains_cheaper_plans_and_still_finds_the_fastest_within() -> None:
    """Heavier plans retrain faster; over every place of the limit, the priced bisection finds the
    same plan as halving, at a lower mean cost, with a cheaper first run, and within the runs
    `state` says one worker needs at most."""
    places = range(len(VGG_PRICES) + 1)
    priced = [priced_run(VGG_PRICES, b, cost=True) for b in places]
    halved = [priced_run(VGG_PRICES, b, cost=False) for b in places]
    assert [p[0] for p in priced] == [h[0] for h in halved] == [b - 1 if b else None for b in places]
    assert sum(p[1] for p in priced) < 0.9 * sum(h[1] for h in halved)
    first, most = finalizing._probe(VGG_PRICES)
    assert VGG_PRICES[first] < VGG_PRICES[bisect(list(range(11)), {})[1]]
    assert max(p[2] for p in priced) == most


def test_state_prices_plans_by_their_trials_training_and_counts_the_runs_left(tmp_path: Path) -> None:
    """The front's trials' `train_seconds` price the bisection: the three lightest plans trained 10x
    slower, so the first full run is the fourth plan's, not the middle one's."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}", directions=["maximize", "maximize"])
    for n, seconds in enumerate([100.0, 100.0, 100.0, 10.0, 10.0]):
        study.add_trial(optuna.trial.create_trial(values=[99.0 - n, 1.2 + 0.1 * n],
                                                  user_attrs={"plan": {}, "train_seconds": seconds}))
    now = state(study, 0.5, "4+2")
    assert now.next == 3 and now.doubt == 5 and now.runs_left == finalizing._probe([100, 100, 100, 10, 10])[1] == 3
    assert state(front_of_five(f"sqlite:///{tmp_path / 'b.sqlite'}"), 0.5, "4+2").next == 2, "unpriced: halved"


def probes_to_settle(plans: list[int], boundary: int, chance: dict[int, float] | None) -> tuple[int | None, int]:
    """Bisect `plans` (slowest first) whose first `boundary` are within the limit, weighing places by
    `chance`: the pick, and how many full runs it took."""
    within: dict[int, bool] = {}
    while True:
        best, probe = bisect(plans, within, chance=chance)
        if probe is None:
            return best, len(within)
        within[probe] = plans.index(probe) < boundary


def test_the_bisection_probes_where_the_trial_drops_put_the_limit_and_still_finds_the_fastest_within() -> None:
    """A front of 12 whose trial drops grow from 0.5 to 43 points, the full runs so far putting the
    crossing near 2: wherever the limit truly lies, the bisection picks the same plan as halving;
    where the chances say it likely lies, it gets there in fewer full runs on average."""
    drops = [0.5 * 1.5 ** i for i in range(12)]  # 0.5 .. 43
    belief = search.limit_belief([(1.0, 0.7)], 0.5)  # one run within, 1 point lost in its trial
    assert belief is not None and math.expm1(belief.mean) == pytest.approx(2.0)
    plans = list(range(12))
    chance = {n: 1 - belief.cdf(math.log1p(d)) for n, d in zip(plans, drops)}
    weighed = [probes_to_settle(plans, b, chance) for b in range(13)]
    halved = [probes_to_settle(plans, b, None) for b in range(13)]
    assert [w[0] for w in weighed] == [h[0] for h in halved] == [b - 1 if b else None for b in range(13)]
    places = [slower - faster for slower, faster in zip([1.0, *chance.values()], [*chance.values(), 0.0])]
    assert (sum(p * w[1] for p, w in zip(places, weighed)) < 0.8 * sum(p * h[1] for p, h in zip(places, halved)))
    first = bisect(plans, {}, chance=chance)[1]
    assert 0.2 < chance[first] < 0.8 and first != bisect(plans, {})[1]


def test_beside_a_busy_worker_the_bisection_probes_where_the_limit_likely_lies_not_the_widest_stretch() -> None:
    """A front of 12 (trial drops 0.5 to 43), the crossing sought near 2: another worker retrains the
    plan that lost 2.5. The stretch above it is wider, but its plans lost 3.8 to 43 points in their
    trials: the second worker probes below it, where the limit more likely lies."""
    drops = [0.5 * 1.5 ** i for i in range(12)]
    belief = search.limit_belief([(1.0, 0.7)], 0.5)
    chance = {n: 1 - belief.cdf(math.log1p(d)) for n, d in enumerate(drops)}
    plans = list(range(12))
    assert bisect(plans, {}, busy={4}, chance=chance)[1] in {0, 1, 2, 3}
    assert bisect(plans, {}, busy={4})[1] in range(5, 12), "nothing known: the widest stretch"


def test_the_limit_is_sought_at_twice_the_largest_trial_drop_found_within_until_a_run_lands_beyond() -> None:
    """Before any full run the crossing is sought at twice the limit (a trial within it surely
    retrains within); with runs within only, as a galloping search would, at twice their largest
    trial drop; a run beyond puts it where the runs' line crosses the limit (`calibrated_limit`)."""
    assert math.expm1(search.limit_belief([], 0.5).mean) == pytest.approx(1.0)
    within = search.limit_belief([(2.1, 0.73), (1.0, 0.6)], 0.5)
    assert within is not None and math.expm1(within.mean) == pytest.approx(4.2)
    near = search.limit_belief([(1.18, 0.32), (2.23, 0.02)], 0.5)  # resnet56's seeds at 0.45 and 0.5: 0.48 retrained
    assert math.expm1(near.mean) == pytest.approx(math.expm1(math.log1p(2.23) * 0.5 / 0.48)) == \
        pytest.approx(2.39, abs=0.01), "where the line from the control through the largest run crosses, if sooner"
    assert math.expm1(search.limit_belief([(1.18, 0.32), (2.23, 0.45)], 0.5).mean) == pytest.approx(4.46), \
        "a run that lost little retrained: doubling is sooner"
    runs = [(2.1, 0.73), (4.98, -0.57)]
    crossed = search.limit_belief(runs, 0.5)
    assert crossed is not None and math.expm1(crossed.mean) == pytest.approx(search.calibrated_limit(runs, 0.5))
    assert 2.1 < math.expm1(crossed.mean) < 4.98


def test_state_weighs_the_front_by_full_runs_of_plans_off_it(tmp_path: Path) -> None:
    """A plan the front dominates (uniform pruning, say) retrained within the limit at 2 points lost
    in its trial: the first full run on the front goes where the limit likely lies, not to its middle."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}", directions=["maximize", "maximize"])
    drops = [0.5 * 1.5 ** i for i in range(9)]  # 0.5 .. 12.8
    for n, drop in enumerate(drops):
        study.add_trial(optuna.trial.create_trial(values=[99.0 - drop, 1.2 + 0.1 * n],
                                                  user_attrs={"plan": {}, "acc_drop": drop}))
    study.add_trial(optuna.trial.create_trial(values=[97.0, 1.1], user_attrs={"plan": {}, "acc_drop": 2.0}))
    assert state(study, 0.5, "4+2").next == 2, "no full run yet: the gallop starts at twice the limit (1.1 lost)"
    study.set_user_attr(report.export_key(study, 9, "4+2"), {"val_drop": -0.2, "val_drop_se": 0.2, "test_drop": 0.0,
                                                            "speedup": 1.1, "epochs": "4+2"})
    now = state(study, 0.5, "4+2")
    assert now.front == list(range(9)) and now.next == 5  # 2.0 within: the crossing sought at 4, plan 5 loses 3.8


def rounds(plans: list[int], boundary: int, workers: int) -> tuple[int | None, int]:
    """Bisect with `workers` side by side: each round every worker takes a plan (the others' counted
    busy), then all their results arrive. The pick, and how many rounds of full runs it took."""
    oracle, within, n = {m: i < boundary for i, m in enumerate(plans)}, {}, 0
    while True:
        busy: set[int] = set()
        for _ in range(workers):
            best, probe = bisect(plans, within, busy)
            if probe is not None:
                busy.add(probe)
        if not busy:
            return best, n
        within |= {m: oracle[m] for m in busy}
        n += 1


def test_more_workers_never_take_more_rounds_and_three_halve_them_on_a_front_of_15() -> None:
    plans = list(range(15))
    worst = {}
    for workers in (1, 2, 3):
        for boundary in range(len(plans) + 1):
            best, n = rounds(plans, boundary, workers)
            assert best == (boundary - 1 if boundary else None)
            assert n <= rounds(plans, boundary, 1)[1]
            worst[workers] = max(worst.get(workers, 0), n)
    assert worst == {1: 4, 2: 4, 3: 2}


def front_of_five(storage: str) -> optuna.Study:
    """Study "s" of five trained trials, each faster and less accurate than the one before: a front."""
    study = optuna.create_study(storage=storage, study_name="s", directions=["maximize", "maximize"])
    for n in range(5):
        study.add_trial(optuna.trial.create_trial(values=[99.0 - n, 1.2 + 0.1 * n], user_attrs={"plan": {}}))
    return study


def test_a_plan_another_worker_holds_is_busy_and_not_proposed(tmp_path: Path) -> None:
    """Workers finalizing one study at once each retrain a plan under its own lease."""
    study = front_of_five(f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert [t.number for t in candidates(study)] == [0, 1, 2, 3, 4]
    assert state(study, 0.5, "4+2").next == 2
    study.set_user_attr(f"{FINALIZING}2", {"by": "otherhost:4242", "at": time.time()})
    now = state(study, 0.5, "4+2")
    assert now.busy == [2] and now.next == 0 and not now.settled  # two stretches of 2 open: the slower first
    study.set_user_attr(f"{FINALIZING}2", {"by": "otherhost:4242", "at": time.time() - 3600})  # its holder died
    assert state(study, 0.5, "4+2").next == 2


def test_runs_at_other_epochs_keep_their_own_record_and_count_only_at_theirs(tmp_path: Path) -> None:
    """A quick run (1+1) after a long one (4+2) of the same plan replaces neither its record nor its
    verdict; a record from before the epochs were part of the key keeps being read and rewritten."""
    study = front_of_five(f"sqlite:///{tmp_path / 'db.sqlite'}")
    study.set_user_attr(f"{EXPORTED}2", {"val_drop": 0.2, "val_drop_se": 0.1, "test_drop": 0.1, "speedup": 1.4,
                                         "epochs": "4+2"})  # the old key
    assert report.export_key(study, 2, "4+2") == f"{EXPORTED}2"
    study.set_user_attr(report.export_key(study, 2, "1+1"), {"val_drop": 3.0, "val_drop_se": 0.3, "test_drop": 3.0,
                                                           "speedup": 1.4, "epochs": "1+1"})
    assert [(r["trial"], r["epochs"]) for r in report.exported(study)] == [(2, "1+1"), (2, "4+2")]
    assert state(study, 0.5, "4+2").best == 2 and state(study, 0.5, "1+1").best is None


def test_finalizing_a_study_with_no_trained_trial_says_what_to_run_first(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}", study_name="empty",
                                directions=["maximize", "maximize"])
    with pytest.raises(UserError, match="no trained trial to finalize; run `sparsesearch optimize --study empty`"):
        finalize(None, study, 0.5, 1.0, 1.0, tmp_path)  # type: ignore[arg-type]  # refused before any use


def test_a_higher_confidence_asks_the_drops_standard_error_to_clear_the_limit(tmp_path: Path) -> None:
    """0.4 ± 0.2 points retrained is within 0.5 by its point estimate (69% sure), not at 84%: the
    bisection then treats the plan as beyond the limit and turns to slower plans."""
    study = front_of_five(f"sqlite:///{tmp_path / 'db.sqlite'}")
    study.set_user_attr(f"{EXPORTED}2", {"val_drop": 0.4, "val_drop_se": 0.2, "test_drop": 0.3, "speedup": 1.4,
                                         "epochs": "4+2"})
    point = state(study, 0.5, "4+2")
    assert point.best == 2 and point.next == 3
    sure = state(study, 0.5, "4+2", confidence=0.84)
    assert sure.best is None and sure.next == 0 and sure.doubt == 2


_HOLDER = """
import sys, optuna
from sparsesearch.storage import take_lease
study = optuna.load_study(study_name="s", storage=sys.argv[1])
assert take_lease(study, sys.argv[2]) is None
print("held", flush=True)
sys.stdin.read()  # until the test lets go
"""


def test_on_a_postgresql_server_a_plan_another_process_retrains_is_busy_until_that_process_ends(
        fresh_postgres_db: str) -> None:
    """Workers on one server: the lease of a live process keeps its plan out of the others' reach;
    once the process is gone (killed, say), the plan is free again."""
    study = front_of_five(fresh_postgres_db)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, fresh_postgres_db, f"{FINALIZING}2"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        now = state(study, 0.5, "4+2")
        assert now.busy == [2] and now.next == 0
    finally:
        holder.kill()
        holder.wait()
    assert state(study, 0.5, "4+2").next == 2


def test_a_full_run_that_diverges_counts_as_beyond_the_limit_and_the_bisection_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retrying it would diverge again and stall the bisection; it is recorded as lost instead, and
    the report says it diverged."""
    study = front_of_five(f"sqlite:///{tmp_path / 'db.sqlite'}")

    def diverging(*args: object, **kwargs: object) -> None:
        raise Diverged("training diverged: the loss is nan")

    heard: list[tuple[int, str]] = []
    monkeypatch.setattr(finalizing, "export_trial", diverging)
    done = finalize(None, study, 100.0, 4.0, 2.0, tmp_path,  # type: ignore[arg-type]  # never trains here
                    on_done=lambda trial, result: heard.append((trial, str(result))))
    assert heard == [(2, "training diverged: the loss is nan"), (0, "training diverged: the loss is nan")]
    assert done.best is None and done.settled and sorted(done.retrained) == [0, 2]
    assert "| 2 | – | diverged | – | 4+2 | –x |" in report.markdown(study)


def crossing(start: float, room: float, drop: float, margin: float) -> float:
    """Where the line from a run within (trial drop `start`, `room` left) to one beyond (`drop`, `margin`)
    crosses the limit, against log(1 + trial drop)."""
    return (1 + start) * ((1 + drop) / (1 + start)) ** (room / (room - margin)) - 1


def test_the_trial_limit_rises_to_where_the_full_runs_line_crosses_the_limit() -> None:
    """Full runs say how much a trial may lose and the plan still pass: walked up from the smallest
    trial drop, each run within raises the limit to its trial drop; the first run beyond ends the
    walk, the limit then where the line from the last run within (or from the control: 0 lost at
    both fidelities) to it crosses the limit. Never below the limit, never past the first run beyond."""
    assert search.calibrated_limit([], 1.0) == 1.0
    assert search.calibrated_limit([(1.9, 0.2), (0.4, 0.6)], 1.0) == 1.9, "in any order; no extrapolation"
    assert search.calibrated_limit([(0.4, 0.6), (1.9, 0.2), (7.6, -0.8)], 1.0) == pytest.approx(
        crossing(1.9, 0.2, 7.6, -0.8))
    # resnet56, one-shot trials, limit 0.5: uniform 50% (2.10 in a trial, -0.23 retrained), seed 7 (4.93,
    # 0.92), uniform 70% (4.98, 1.07): the line crosses at 3.7, past uniform 60% (3.55), which came within
    resnet56 = [(2.10, 0.73), (4.93, -0.42), (4.98, -0.57)]
    assert search.calibrated_limit(resnet56, 0.5) == pytest.approx(crossing(2.10, 0.73, 4.93, -0.42)) == \
        pytest.approx(3.68, abs=0.01)
    assert search.calibrated_limit([(4.98, -0.57)], 0.5) == pytest.approx(crossing(0.0, 0.5, 4.98, -0.57)), \
        "from the control"
    below = search.calibrated_limit([(0.5, 0.5), (2.0, -0.5), (3.0, 0.1)], 1.0)
    assert below == pytest.approx(crossing(0.5, 0.5, 2.0, -0.5)) and below < 2.0, \
        "a plan beyond it below a plan within it: no higher than the first beyond"
    assert search.calibrated_limit([(0.2, -0.5)], 1.0) == 1.0


def test_a_far_run_beyond_the_limit_does_not_raise_the_trial_limit_past_the_runs_between() -> None:
    """resnet56's uniform 90% (33.5 points lost in its trial, 3.58 retrained) as the only run beyond,
    after uniform 50% (2.10, -0.23): the limit lands below uniform 70% (4.98), which retrained
    beyond 0.5, not at the 8.1 a straight line in the trial drop gives."""
    limit = search.calibrated_limit([(2.10, 0.73), (33.53, -3.08)], 0.5)
    assert 3.55 < limit < 4.98
    assert search.calibrated_limit([(-1.5, 0.7), (33.53, -3.08)], 0.5) == pytest.approx(
        crossing(0.0, 0.7, 33.53, -3.08)), "a run within that gained in its trial: the line starts at 0"


def test_a_study_judges_trials_at_the_limit_its_longest_full_runs_support(tmp_path: Path) -> None:
    """The full runs are finalize's (its epochs, its confidence), else the exports at the largest
    budget; a quick look at fewer epochs, a longer export to ship a plan and a diverged run count as
    what they are."""
    study = front_of_five(f"sqlite:///{tmp_path / 'db.sqlite'}")
    for n, drop in enumerate([0.3, 1.2, 2.5, 4.0, 6.0]):
        study.add_trial(optuna.trial.create_trial(values=[90.0 - n, 2.0 + n],
                                                  user_attrs={"plan": {}, "acc_drop": drop}))
    assert search.trial_limit(study, 0.5) == 0.5, "no full run yet"

    def ran(number: int, epochs: str, val_drop: float, **more: str) -> None:
        study.set_user_attr(report.export_key(study, number, epochs), {
            "val_drop": val_drop, "val_drop_se": 0.1, "test_drop": val_drop, "speedup": 2.0, "epochs": epochs} | more)

    ran(6, "1+1", 0.2)  # a look at fewer epochs than a trial's full run: the only runs, so they count
    assert search.trial_limit(study, 0.5) == 1.2
    ran(7, "4+2", 0.3)
    ran(8, "4+2", 0.4)
    ran(9, "1+1", 9.0)  # beyond, but only at 1+1: 4+2 decides now
    assert search.trial_limit(study, 0.5) == 4.0
    ran(9, "4+2", finalizing.LOST, diverged="NaN loss")  # beyond by all it lost: the line barely rises past 4.0
    assert search.trial_limit(study, 0.5) == pytest.approx(crossing(4.0, 0.1, 6.0, 0.5 - finalizing.LOST))
    assert search.trial_limit(study, 0.35) == pytest.approx(crossing(2.5, 0.05, 4.0, -0.05)), \
        "0.3 within 0.35, 0.4 beyond"
    study.set_user_attr(report.FINALIZED, {"epochs": "4+2", "confidence": 0.5})
    ran(5, "20+10", 0.1)  # the user ships trial 5 after a longer run: finalize's evidence stands
    assert search.trial_limit(study, 0.5) == pytest.approx(crossing(4.0, 0.1, 6.0, 0.5 - finalizing.LOST))
    study.set_user_attr(report.FINALIZED, {"epochs": "4+2", "confidence": 0.99})  # 0.3 ± 0.1 is 98% sure
    short = 0.5 - 0.3 - 2.3263 * 0.1  # how far from 99% sure within 0.5 the 2.5 trial's run came
    assert search.trial_limit(study, 0.5) == pytest.approx(crossing(0.0, 0.5, 2.5, short), abs=1e-3), \
        "from the control"


def test_a_promotion_is_due_once_the_first_ladder_ran_while_full_runs_keep_to_their_share(
        tmp_path: Path) -> None:
    """`optimize` retrains the bisection's next plan between trials, so the rest of the search is
    judged at the limit it supports: only within its share of the run, only if it ends in time, not
    before the uniform ladder's first rates trained (the front must span them; rungs the ladder adds
    around the trial limit do not wait), not once settled."""
    study = front_of_five(f"sqlite:///{tmp_path / 'db.sqlite'}")
    ladder = SimpleNamespace(baselines=lambda: [("filter=0.3", {}), ("filter=0.9", {})])
    promotion = finalizing.Promotion(ladder, 0.5, (4.0, 2.0), tmp_path, 0.25, 100.0)  # type: ignore[arg-type]
    assert promotion.due(study, total_s=400.0, left_s=300.0)
    assert not promotion.due(study, total_s=399.0, left_s=300.0), "over its share of the run"
    assert not promotion.due(study, total_s=4000.0, left_s=99.0), "would end after the budget"
    promotion.spent_s = 100.0
    assert not promotion.due(study, total_s=400.0, left_s=300.0) and promotion.due(study, 800.0, math.inf)
    study.enqueue_trial({}, user_attrs={"baseline": "filter=0.15"})
    study.enqueue_trial({}, user_attrs={"seeded": "sensitivity at mean rate 0.15"})
    assert promotion.due(study, 800.0, math.inf), "a rung the ladder added below need not wait"
    study.enqueue_trial({}, user_attrs={"baseline": "filter=0.9"})
    assert not promotion.due(study, 800.0, math.inf), "the first ladder first"
    for _ in range(3):  # the enqueued trials ran (slower than all: not on the front)
        study.tell(study.ask(), [90.0, 1.0])
    assert promotion.due(study, 800.0, math.inf)
    for n in range(5):  # every plan retrained, none within a standard error of the limit: nothing left in doubt
        study.set_user_attr(report.export_key(study, n, "4+2"), {
            "val_drop": 0.1 * n, "val_drop_se": 0.05, "test_drop": 0.0, "speedup": 1.2, "epochs": "4+2"})
    assert not promotion.due(study, 800.0, math.inf), "the bisection is settled"


def test_a_promotion_retrains_the_bisections_next_plan_and_learns_what_one_costs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = front_of_five(f"sqlite:///{tmp_path / 'db.sqlite'}")
    ran: list[int] = []

    def retrained(search: object, study_: optuna.Study, number: int, *args: object, **kwargs: object) -> None:
        ran.append(number)
        time.sleep(0.05)
        study_.set_user_attr(report.export_key(study_, number, "4+2"), {
            "val_drop": 0.2, "val_drop_se": 0.1, "test_drop": 0.1, "speedup": 1.4, "epochs": "4+2"})

    monkeypatch.setattr(finalizing, "export_trial", retrained)
    ladder = SimpleNamespace(config=search.SearchConfig(trial_data=0.1, admm_epochs=0.0, retrain_epochs=4.0))
    promotion = finalizing.Promotion(ladder, 0.5, (4.0, 2.0), tmp_path, share=0.5, cost_s=1e6)  # type: ignore[arg-type]
    done = promotion(study)
    assert ran == [2] and done.best == 2 and done.next == 3, "within: the faster half is in doubt now"
    assert promotion.runs == 1 and promotion.priced_s == 1e6, "no trial seconds: priced at the bound"
    assert 0.05 <= promotion.spent_s < 1e6 and promotion.cost(study, 3) == pytest.approx(promotion.spent_s), \
        "measured, not estimated"
    assert study.user_attrs[report.FINALIZED]["retrained"] == [2], "finalize goes on from it"


def test_before_its_first_full_run_a_promotion_prices_it_by_the_plans_own_trial(tmp_path: Path) -> None:
    """A one-shot trial trains the slim network a full run trains, so its seconds scaled by the work
    price the full run better than the dense network's steps do (resnet56 at 0+6 here: 1,484 s from
    the plan's trial, 1,920 s from the dense network, 1,017-1,139 s run)."""
    study = front_of_five(f"sqlite:///{tmp_path / 'db.sqlite'}")
    study.add_trial(optuna.trial.create_trial(values=[90.0, 3.0], user_attrs={"plan": {}, "train_seconds": 60.0}))
    config = search.SearchConfig(trial_data=0.1, admm_epochs=0.0, retrain_epochs=4.0)
    ladder = SimpleNamespace(config=config, baselines=lambda: [])
    promotion = finalizing.Promotion(ladder, 0.5, (0.0, 6.0), tmp_path, 0.5, 2000.0)  # type: ignore[arg-type]
    assert promotion.cost(study, 5) == pytest.approx(60.0 / (0.1 * 4 / 6)), "a tenth of the data, 4 of 6 epochs"
    assert promotion.cost(study, 0) == 2000.0, "no seconds recorded: the estimate given"
    promotion.cost_s = 500.0
    assert promotion.cost(study, 5) == 500.0, "never above the estimate given"
    promotion.cost_s = 2000.0
    study.add_trial(optuna.trial.create_trial(values=[90.0, 4.0], user_attrs={"plan": {}, "train_seconds": 30.0}))
    promotion.runs, promotion.spent_s, promotion.priced_s = 1, 1350.0, 900.0  # a run took 1.5x its price
    assert promotion.cost(study, 6) == pytest.approx(1.5 * 30.0 / (0.1 * 4 / 6)), \
        "a lighter plan's price, scaled by how the runs so far went"


def record(study: optuna.Study, number: int, drop: float, se: float = 0.24, replicate: int = 0) -> None:
    """A full run of trial `number` at 4+2 epochs, as `search.export_trial` records it."""
    study.set_user_attr(report.export_key(study, number, "4+2", replicate), {
        "val_drop": drop, "val_drop_se": se, "test_drop": drop, "speedup": 1.2 + 0.1 * number, "epochs": "4+2",
        "path": f"trial-{number}-r{replicate}", "replicate": replicate})


def test_a_close_call_at_the_bisections_edge_is_run_again_and_judged_by_its_runs_mean(tmp_path: Path) -> None:
    """One full run near the limit is a coin toss: one resnet56 plan retrained 0.03 ± 0.23 on one
    machine and 0.57 ± 0.24 on another (limit 0.5). Where the bisection's verdict turns on such a
    run, the plan is run again at another seed and judged by the mean, whose error is the runs' over
    sqrt(2); the model shipped is the run that lost least."""
    study = front_of_five(f"sqlite:///{tmp_path / 'db.sqlite'}")
    record(study, 2, 0.1)
    record(study, 3, 0.57)
    record(study, 4, 2.0)
    now = state(study, 0.5, "4+2")
    assert now.best == 2 and now.next == 3 and now.replicate(3) == 1 and not now.settled, \
        "0.57 ± 0.24 is within one standard error beyond; 0.1 and 2.0 are not"
    assert state(study, 0.5, "4+2", replicates=1).settled, "one run per plan: its verdict stands"
    record(study, 3, 0.03, replicate=1)
    now = state(study, 0.5, "4+2")
    three = now.retrained[3]
    assert three["drops"] == [0.57, 0.03] and three["val_drop"] == pytest.approx(0.30)
    assert three["val_drop_se"] == pytest.approx(0.24 / math.sqrt(2)) and three["path"] == "trial-3-r1"
    assert now.best == 3 and now.settled, "within by the mean, more than its error inside"
    assert "trials 2 (0.10 ± 0.24), 3 (0.30 ± 0.17 (mean of 2 runs: 0.57, 0.03))" in "".join(
        report.finalized_text({**now.to_attrs()}, report.exported(study), "s"))


def test_a_close_call_within_is_run_again_and_may_fall_back_to_a_slower_plan(tmp_path: Path) -> None:
    """The edge's slower end is checked too: a plan just within that its second run puts beyond gives
    way to the slower plan found within; no plan runs more than `replicates` times."""
    study = front_of_five(f"sqlite:///{tmp_path / 'db.sqlite'}")
    record(study, 1, 0.0)
    record(study, 2, 0.4)
    record(study, 3, 2.0)
    now = state(study, 0.5, "4+2")
    assert now.best == 2 and now.next == 2 and now.replicate(2) == 1
    record(study, 2, 0.9, replicate=1)
    now = state(study, 0.5, "4+2")
    assert now.retrained[2]["val_drop"] == pytest.approx(0.65) and now.best == 1 and now.settled, \
        "beyond by the mean, still a close call, but run twice already"
    assert state(study, 0.5, "4+2", replicates=3).next == 2, "a third run where three are allowed"
    assert state(study, 0.5, "4+2", confidence=0.84).settled, \
        "at 0.84 the line is a standard error inside the limit: 0.65 ± 0.17 is far from it"


def test_finalize_runs_a_close_calls_replicate_at_its_own_seed_folder_and_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole loop, as `sparsesearch finalize` runs it: the replicate goes to its own folder and
    record (the first run's model is kept), and the report lists both runs."""
    study = front_of_five(f"sqlite:///{tmp_path / 'db.sqlite'}")
    drops = {2: [0.1], 3: [0.57, 0.03], 4: [2.0]}
    ran: list[tuple[int, int, str]] = []

    def retrained(search_: object, study_: optuna.Study, number: int, admm: float, retrain: float, out: Path,
                  *args: object, replicate: int = 0, **kwargs: object) -> None:
        ran.append((number, replicate, out.name))
        record(study_, number, drops[number][replicate], replicate=replicate)

    monkeypatch.setattr(finalizing, "export_trial", retrained)
    done = finalize(None, study, 0.5, 4.0, 2.0, tmp_path)  # type: ignore[arg-type]  # never trains here
    assert ran == [(2, 0, "trial-2-4+2"), (3, 0, "trial-3-4+2"), (3, 1, "trial-3-4+2-r1"), (4, 0, "trial-4-4+2")]
    assert done.best == 3 and done.settled and study.user_attrs["finalized"]["replicates"] == 2
    text = report.markdown(study)
    assert "| 3 | – | 0.57 ± 0.24 |" in text and "| 3 (run 2) | – | 0.03 ± 0.24 |" in text
    assert "with 4 full runs of 4+2 epochs" in text and "up to 2 runs, and judged by their mean" in text
