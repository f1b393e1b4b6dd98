"""Optuna's RDB storage on a real PostgreSQL server, shared by worker processes."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from typer.testing import CliRunner
from helpers import no_channel_steps

from sparsesearch import report, search
from sparsesearch import storage as stores
from sparsesearch.cli import app
from sparsesearch.errors import UserError
from sparsesearch.profiler.table import fingerprint, profile_name
from sparsesearch.train import DenseResult

CPU = torch.device("cpu")

TRIALS_PER_WORKER = 5

# Each worker says "ready" once it has imported sparsesearch and waits for the parent's go, so that
# both open the study (and create its tables) at the same moment: on PostgreSQL the loser of that
# race breaks a unique index, and `storage.open_study` must open the tables the winner made.
_WORKER = """
import sys
import optuna
from sparsesearch.storage import open_study
optuna.logging.set_verbosity(optuna.logging.WARNING)
url, worker, trials = sys.argv[1], sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()
study = open_study("shared", url, create=True)

def objective(trial):
    trial.set_user_attr("worker", worker)
    return trial.suggest_float("x", 0.0, 1.0), 0.0

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


_POPPER = """
import sys
import time
import optuna
from sparsesearch.storage import open_study
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = open_study("q", sys.argv[1], create=False)
ran = []

def objective(trial):
    ran.append(trial.number)
    time.sleep(0.02)
    return trial.suggest_float("x", 0.0, 1.0), 0.0

try:
    study.optimize(objective, n_trials=15)
finally:
    print(" ".join(map(str, ran)))
"""


