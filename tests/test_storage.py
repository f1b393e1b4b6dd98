"""Optuna's RDB storage on a real PostgreSQL server, shared by worker processes."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import optuna
from optuna.trial import TrialState

TRIALS_PER_WORKER = 5

# Each worker says "ready" once optuna is imported and waits for the parent's go, so that both open
# the study (and its tables) at the same moment. Workers starting together race to create the tables
# (on PostgreSQL the loser's CREATE TYPE breaks a unique index); like sparsesearch's own storage,
# the loser finds them made and opens them again.
_WORKER = """
import sys
import time
import optuna
import sqlalchemy.exc
optuna.logging.set_verbosity(optuna.logging.WARNING)
url, worker, trials = sys.argv[1], sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()

def storage():
    for delay in (0.2, 0.4, 0.8):
        try:
            return optuna.storages.RDBStorage(url)
        except sqlalchemy.exc.IntegrityError:
            time.sleep(delay)
    return optuna.storages.RDBStorage(url)

study = optuna.create_study(study_name="shared", storage=storage(), load_if_exists=True)

def objective(trial):
    trial.set_user_attr("worker", worker)
    return trial.suggest_float("x", 0.0, 1.0)

study.optimize(objective, n_trials=trials)
"""


def test_two_workers_opening_one_postgres_study_at_once_keep_all_trials_with_distinct_numbers(
        fresh_postgres_db: str) -> None:
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, fresh_postgres_db, name, str(TRIALS_PER_WORKER)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name in ("a", "b")]
    try:
        assert [w.stdout.readline().strip() for w in workers] == ["ready", "ready"]
        for w in workers:
            w.stdin.write("go\n")
            w.stdin.flush()
        errors = [w.communicate(timeout=60)[1] for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert [w.returncode for w in workers] == [0, 0], errors
    trials = optuna.load_study(study_name="shared", storage=fresh_postgres_db).trials
    assert Counter(t.user_attrs["worker"] for t in trials) == {"a": TRIALS_PER_WORKER, "b": TRIALS_PER_WORKER}
    assert sorted(t.number for t in trials) == list(range(2 * TRIALS_PER_WORKER))
    assert {t.state for t in trials} == {TrialState.COMPLETE}
