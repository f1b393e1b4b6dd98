"""Where a study lives: its Optuna storage, and the store that keeps its trials' weights.

Storages, by URL (`--storage`):
- `sqlite:///studies/NAME/study.db`, the default: embedded and resumable; processes on one host share it.
- `postgresql://USER@HOST/DB` (psycopg 3: `pip install 'sparsesearch[postgres]'`), or any SQLAlchemy
  URL Optuna's RDBStorage takes: many workers on many machines, one server.
- `journal:///PATH`: Optuna's journal file, for many processes on one host without a database.

A running trial proves its worker alive. RDB storages beat Optuna's heartbeat; the journal, which
has none, records the worker's host and process id. Either way, the next worker to start a trial
fails one whose worker is gone (silent for `grace_s`, or its process no longer exists) and enqueues
its plan again, once. A lease in the study (`take_lease`) lets one worker at a time do a job for
the whole study: measuring its front.

Trial weights go to an artifact store: a folder (default `studies/NAME/artifacts`; for workers on
several machines, one they all mount, given with `--artifacts DIR`) or an S3 bucket, `s3://BUCKET`
(boto3, which reads `AWS_ENDPOINT_URL` and credentials from the environment).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from .errors import UserError, brief

STUDIES_DIR = Path("studies")
HEARTBEAT_S = 30  # a running trial's worker says it is alive this often
GRACE_S = 120  # silent this long (killed, machine lost): the trial is failed and run once more
JOURNAL = "journal://"
OBJECTIVES = ("val_acc", "predicted_speedup")  # both maximised; named so Optuna's tools label them
# a missing driver module -> how to install it
_DRIVERS = {"psycopg": "pip install 'sparsesearch[postgres]'",
            "psycopg2": "pip install psycopg2-binary, or write postgresql:// and pip install 'sparsesearch[postgres]'"}


def study_dir(name: str) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*", name):
        raise UserError(f"study name '{name}' must be letters, digits, '.', '_' or '-' (it names a folder)")
    return STUDIES_DIR / name


def storage_url(name: str, storage: str | None) -> str:
    return storage or f"sqlite:///{study_dir(name) / 'study.db'}"


def worker() -> str:
    """This process, as the trials it runs record it: `host:pid`."""
    return f"{socket.gethostname()}:{os.getpid()}"


def open_study(name: str, storage: str | None, create: bool, sampler: optuna.samplers.BaseSampler | None = None,
               pruner: optuna.pruners.BasePruner | None = None, grace_s: int = GRACE_S) -> optuna.Study:
    """The study NAME in `storage` (default SQLite under studies/NAME/); created if `create`."""
    url = storage_url(name, storage)
    if storage is None and not create and not (study_dir(name) / "study.db").is_file():
        known = sorted(p.name for p in STUDIES_DIR.glob("*") if (p / "study.db").is_file())
        raise UserError(f"no study '{name}' under {STUDIES_DIR}/ (studies: {', '.join(known) or 'none'}); "
                        f"run `sparsesearch optimize --study {name}` first, or pass --storage URL")
    if storage is not None and not create and (file := _local_file(url)) is not None and not file.is_file():
        raise UserError(f"no study file at {file} (--storage {url}); check the path")  # never leave an empty one
    if storage is None:
        study_dir(name).mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            backend = _storage(url, grace_s)
            if not create:
                return optuna.load_study(study_name=name, storage=backend, sampler=sampler, pruner=pruner)
            study = optuna.create_study(study_name=name, storage=backend, directions=["maximize"] * len(OBJECTIVES),
                                        sampler=sampler, pruner=pruner, load_if_exists=True)
            if study.metric_names is None:
                study.set_metric_names(list(OBJECTIVES))
            return study
    except KeyError:
        raise UserError(f"storage {url} holds no study '{name}'; check the study's name, or run `sparsesearch "
                        f"optimize --study {name}` to create it") from None
    except ImportError as e:  # Optuna re-raises the driver's ModuleNotFoundError as its own ImportError
        missing = next((c.name for c in (e, e.__cause__, e.__context__) if isinstance(c, ModuleNotFoundError)), None)
        if missing is None:
            raise UserError(storage_problem(url, e)) from e
        fix = _DRIVERS.get(missing.split(".")[0], f"install the Python package {missing}")
        raise UserError(f"the driver for {url.split(':', 1)[0]} storage is not installed ({missing}); {fix}") from None
    except _storage_errors() as e:
        raise UserError(storage_problem(url, e)) from e


def _local_file(url: str) -> Path | None:
    """The file a SQLite or journal URL names; None for a server's, or where it names none."""
    prefix = next((p for p in ("sqlite:///", JOURNAL) if url.startswith(p)), None)
    return Path(url[len(prefix):]) if prefix and url[len(prefix):] else None


