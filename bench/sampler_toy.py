"""Does the sampler find faster plans within the limit when it sees every feasible trial as equally
accurate (`search.AtTrialLimit`: ranked by speed alone) than when it sees their own accuracies
(multi-objective TPE spreading its draws over the whole front)? Measured on a toy with a known
answer, where thousands of trials cost seconds: a network of six stages, each with a share of the
latency and a sensitivity, a plan a filter rate per stage (the space's 0-0.9 grid), the drop a
trial reports noisy as a short trial's (σ 0.25 points). Each arm starts from the uniform ladder, as
a study does, and draws 40 trials; the score is the fastest plan whose *true* drop is within the
limit. Not evidence for a real network, which only a study beside another can give: a check that
the rule does what it is meant to where the answer is known.

    python bench/sampler_toy.py
"""

from __future__ import annotations

import copy
import random
import statistics

import optuna
from optuna.trial import FrozenTrial

from common import record
from sparsesearch import search

LATENCY = (0.10, 0.10, 0.15, 0.15, 0.20, 0.20)  # each stage's share of the dense latency
SENSITIVITY = (1.0, 6.0, 0.5, 4.0, 0.3, 12.0)  # points lost at rate 1, growing as the rate cubed
NOISE = 0.25  # a trial's drop: a short trial on a validation split, one standard error
REFERENCE = 93.5  # the control's accuracy
TRIALS, SEEDS, LIMITS = 40, 12, (0.5, 2.0, 5.0)
PARAMS = [f"rate:{i}" for i in range(len(LATENCY))]


def truth(rates: list[float]) -> tuple[float, float]:
    """(speedup, drop) of a plan: latency falls with each stage's rate, accuracy with its cube."""
    return (1 / (1 - 0.95 * sum(w * r for w, r in zip(LATENCY, rates))),
            sum(s * r**3 for s, r in zip(SENSITIVITY, rates)))


class Spread(search.AtTrialLimit):
    """The sampler's view before: constraints at the trial limit, each trial's own accuracy."""

    def _judged(self, trial: FrozenTrial) -> FrozenTrial:
        judged = copy.copy(super()._judged(trial))
        judged.values = trial.values
        return judged


class SpreadTPE(search.TrialLimitTPE):
    def _seen(self, study: optuna.Study) -> search.AtTrialLimit:
        return Spread(study, search.trial_limit(study, self.max_acc_drop))


def sampler(arm: str, limit: float, seed: int) -> optuna.samplers.BaseSampler:
    if arm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    kind = search.TrialLimitTPE if arm == "edge" else SpreadTPE
    return kind(limit, seed=seed, multivariate=True, n_startup_trials=8)  # as `search.make_sampler`


def best(arm: str, limit: float, seed: int) -> float:
    """The fastest plan within `limit` by its true drop (1.0: none) after TRIALS trials."""
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler(arm, limit, seed))
    for rate in search.BASELINE_RATES:
        study.enqueue_trial(dict.fromkeys(PARAMS, rate))
    noise = random.Random(seed)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        speedup, drop = truth([trial.suggest_float(p, 0.0, 0.9, step=0.05) for p in PARAMS])
        seen = drop + noise.gauss(0.0, NOISE)
        trial.set_user_attr("acc_drop", seen)
        trial.set_user_attr("true_drop", drop)
        trial.set_constraint("accuracy_drop", seen - limit)
        return REFERENCE - seen, speedup

    study.optimize(objective, n_trials=TRIALS)
    return max((t.values[1] for t in study.trials if t.user_attrs["true_drop"] <= limit), default=1.0)


def main() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    for limit in LIMITS:
        for arm in ("edge", "spread", "random"):
            found = [best(arm, limit, seed) for seed in range(SEEDS)]
            rows.append({"limit": limit, "arm": arm, "median": statistics.median(found),
                         "mean": statistics.mean(found), "min": min(found), "max": max(found)})
            print(rows[-1], flush=True)
    record("sampler_toy", rows, f"The fastest plan within the limit (true drop) after {TRIALS} trials, over "
           f"{SEEDS} seeds: `edge`, the sampler as it is (every trial within the trial limit seen as accurate as "
           "its edge); `spread`, TPE seeing each trial's own accuracy (before); `random`. A toy of six stages "
           f"with known latency shares {LATENCY} and sensitivities {SENSITIVITY}, trial drops noisy by "
           f"σ {NOISE} points; each arm starts from the uniform ladder at {search.BASELINE_RATES}.")


if __name__ == "__main__":
    main()
