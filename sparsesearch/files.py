"""Atomic writes: a crash or Ctrl-C mid-write never leaves a truncated checkpoint, profile or sidecar."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import UserError


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it over `path` only if the block succeeds. A
    file-system error names `path`, not the temporary file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make shared studies and profiles private
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sha256(path: Path) -> str:
    """The file's SHA-256, read in blocks: what tells two files apart when names and sizes agree."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def locked(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (a `.NAME.lock` file beside it) for the block, across
    processes on this machine; `on_wait` is called once if another holder makes us wait."""
    import fcntl

    lock = path.parent / f".{path.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_json(path: Path, data: Any) -> None:
    with _replacing(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def torch_save(path: Path, obj: Any) -> None:
    """Serialised in memory, then written: a full disk is then an OSError naming the file, not
    torch's "unexpected pos" from inside its zip writer."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with _replacing(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def save_with(path: Path, writer: Callable[[Path], None]) -> None:
    """Atomic write for formats whose library insists on writing the file itself."""
    with _replacing(path) as tmp:
        writer(tmp)


def read_json(path: Path, what: str) -> Any:
    """Read JSON a user handed us; a missing or corrupt file is a UserError, not a traceback."""
    if not path.is_file():
        raise UserError(f"{what} not found: {path}; check the path")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is not valid JSON ({e}); regenerate it or fix the file") from e