def _storage(url: str, grace_s: int) -> BaseStorage:
    if url.startswith(JOURNAL):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len(JOURNAL):])
        if not path.name:
            raise UserError(f"--storage {url} names no file; write journal:///PATH/study.log")
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    scheme = url.split(":", 1)[0].split("+")[0]
    if "://" not in url or scheme in ("redis", "rediss", "file", "http", "https"):
        raise UserError(f"--storage {url} is not a storage sparsesearch supports: use sqlite:///PATH, "
                        "postgresql://USER@HOST/DB (or another SQLAlchemy URL), or journal:///PATH")
    return _rdb_storage(url, grace_s)


def _rdb_storage(url: str, grace_s: int) -> optuna.storages.RDBStorage:
    """The storage at `url`, with heartbeats. Workers started together race to create its tables;
    the loser finds a table or type already there (an integrity error, or "already exists" from
    PostgreSQL and SQLite) and simply opens them again."""
    import sqlalchemy.exc

    sqlite = url.startswith("sqlite")

    def make() -> optuna.storages.RDBStorage:
        storage = optuna.storages.RDBStorage(
            url, heartbeat_interval=min(HEARTBEAT_S, grace_s), grace_period=grace_s,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
            engine_kwargs={"connect_args": {"timeout": 60}} if sqlite else None)
        if sqlite:
            _serialise(storage.engine)
        return storage

    for delay in (0.2, 0.4, 0.8, 1.6):
        try:
            return make()
        except sqlalchemy.exc.IntegrityError:
            pass
        except (sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError) as e:
            if "already exists" not in str(e):  # SQLite says it as an operational error
                raise
        time.sleep(delay)
    return make()


def _serialise(engine: Any) -> None:
    """Make every SQLite transaction take the write lock when it begins. SQLite has no row locks: two
    workers popping the same waiting trial (a baseline, a retry) both read it WAITING, both mark it
    RUNNING and both train it, and the second to finish fails ("Cannot tell a COMPLETE trial").
    Begun IMMEDIATE, the second transaction waits for the first and reads RUNNING."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver's own BEGIN would come first

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made while opening the storage predate the listeners


def _storage_errors() -> tuple[type[BaseException], ...]:
    import sqlalchemy.exc

    return (sqlalchemy.exc.SQLAlchemyError, OSError)


def failed_mid_run(e: BaseException) -> str | None:
    """A storage that failed under a running command (a full disk, a lost server), as one line
    saying what to do; None if `e` is not such a failure."""
    chain = [e]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 8:
        chain.append(cause)
    ours = [c for c in chain if isinstance(c, optuna.exceptions.StorageInternalError)
            or type(c).__module__.startswith(("sqlalchemy", "optuna.storages"))]
    if not ours:
        return None
    text = brief(ours[-1], 160)  # the innermost says what happened: "database or disk is full"
    if _damaged(text):
        return f"the study's file is damaged ({text}); restore it from a backup"
    if "full" in text or "No space" in text:
        fix = "free space on its disk"
    elif "readonly" in text or "read-only" in text:
        fix = "make its folder writable"
    else:
        fix = "check its server and the network"
    return f"the study storage failed ({text}); {fix}, then run the same command: finished trials are kept"


def _damaged(text: str) -> bool:
    """Whether SQLite's error says its file is damaged ("database disk image is malformed", "file is
    not a database")."""
    return "malformed" in text or "not a database" in text


def storage_problem(url: str, e: BaseException) -> str:
    text = brief(e, 160)
    if "locked" in text:
        return f"study storage {url} is locked by another process; wait for it to finish or use another --study"
    if "disk is full" in text or "readonly" in text or "No space" in text:
        return f"cannot write study storage {url} ({text}); free space on its disk or pick a folder you can write"
    if _damaged(text):
        return f"study storage {url} is damaged ({text}); restore its file from a backup"
    return f"cannot open study storage {url} ({text}); check the --storage URL, its server and its driver"


def discard_if_unused(study: optuna.Study, storage: str | None) -> None:
    """Delete a study that a refused run created and never set up, so it does not linger in the
    study list; with the default SQLite storage its folder goes too, if nothing else is in it."""
    if "config" in study.user_attrs or study.get_trials(deepcopy=False):
        return
    optuna.delete_study(study_name=study.study_name, storage=study._storage)
    folder = study_dir(study.study_name)
    if storage is None and {p.name for p in folder.iterdir()} <= {"study.db"}:
        shutil.rmtree(folder)


