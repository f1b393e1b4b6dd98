"""A throwaway PostgreSQL server for the tests that share one Optuna study between processes.

One cluster per test session, in a temporary folder under /tmp, reached only through a unix
socket in that folder (no TCP port to collide with another server), with trust authentication
and without fsync. Where the server or psycopg is missing, or the server does not start, the
tests that ask for it skip and say what to install. Outside pytest (bench/scale.py),
`throwaway_cluster()` is the same server as a context manager, raising `Unavailable` with that
reason instead of skipping.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SUPERUSER = "postgres"
PORT = 5432  # names the socket file only; the socket folder is ours alone
SETTINGS = f"""
listen_addresses = ''
port = {PORT}
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 16MB
"""


class Unavailable(Exception):
    """No throwaway server here; the message says why and what to install."""


@dataclass(frozen=True)
class Cluster:
    """A running cluster, reached as its superuser through the socket in `socket_dir`."""

    socket_dir: Path

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of `database` (SQLAlchemy maps postgresql:// to psycopg 3)."""
        return f"postgresql://{SUPERUSER}@/{database}?host={self.socket_dir}&port={PORT}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(host=str(self.socket_dir), port=PORT, user=SUPERUSER, dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def server_binaries() -> tuple[Path, Path] | None:
    """initdb and pg_ctl: from PATH, else from the newest /usr/lib/postgresql/VERSION/bin (Debian
    keeps them off PATH)."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(initdb), Path(pg_ctl)
    versions = [d for d in Path("/usr/lib/postgresql").glob("*/bin")
                if (d / "initdb").is_file() and (d / "pg_ctl").is_file()]
    if not versions:
        return None
    newest = max(versions, key=lambda d: tuple(int(p) for p in d.parent.name.split(".") if p.isdigit()))
    return newest / "initdb", newest / "pg_ctl"


def _runner() -> list[str]:
    """The command prefix that runs the server's tools: initdb refuses root, so as root they run as
    the unprivileged user Debian's postgresql package creates."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise Unavailable(f"running as root needs the '{SUPERUSER}' system user to own the test server "
                          "(make setup installs Debian's postgresql, which creates it)") from None
    if shutil.which("runuser"):
        return ["runuser", "-u", SUPERUSER, "--"]
    return ["setpriv", f"--reuid={SUPERUSER}", f"--regid={SUPERUSER}", "--init-groups", "--"]


def _run(tool: Path, command: list[str], cwd: Path, log: Path | None = None) -> None:
    """Run `command` (a server tool, maybe behind the runner); if it fails, raise Unavailable with its
    last word, read from `log` where the tool writes there (pg_ctl only says "Examine the log output")."""
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        text = log.read_text(errors="replace") if log and log.is_file() else done.stderr + done.stdout
        last = (text.strip().splitlines() or [f"exit status {done.returncode}"])[-1].strip()
        raise Unavailable(f"PostgreSQL test server did not start ({tool.name}: {last})")


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[Cluster]:
    """A PostgreSQL cluster in a new /tmp folder, stopped and deleted on leaving; Unavailable if it
    cannot start here."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise Unavailable("psycopg is not installed (pip install -e '.[postgres]'; make setup does)") from None
    binaries = server_binaries()
    if binaries is None:
        raise Unavailable("PostgreSQL server not installed: no initdb/pg_ctl in PATH or /usr/lib/postgresql/*/bin "
                          "(make setup installs Debian's postgresql as root)")
    initdb, pg_ctl = binaries
    runner = _runner()
    # /tmp, not pytest's tmp_path: the socket path must stay under ~107 bytes, and as root the
    # postgres user must be able to reach the folder.
    root = Path(tempfile.mkdtemp(prefix="sparsesearch-pg-", dir="/tmp"))
    data = root / "data"
    started = False
    try:
        if runner:
            shutil.chown(root, user=SUPERUSER)
        _run(initdb, [*runner, str(initdb), "-D", str(data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
                      "--locale=C", "--no-sync"], root)
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(SETTINGS + f"unix_socket_directories = '{root}'\n")
        started = True  # a failed start may still leave a server behind; stopping it is harmless
        log = root / "server.log"
        _run(pg_ctl, [*runner, str(pg_ctl), "-D", str(data), "-l", str(log), "-w", "-t", "30", "start"], root, log)
        yield Cluster(root)
    finally:
        if started:
            subprocess.run([*runner, str(pg_ctl), "-D", str(data), "-m", "immediate", "stop"], cwd=root,
                           capture_output=True, timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    """A PostgreSQL cluster started for this test session, stopped and deleted at its end."""
    with contextlib.ExitStack() as stack:
        try:
            cluster = stack.enter_context(throwaway_cluster())
        except Unavailable as e:
            pytest.skip(str(e))
        yield cluster


@pytest.fixture(scope="session")
def postgres_url(postgres_cluster: Cluster) -> str:
    """The URL of a database shared by the whole session."""
    return postgres_cluster.create_database("sparsesearch")


@pytest.fixture
def fresh_postgres_db(postgres_cluster: Cluster) -> str:
    """The URL of a new, empty database for one test, so tests never see each other's studies. It is
    not dropped: a test's workers may still hold connections, and the cluster goes at session end."""
    return postgres_cluster.create_database(f"test_{uuid.uuid4().hex[:12]}")
