"""The last rung of the fidelity ladder: the study's front retrained at the full budget, as few
plans as a bisection needs, to ship the fastest whose retrained drop is within the user's limit.

Why: a trial trains briefly, so it overstates what a plan costs. On resnet56 the retrained drop
was a median 0.28x the trial's (bench/results/arms-resnet56-fashion-mnist.md), so a limit judged at
trial fidelity passes over faster plans that a full run shows are within it. Along the trials'
front (validation accuracy against predicted speedup) the retrained drop grows, roughly, with the
speedup; bisecting the front finds the fastest plan within the limit in about log2(front) full
runs. Each full run is `search.export_trial`: it writes the compacted model and records its drop
in the study, so a stopped call resumes where it stopped and earlier exports count.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import optuna
from optuna.trial import FrozenTrial, TrialState

from .errors import Diverged, UserError
from .report import FINALIZED, export_key, exported, margin_within, nondominated, plan_runs, sure_within
from .search import (ExportResult, Search, epochs_text, export_dir, export_trial, full_runs, limit_belief,
                     trial_share)
from .storage import held_elsewhere, release_lease, renew_lease, take_lease

K = TypeVar("K", bound=Hashable)  # a plan as the caller names it: a trial number, a label
FINALIZING = "finalizing:"  # + trial number: the lease a worker holds while it retrains that plan
EVEN = 0.2  # of the weight `_places` spreads evenly, as the chances may be wrong: it bounds the runs then
LOST = 100.0  # points recorded for a plan whose full run diverged: all of them, beyond any limit
REPLICATES = 2  # full runs of one plan at most, where its verdict is a close call (`close_call`)


def candidates(study: optuna.Study) -> list[FrozenTrial]:
    """Trained trials no other trial beats in both validation accuracy and predicted speedup,
    whatever their drop at trial fidelity (that limit is what a full run re-judges), slowest first."""
    return nondominated(t for t in study.get_trials(False, states=(TrialState.COMPLETE,))
                        if t.values and "plan" in t.user_attrs)


def bisect(plans: Sequence[K], within: Mapping[K, bool], busy: Collection[K] = (),
           cost: Mapping[K, float] | None = None, chance: Mapping[K, float] | None = None,
           close: Collection[K] = ()) -> tuple[K | None, K | None]:
    """(the fastest of `plans` known to be within the limit, the one to retrain next or None). `plans`
    are ordered slowest first; `within` holds what full runs found so far; `busy` plans are being
    retrained by other workers; `cost` prices each plan's full run (any unit; equal if None);
    `chance` is each plan's chance of coming within before its run (`state`: from the trial drops
    and the full runs so far; None: every place of the limit alike). Alone, a worker probes the
    plans still in doubt where the runs settling them cost least on average (`_probe`: the middle
    when runs cost alike and nothing is known); beside others, it probes the stretch their runs
    leave open where the limit most likely lies, weighed by the runs settling it takes (`_stretch`;
    the widest when nothing is known: on a front of 15, three workers settle it in 2 rounds of full
    runs where one needs 4). A faster plan found within the limit wins over a slower one found
    outside it (noise or not, it is what was measured). Once no plan is left to probe, a plan at the
    edge whose verdict another run may turn (`close`: `close_call`, runs left) is run again, the
    faster end first: within, it makes the slower moot."""
    lo, hi = _bounds(plans, within)
    ends = sorted({lo, hi} | {i for i, n in enumerate(plans) if lo < i < hi and n in busy})
    a, b = _stretch(plans, list(zip(ends, ends[1:])), chance)
    prices = [1.0 if cost is None else cost[n] for n in plans[a + 1:b]]
    probe = plans[a + 1 + _probe(prices, _places(plans, a, b, chance))[0]] if b - a > 1 else None
    if probe is None:
        probe = next((n for n in _edge(plans, lo, hi) if n in close and n not in busy), None)
    return plans[lo] if lo >= 0 else None, probe


def _edge(plans: Sequence[K], lo: int, hi: int) -> list[K]:
    """The plans at places `hi` and `lo` (`_bounds`), the faster first, where there are plans."""
    return [plans[i] for i in (hi, lo) if 0 <= i < len(plans)]


def _stretch(plans: Sequence[K], gaps: list[tuple[int, int]], chance: Mapping[K, float] | None) -> tuple[int, int]:
    """Of `gaps` (places (a, b) in `plans`: a within or busy, b beyond or busy), the one to probe: the
    most likely to hold the limit (the chance of its slowest end coming within less its fastest's)
    times the runs halving it takes, log2(b - a); the widest where the chances are unknown or rule
    every gap out. Not the widest alone: beside a worker retraining the plan where the limit likely
    lies, the widest stretch left may be plans whose trials lost 3-30 points, all surely beyond."""
    def known(i: int) -> float:
        return 1.0 if i < 0 else 0.0 if i >= len(plans) else chance[plans[i]]  # type: ignore[index]

    likely = {gap: max(known(gap[0]) - known(gap[1]), 0.0) * math.log2(gap[1] - gap[0]) if chance else 0.0
              for gap in gaps}
    return max(gaps, key=lambda gap: (likely[gap], gap[1] - gap[0]))


def _places(plans: Sequence[K], a: int, b: int, chance: Mapping[K, float] | None) -> list[float] | None:
    """How likely the limit falls at each place among `plans[a + 1:b]` (place j: the first j of them
    within), given that the plan at `a` is within and the one at `b` beyond (ends of `plans`: no
    plan), from each plan's `chance` of coming within; None without chances."""
    if chance is None:
        return None
    known = [chance[plans[a]] if a >= 0 else 1.0, *(chance[n] for n in plans[a + 1:b]),
             chance[plans[b]] if b < len(plans) else 0.0]
    places = [max(slower - faster, 0.0) for slower, faster in zip(known, known[1:])]
    if not sum(places):  # the chances rule out every place left: they are wrong here
        return None
    return [(1 - EVEN) * p + EVEN * sum(places) / len(places) for p in places]


def _probe(prices: Sequence[float], places: Sequence[float] | None = None) -> tuple[int, int]:
    """(the place of the plan to retrain first among plans in doubt priced `prices`, slowest first;
    the most full runs settling them can then take). `places` weighs each place of the limit among
    them (`_places`; None: all alike): the order that costs least on average retrains cheaper plans
    first, and the fastest, most pruned plans train fastest (vgg16-bn: a light plan's full run took
    3-6x a heavy one's), and plans where the limit likely lies. On the four study fronts of
    bench/results/arms-*-0+4-0+6.md, priced by their trials' training, prices alone save 5-15% of
    the bisection's mean full-run time against halving, and the first run is 1.4-2.2x cheaper, so a
    `Promotion` fits more of them in its share. Ties go to the middle."""
    weights = list(places) if places is not None else [1.0] * (len(prices) + 1)
    below = list(itertools.accumulate(weights, initial=0.0))  # below[j]: the weight of places < j

    @cache
    def best(a: int, b: int) -> tuple[float, int, int]:  # over places a < i < b: (expected cost, place, runs)
        if b - a <= 1:
            return 0.0, -1, 0
        options = []
        for i in range(a + 1, b):
            (left, _, left_runs), (right, _, right_runs) = best(a, i), best(i, b)
            options.append(((below[b + 1] - below[a + 1]) * prices[i] + left + right, abs(i - (a + b) // 2), i,
                            1 + max(left_runs, right_runs)))
        total, _, place, runs = min(options)
        return total, place, runs

    return best(-1, len(prices))[1:]


def _bounds(plans: Sequence[K], within: Mapping[K, bool]) -> tuple[int, int]:
    """The places of the fastest plan found within the limit (-1: none) and of the slowest one above
    it found beyond (len(plans): none): the plans between are in doubt."""
    lo = max((i for i, n in enumerate(plans) if within.get(n)), default=-1)
    return lo, min((i for i, n in enumerate(plans) if i > lo and within.get(n) is False), default=len(plans))


@dataclass(frozen=True)
class Finalized:
    limit: float  # points of validation accuracy below the dense model, retrained
    confidence: float  # how sure a retrained drop's standard error must make it within the limit
    epochs: str  # of each full run, ADMM+retraining
    front: list[int]  # candidate trials, slowest first
    retrained: dict[int, dict[str, Any]]  # front trials run at these epochs: `report.plan_runs` rows
    busy: list[int]  # front trials other workers are retraining now (a first run or a replicate)
    best: int | None  # the fastest retrained within the limit
    next: int | None  # the next full run the bisection asks of this worker; None: none left to it
    doubt: int  # front plans between `best` and the slowest faster plan found beyond the limit
    runs_left: int  # full runs one worker still needs, probing as `bisect` does, and replicates
    replicates: int = REPLICATES  # full runs of one plan at most

    @property
    def settled(self) -> bool:
        return self.next is None and not self.busy

    def replicate(self, number: int) -> int:
        """Which run of trial `number` its next full run is: 0 the first, k > 0 its k-th replicate."""
        return len(self.retrained[number]["drops"]) if number in self.retrained else 0

    def to_attrs(self) -> dict[str, Any]:
        return {"limit": self.limit, "confidence": self.confidence, "epochs": self.epochs, "front": self.front,
                "retrained": sorted(self.retrained), "busy": self.busy, "best": self.best, "settled": self.settled,
                "replicates": self.replicates}


def state(study: optuna.Study, limit: float, epochs: str, confidence: float = 0.5,
          replicates: int = REPLICATES) -> Finalized:
    """Where the bisection stands: the front, the full runs at `epochs` already in the study, and the
    ones other workers hold a lease on. A plan is within the limit if its drop's standard error (paired
    with the dense model; over its runs' mean where it has several) makes that at least `confidence`
    sure: 0.5 takes the point estimate. Once the bisection has no plan left to probe, a close call at
    its edge (`close_call`) is run again, up to `replicates` runs of one plan (`bisect`)."""
    trials = candidates(study)
    front, cost = [t.number for t in trials], run_prices(trials)
    rows = exported(study)
    runs = {n: r for n, r in plan_runs(rows, epochs).items() if n in front}
    busy = [n for n in front if held_elsewhere(study.user_attrs.get(f"{FINALIZING}{n}"))]
    within = {n: sure_within(r, limit) >= confidence for n, r in runs.items()}
    chance = within_chances(trials, full_runs(rows, limit, epochs, confidence), limit)
    close = {n for n, r in runs.items() if close_call(r, limit, confidence) and len(r["drops"]) < replicates}
    best, probe = bisect(front, within, busy, cost, chance, close)
    lo, hi = _bounds(front, within)
    return Finalized(limit, confidence, epochs, front, runs, busy, best, probe, hi - lo - 1,
                     _probe([cost[n] for n in front[lo + 1:hi]], _places(front, lo, hi, chance))[1]
                     + len(close.intersection(_edge(front, lo, hi))), replicates)


def close_call(run: dict[str, Any], limit: float, confidence: float) -> bool:
    """Whether a plan's retrained drop (`report.plan_runs`: its runs' mean) lies within one standard
    error of where `confidence` draws the line: one more run at another seed may turn its verdict.
    Why: one full run near the limit is a coin toss. The same plan (resnet56 / Fashion-MNIST, the
    sensitivity seed at 0.5, limit 0.5) retrained 0.03 ± 0.23 on one machine and 0.57 ± 0.24 on
    another, and that verdict alone decided between shipping 2.93x and 2.45x; a second run halves
    the variance where it decides, at one full run per close call at the bisection's edge."""
    se = run.get("val_drop_se") or 0.0
    return not run.get("diverged") and abs(margin_within(run, limit, confidence)) < se


def within_chances(trials: Sequence[FrozenTrial], runs: Sequence[tuple[float, float]],
                   limit: float) -> dict[int, float] | None:
    """Per trial, the chance its full run comes within the limit, judged by its drop at trial fidelity
    against where the study's full runs (`runs`, any plans'; before any, the limit itself) put the
    crossing (`search.limit_belief`); None for trials without a recorded drop. Why: halving a front
    whose ends are plans that surely pass (slower than a plan found within) or surely fail
    (resnet56's uniform 90% lost 33.5 points in its trial) spends full runs where the answer is known."""
    belief = limit_belief(runs, limit)
    drops = {t.number: t.user_attrs.get("acc_drop") for t in trials}
    if any(d is None for d in drops.values()):
        return None
    return {n: 1.0 - belief.cdf(math.log1p(max(d, 0.0))) for n, d in drops.items()}


def run_prices(trials: Sequence[FrozenTrial]) -> dict[int, float]:
    """Per trial, what its full run costs relative to the others': its own training's seconds (the
    slim network a plan retrains is what sets both); the median of the others' where a trial lacks
    them (a study from before they were recorded)."""
    known = [t.user_attrs["train_seconds"] for t in trials if t.user_attrs.get("train_seconds")]
    typical = statistics.median(known) if known else 1.0
    return {t.number: t.user_attrs.get("train_seconds") or typical for t in trials}


def finalize(search: Search, study: optuna.Study, limit: float, admm_epochs: float, retrain_epochs: float,
             out_root: Path, retrains: int | None = None, confidence: float = 0.5, replicates: int = REPLICATES,
             on_run: Callable[[int, Finalized], Callable[[int, int, str], None] | None] | None = None,
             on_done: Callable[[int, ExportResult | Diverged], None] | None = None) -> Finalized:
    """Retrain front plans at the full budget, as the bisection asks, until none is left to this
    worker or `retrains` full runs are done; record and return where it stands. Any number of workers
    may finalize one study at once: each plan is retrained under its own lease. A plan whose full
    run diverges is recorded as lost (beyond any limit), so the bisection goes on to slower plans
    instead of retrying it; a close call is run again at another seed (`state`, up to `replicates`
    runs of a plan). `on_run(trial, state)` may return a progress callback for that run;
    `on_done` hears each run's result, or its divergence."""
    epochs = epochs_text(admm_epochs, retrain_epochs)
    now, ran = state(study, limit, epochs, confidence, replicates), 0
    if not now.front:
        raise UserError(f"study '{study.study_name}' has no trained trial to finalize; run `sparsesearch optimize "
                        f"--study {study.study_name}` first")
    while now.next is not None and (retrains is None or ran < retrains):
        lease = f"{FINALIZING}{now.next}"
        if take_lease(study, lease) is None:  # else another worker took it meanwhile: look again
            replicate = now.replicate(now.next)
            try:
                progress = _renewing(study, lease, on_run(now.next, now) if on_run else None)
                out = export_dir(out_root, now.next, epochs, replicate)
                result: ExportResult | Diverged = export_trial(search, study, now.next, admm_epochs, retrain_epochs,
                                                               out, progress, within_trial_limit=False,
                                                               replicate=replicate)
            except Diverged as e:
                result = e
                study.set_user_attr(export_key(study, now.next, epochs, replicate), {
                    "val_drop": LOST, "val_drop_se": 0.0, "test_drop": LOST, "speedup": 0.0, "epochs": epochs,
                    "diverged": str(e)})
            finally:
                release_lease(study, lease)
            if on_done:
                on_done(now.next, result)
            ran += 1
        now = state(study, limit, epochs, confidence, replicates)
    if ran or now.retrained:  # a call that only looks (--retrains 0, nothing run yet) leaves the last record
        study.set_user_attr(FINALIZED, now.to_attrs())
    return now


@dataclass
class Promotion:
    """Full runs between a study's trials, so the study calibrates its own trial limit as it goes
    (`search.run` asks `due` after each trial). Judged at the user's limit, short trials pass only
    plans far slower than full runs allow: on resnet56 (one-shot trials, limit 0.5) no TPE trial
    went past 1.63x predicted, while plans that retrained within 0.5 had lost up to 3.98 points in
    their trials (bench/results/arms-resnet56-fashion-mnist-0+4-0+6.md). `search.trial_limit`
    learns that gap from full runs, but `finalize` runs them after the study, when no budget is left
    to search with it. Here the bisection's next plan is retrained while the study runs, at most
    `share` of the run's time, and the trials after it are judged at the limit it supports;
    `finalize` counts these runs later, so they are not spent twice."""

    search: Search
    limit: float  # the user's, retrained
    epochs: tuple[float, float]  # ADMM+RETRAIN of each full run
    out_root: Path  # the study's export folder
    share: float  # of the run's time the full runs may take
    cost_s: float  # one full run's seconds timed on the dense network: a bound on any plan's
    on_run: Callable[[int, Finalized], Callable[[int, int, str], None] | None] | None = None
    on_done: Callable[[int, ExportResult | Diverged], None] | None = None
    spent_s: float = 0.0  # what this run's full runs took
    priced_s: float = 0.0  # what they were priced at (`priced`)
    runs: int = 0

    def due(self, study: optuna.Study, total_s: float, left_s: float) -> bool:
        """Whether the bisection names a plan no other worker holds, whose full run (`cost`) keeps
        this run's full runs within `share` of `total_s` and ends within `left_s`, once the uniform
        ladder's first rates (30-90%) have trained (the front the bisection halves spans them). Not
        the rungs the ladder adds around the trial limit: judged at the user's limit they went on
        down (resnet56: 15%, 20%, 25%...) while the full runs they waited for would raise it."""
        first = {label for label, _ in self.search.baselines()}
        if any(t.user_attrs.get("baseline") in first for t in study.get_trials(False, states=(TrialState.WAITING,))):
            return False
        number = state(study, self.limit, epochs_text(*self.epochs)).next
        if number is None:
            return False
        cost = self.cost(study, number)
        return self.spent_s + cost <= self.share * total_s and cost <= left_s

    def priced(self, study: optuna.Study, number: int) -> float:
        """Trial `number`'s full run priced by its trial: the trial's training scaled to a full run's
        work (`trial_share`: its slim network, timed on this device), at most `cost_s`, which, timed
        on the dense network, overstates one-shot runs (resnet56 at 0+6 epochs: 1,920 s, where plans'
        runs took 813-1,190 s, a heavier plan's less)."""
        seconds = study.get_trials(False)[number].user_attrs.get("train_seconds")
        return min(self.cost_s, seconds / trial_share(self.search.config, self.epochs)) if seconds else self.cost_s

    def cost(self, study: optuna.Study, number: int) -> float:
        """Seconds trial `number`'s full run will take: its price (`priced`), scaled by what this
        run's full runs took against their prices. Not their mean: the bisection's next plan is often
        lighter than the last, and the mean held a second run out of a 2-hour resnet56 study (one run
        of uniform 50% took 904 s, 25% of 2 hours is 1,800 s, while uniform 70% trains 8% faster)."""
        price = self.priced(study, number)
        return price * self.spent_s / self.priced_s if self.runs and self.priced_s else price

    def __call__(self, study: optuna.Study) -> Finalized:
        number = state(study, self.limit, epochs_text(*self.epochs)).next
        price = self.priced(study, number) if number is not None else 0.0
        started = time.monotonic()
        done = finalize(self.search, study, self.limit, *self.epochs, self.out_root, 1, on_run=self.on_run,
                        on_done=self.on_done)
        self.spent_s += time.monotonic() - started
        self.priced_s += price
        self.runs += 1
        return done


def _renewing(study: optuna.Study, lease: str, progress: Callable[[int, int, str], None] | None,
              every_s: float = 60.0) -> Callable[[int, int, str], None]:
    """`progress`, renewing `lease` on the way (at most every `every_s`): a full run takes hours,
    and a lease not renewed for `storage.LEASE_S` is free to another worker."""
    last = time.monotonic()

    def step(done: int, total: int, phase: str) -> None:
        nonlocal last
        if time.monotonic() - last > every_s:
            renew_lease(study, lease)
            last = time.monotonic()
        if progress:
            progress(done, total, phase)

    return step