@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_workers_popping_enqueued_trials_run_each_once(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Enqueued trials (the baselines, a killed worker's retry) are taken by exactly one worker. On
    SQLite, which has no row locks, two workers used to take the same one and both train it."""
    url = {"sqlite": f"sqlite:///{tmp_path / 'q.db'}", "journal": f"journal:///{tmp_path / 'q.log'}"}.get(kind) \
        or request.getfixturevalue("fresh_postgres_db")
    study = stores.open_study("q", url, create=True)
    for i in range(40):
        study.enqueue_trial({"x": i / 40})
    workers = [subprocess.Popen([sys.executable, "-c", _POPPER, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(3)]
    outputs = [w.communicate(timeout=120) for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], [err[-500:] for _, err in outputs]
    ran = [int(n) for out, _ in outputs for n in out.split()]
    assert len(ran) == 45 and len(set(ran)) == 45, Counter(ran).most_common(3)


# --- workers running `sparsesearch optimize` on one study ----------------------------------------

BUDGET = 8


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder holding a latency profile of digits-cnn at 1 thread, where workers started
    with --threads 1 find it: the shipped EPYC one under this machine's name. Measured here, on a
    core shared with other work, it once predicted every filter plan at 0.96-1.00x: the workers
    rejected 900 sampled plans as slower than dense and stopped with 3 of the 8 trained."""
    from helpers import with_fingerprint
    from sparsesearch.profiler.table import SHIPPED_PROFILES

    here = fingerprint(CPU, 1, "float32")
    out = tmp_path_factory.mktemp("project") / "hardware_profiles" / profile_name(here)
    out.parent.mkdir()
    with_fingerprint(SHIPPED_PROFILES / "cpu-amd-epyc-t1-b1-float32.json", out, **here)
    return out.parent.parent


@pytest.fixture(scope="module")
def small_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder holding a coarse latency profile of digits-cnn measured here at 1 thread
    (filter and shape at 0 and 50%, a few timing rounds): workers fit its few rows in 2 s, the
    shipped profile's in 8. Measured on a busy core it may predict no plan faster than dense, which
    only matters to a study that samples plans (see `project`), not to one that trains its baselines."""
    from sparsesearch.profiler.measure import profile_model, target

    out = tmp_path_factory.mktemp("small-project") / "hardware_profiles" / "digits.json"
    out.parent.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting: --threads 1
    try:
        with no_channel_steps():
            profile_model(target("digits-cnn"), CPU, 1, "float32", (0.0, 0.5), ("filter", "shape"), out,
                          timing={"rounds": 3, "warmup_s": 0.0, "min_round_s": 0.001, "max_spread": None,
                                  "max_rounds": 3})
    finally:
        torch.set_num_threads(threads)
    return out.parent.parent


def optimize(project: Path, checkpoint: Path, *options: str) -> subprocess.Popen:
    """`sparsesearch optimize` on digits in `project`, as a worker process: short feasible trials."""
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "sparsesearch"), "optimize", "--study", "s", "--threads", "1",
         "--types", "filter,shape", "--trial-epochs", "1+1", "--max-acc-drop", "20", "--checkpoint", str(checkpoint),
         "--artifacts", str(project / "shared"), *options],
        cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_workers_share_one_postgres_study(small_project: Path, digits_baseline: DenseResult,
                                              fresh_postgres_db: str) -> None:
    """Two `optimize` workers started together on one PostgreSQL study train its budget between them:
    each uniform baseline once (the copies both enqueued are rejected), the control once, the front
    measured once, by the last to finish. Three workers through a kill are the slow
    test_three_workers_share_one_postgres_study_through_a_kill; the default run has its other parts on
    SQLite in test_search.py: a real kill (test_a_trial_whose_worker_was_killed_is_failed_and_retried),
    a killed trial's retry within the budget
    (test_a_trial_waits_for_a_claim_that_fills_the_budget_and_yields_to_the_killed_trials_retry),
    a resume (test_resuming_adds_trials_to_the_same_study)."""
    budget = 3  # the ladder's first three rungs; its 90% rung and the seeds wait for a larger budget
    workers = [optimize(small_project, digits_baseline.checkpoint, "--storage", fresh_postgres_db,
                        "--budget", str(budget)) for _ in range(2)]
    try:
        errors = [w.communicate(timeout=600)[1] for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert [w.returncode for w in workers] == [0, 0], [e[-800:] for e in errors]
    study = optuna.load_study(study_name="s", storage=fresh_postgres_db)
    trials = study.get_trials(False)
    table = [(t.number, t.state.name, t.user_attrs.get("baseline") or t.user_attrs.get("seeded"),
              t.user_attrs.get("rejected"), t.user_attrs.get("worker")) for t in trials]
    trained = [t for t in trials if t.state.is_finished() and "rejected" not in t.user_attrs]
    baselines = sorted(t.user_attrs.get("baseline", "") for t in trained)
    assert baselines == ["filter=0.3", "filter=0.5", "filter=0.7"], table
    assert len({t.user_attrs["worker"] for t in trials if t.state != TrialState.WAITING}) == 2, table  # both took some
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.FAIL)], table
    assert study.user_attrs[search.CONTROL]["seconds"] > 0 and study.user_attrs[search.TRAINING_CONTROL] is None
    measured = study.user_attrs["measured"]
    wanted = {str(t.number) for t in [*report.front(study), *report.baselines(study)]}
    assert wanted and wanted <= set(measured) and len({m["by"] for m in measured.values()}) == 1, measured
    assert study.user_attrs.get(report.MEASURING) is None, "the measuring lease was released"


def kill_a_training_worker(study: Callable[[], optuna.Study], workers: list[subprocess.Popen]) -> int:
    """SIGKILL the worker of the first trial seen training; return that trial's number."""
    pids = {w.pid: w for w in workers}
    deadline, opened = time.monotonic() + 240, None
    while time.monotonic() < deadline and all(w.poll() is None for w in workers):
        try:  # opened once: a poll must be quick, or a loaded machine's short trials all slip between two
            opened = opened or study()
            running = opened.get_trials(False, states=(TrialState.RUNNING,))
        except Exception:  # noqa: BLE001 - no worker has created the study yet
            running = []
        for trial in running:
            pid = int(str(trial.user_attrs.get("worker", ":0")).rpartition(":")[2])
            if "claimed" in trial.user_attrs and pid in pids:
                pids[pid].send_signal(signal.SIGKILL)
                pids[pid].wait()
                return trial.number
        time.sleep(0.2)
    raise AssertionError("no worker was seen training: " + " | ".join(w.stderr.read()[-500:] for w in workers
                                                                        if w.poll() is not None))


def check_shared_study(study: optuna.Study, killed: int) -> None:
    """What many workers with one kill must leave: the budget trained exactly, each baseline once,
    the killed trial failed and its plan retried, nothing running, nothing waiting but the ladder's
    plans enqueued after the budget filled (a larger budget trains them), the front measured."""
    trials = study.get_trials(False)
    trained = [t for t in trials if t.state.is_finished() and t.state != TrialState.FAIL
               and "rejected" not in t.user_attrs]
    assert len(trained) == BUDGET, Counter(str(t.user_attrs.get("rejected")) for t in trials)
    table = [(t.number, t.state.name, t.user_attrs.get("baseline") or t.user_attrs.get("seeded"),
              t.user_attrs.get("rejected"), t.system_attrs.get("failed_trial")) for t in trials]
    baselines = Counter(t.user_attrs["baseline"] for t in trained if "baseline" in t.user_attrs)
    assert set(baselines.values()) == {1}, table  # each once: the ladder's four rungs, and a halfway one if any
    assert {"filter=0.3", "filter=0.5", "filter=0.7", "filter=0.9"} <= set(baselines), table
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [killed]
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retry) == 1 and retry[0].params == trials[killed].params and retry[0].state.is_finished(), table
    assert not [t for t in trials if t.state == TrialState.RUNNING], table
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert all("baseline" in t.user_attrs or "seeded" in t.user_attrs for t in waiting), table  # for a larger budget
    measured = study.user_attrs["measured"]
    wanted = {str(t.number) for t in [*report.front(study), *report.baselines(study)]}
    assert wanted and wanted <= set(measured), (wanted, set(measured))
    assert study.user_attrs.get(report.MEASURING) is None, "the measuring lease was released"


@pytest.mark.slow
def test_three_workers_share_one_postgres_study_through_a_kill(project: Path, digits_baseline: DenseResult,
                                                               fresh_postgres_db: str) -> None:
    """Three `optimize` workers on one PostgreSQL study, one SIGKILLed while training: the others
    finish the budget between them, retry the killed plan, measure the front once; the study resumes.
    Slow (2.5 min on one core): the default run has test_two_workers_share_one_postgres_study and the
    parts it names."""
    stale = ("--stale-after", "3")
    workers = [optimize(project, digits_baseline.checkpoint, "--storage", fresh_postgres_db, "--budget", str(BUDGET),
                        *stale) for _ in range(3)]
    try:
        killed = kill_a_training_worker(lambda: optuna.load_study(study_name="s", storage=fresh_postgres_db), workers)
        outputs = {w.pid: w.communicate(timeout=600) for w in workers if w.returncode is None}
    finally:
        for w in workers:
            w.kill()
    assert [w.returncode for w in workers].count(0) == 2, [o[1][-800:] for o in outputs.values()]
    check_shared_study(optuna.load_study(study_name="s", storage=fresh_postgres_db), killed)
    again = optimize(project, digits_baseline.checkpoint, "--storage", fresh_postgres_db, "--budget", str(BUDGET + 1),
                     *stale)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-800:]
    assert "1 trials trained" in " ".join(out.split()), out