def fail_stale(study: optuna.Study, heartbeat: bool = True) -> list[int]:
    """Fail the running trials whose worker is gone, and enqueue each one's plan again (once);
    return their numbers. Heartbeat storages judge by the heartbeat (unless `heartbeat` is false:
    before a trial, Optuna has just done it); the others by the process id a trial's worker
    recorded, for workers on this host."""
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    running = study.get_trials(False, states=(TrialState.RUNNING,))
    with warnings.catch_warnings():  # Optuna 5 calls both experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if isinstance(study._storage, BaseHeartbeat) and is_heartbeat_enabled(study._storage):
            if not heartbeat:
                return []
            optuna.storages.fail_stale_trials(study)
            now = {t.number: t.state for t in study.get_trials(False)}
            return [t.number for t in running if now[t.number] == TrialState.FAIL]
        failed = [t for t in running if gone(str(t.user_attrs.get("worker", ""))) and _fail(study, t)]
        for trial in failed:
            RetryHeartbeatStaleTrialCallback(max_retry=1)(study, study._storage.get_trial(trial._trial_id))
    return [t.number for t in failed]


def _fail(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Mark `trial` failed; False if another worker finished or failed it first."""
    try:
        return study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def gone(who: str) -> bool:
    """Whether the worker `host:pid` is known to have ended: only a process on this host can be checked."""
    host, _, pid = who.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


# --- leases ---------------------------------------------------------------------------------------

LEASE_S = 900  # a lease not renewed this long is free again (its holder died without releasing it)


def take_lease(study: optuna.Study, key: str, settle_s: float = 1.0) -> str | None:
    """Take the study-wide lease `key` (e.g. measuring the front) for this worker; return None if it
    is ours, or the worker holding it. Workers taking it at once each write, wait `settle_s`, and
    read back: the last write wins, and only its writer goes on."""
    held = study.user_attrs.get(key)
    if held_elsewhere(held):
        return held["by"]
    renew_lease(study, key)
    time.sleep(settle_s)
    holder = (study.user_attrs.get(key) or {}).get("by")
    return None if holder == worker() else holder


def held_elsewhere(lease: dict[str, Any] | None) -> bool:
    """Whether a lease (a study attr's value) is held by another worker that is still alive: renewed
    within LEASE_S, and its process not known to have ended."""
    return bool(lease and lease.get("by") != worker() and time.time() - lease.get("at", 0) < LEASE_S
                and not gone(lease["by"]))


def renew_lease(study: optuna.Study, key: str) -> None:
    study.set_user_attr(key, {"by": worker(), "at": time.time()})


def release_lease(study: optuna.Study, key: str) -> None:
    if (study.user_attrs.get(key) or {}).get("by") == worker():
        study.set_user_attr(key, None)


# --- artifacts ------------------------------------------------------------------------------------


def artifacts_location(study: optuna.Study, given: str | None) -> str:
    """Where the study's trial weights are: `given` (--artifacts), else where its workers wrote them,
    else `studies/NAME/artifacts`. A folder is kept absolute, so every worker and command finds it."""
    if given:
        return given if "://" in given else str(Path(given).resolve())
    return study.user_attrs.get("artifacts") or str(study_dir(study.study_name) / "artifacts")


def shared(url: str) -> bool:
    """Whether workers on other machines can reach the storage at `url` (a database server)."""
    return not (url.startswith(JOURNAL) or url.startswith("sqlite"))


def artifact_store(location: str | Path, check: bool = False) -> Any:
    """The Optuna artifact store at `location`: a folder, or `s3://BUCKET`; with `check`, one that
    is not there or cannot be reached is a UserError now rather than a failed trial later."""
    location = str(location)
    if location.startswith("s3://"):
        bucket = location[len("s3://"):].strip("/")
        if not bucket or "/" in bucket:
            raise UserError(f"--artifacts {location}: give a bucket, s3://BUCKET (no prefix)")
        try:
            import boto3
            from optuna.artifacts import Boto3ArtifactStore
        except ModuleNotFoundError as e:
            raise UserError(f"--artifacts {location} needs boto3 ({e.name} is missing); "
                            "pip install 'sparsesearch[s3]'") from None
        client = boto3.client("s3")
        if check:
            try:
                client.head_bucket(Bucket=bucket)
            except Exception as e:  # noqa: BLE001 - botocore's errors: no bucket, no credentials, no network
                raise UserError(f"cannot reach the bucket of --artifacts {location} ({brief(e)}); create it, or "
                                "check AWS_ENDPOINT_URL and the credentials") from None
        return Boto3ArtifactStore(bucket, client)
    if "://" in location:
        raise UserError(f"--artifacts {location}: give a folder every worker can reach, or s3://BUCKET")
    from optuna.artifacts import FileSystemArtifactStore

    if not check:  # made when the first weights arrive: a refused run leaves no empty folder behind
        Path(location).mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(location)
