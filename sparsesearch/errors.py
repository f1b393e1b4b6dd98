"""The one exception a user is meant to see: a problem and its fix, printed as one line by the CLI."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user: unknown name, missing data, mismatched checkpoint, absent GPU."""


class Diverged(UserError):
    """Training whose loss stopped being a number: nothing it would write is worth keeping."""


class Busy(UserError):
    """Another worker is doing what this one asked for (measuring a study's front)."""


def brief(e: BaseException, width: int = 120) -> str:
    """An exception as one short line: its type and the first line of its message (if any)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:width]}" if lines else type(e).__name__


def unknown(what: str, name: str, known: Iterable[str], hint: str) -> UserError:
    """An 'unknown X' error that lists the closest known names, so a typo fixes itself."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    suggestion = f"did you mean {', '.join(close)}? " if close else ""
    return UserError(f"unknown {what} '{name}': {suggestion}{hint}")