# --- one host, no server: the journal file ---------------------------------------------------------


def _dead_pid() -> int:
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    return ended.pid


def test_a_journal_trial_whose_worker_process_ended_is_failed_and_its_plan_retried(tmp_path: Path) -> None:
    """The journal has no heartbeat: a running trial whose worker process on this host is gone is
    failed at once by the next worker, and its plan enqueued again, once."""
    url = f"journal:///{tmp_path / 'study.log'}"
    study = stores.open_study("j", url, create=True)
    dead = study.ask({"rate": optuna.distributions.FloatDistribution(0.0, 1.0)})
    dead.set_user_attr("worker", f"{socket.gethostname()}:{_dead_pid()}")
    alive = study.ask({"rate": optuna.distributions.FloatDistribution(0.0, 1.0)})
    alive.set_user_attr("worker", stores.worker())
    elsewhere = study.ask({"rate": optuna.distributions.FloatDistribution(0.0, 1.0)})
    elsewhere.set_user_attr("worker", "another-host:1")  # cannot be checked from here: left alone
    reopened = stores.open_study("j", url, create=False)
    assert stores.fail_stale(reopened) == [dead.number]
    states = {t.number: t.state for t in reopened.get_trials(False)}
    assert states[dead.number] == TrialState.FAIL
    assert states[alive.number] == states[elsewhere.number] == TrialState.RUNNING
    retry = [t for t in reopened.get_trials(False) if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING and retry[0].params == dead.params
    assert stores.fail_stale(reopened) == [], "a second worker finds nothing left to fail"


_LEASE = """
import sys
import time
from sparsesearch import storage
study = storage.open_study("l", sys.argv[1], create=False)
time.sleep(float(sys.argv[2]) - time.time())  # both try at the same moment
print("mine" if storage.take_lease(study, "measuring", settle_s=1.0) is None else "theirs")
"""


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_two_workers_taking_the_measuring_lease_at_once_get_it_once(kind: str, tmp_path: Path) -> None:
    url = f"journal:///{tmp_path / 'l.log'}" if kind == "journal" else f"sqlite:///{tmp_path / 'l.db'}"
    stores.open_study("l", url, create=True)
    start = str(time.time() + 3)
    workers = [subprocess.Popen([sys.executable, "-c", _LEASE, url, start], stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    said = sorted(w.communicate(timeout=60)[0].strip() for w in workers)
    assert said == ["mine", "theirs"]


# --- storages that are not there ------------------------------------------------------------------


@pytest.mark.parametrize("url,says", [
    ("postgresql+psycopg2://u@/db", "pip install psycopg2-binary, or write postgresql:// and pip install "
                                    "'sparsesearch[postgres]'"),
    ("redis://localhost:6379", "not a storage sparsesearch supports"),
    ("journal://", "names no file"),
])
def test_a_storage_that_cannot_be_used_is_one_line_naming_the_fix(url: str, says: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["report", "s", "--storage", url])
    assert result.exit_code == 2 and says in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("url", ["sqlite:///typo.db", "journal://typo/study.log"])
def test_reading_a_study_from_a_mistyped_file_creates_nothing(url: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["report", "s", "--storage", url])
    assert result.exit_code == 2 and "no study file at typo" in result.stderr and "check the path" in result.stderr
    assert not list(tmp_path.iterdir()), "no empty database or folder left behind"


# --- trial weights in an S3 bucket -----------------------------------------------------------------


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3 server on a free localhost port, and the environment boto3 reads to reach it."""
    server_module = pytest.importorskip("moto.server", reason="moto[server] is not installed (make setup does)")
    pytest.importorskip("boto3", reason="boto3 is not installed (pip install 'sparsesearch[s3]')")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_trial_weights_round_trip_through_an_s3_bucket(s3_endpoint: str, tmp_path: Path) -> None:
    import boto3

    from sparsesearch.models import create
    from sparsesearch.search import SearchConfig, Trials

    with pytest.raises(UserError, match="cannot reach the bucket of --artifacts s3://trials"):
        stores.artifact_store("s3://trials", check=True)
    boto3.client("s3").create_bucket(Bucket="trials")
    stores.artifact_store("s3://trials", check=True)
    torch.manual_seed(0)
    trials = Trials(SearchConfig(), create("digits-cnn", 10, 1), (1, 8, 8), CPU, "s3://trials")
    study = stores.open_study("w", f"journal:///{tmp_path / 'w.log'}", create=True)
    trial = study.ask()
    trained = trials.fresh_model()
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(0.5)
    trial.set_user_attr("weights", trials.upload(trial, trained))
    study.tell(trial, [1.0, 1.0])
    back = trials.trained(study.trials[0]).state_dict()
    assert all(torch.equal(back[k], v) for k, v in trained.state_dict().items())
    assert not torch.equal(back["0.weight"], trials.model.state_dict()["0.weight"])
