"""The one exception type for bad user input: the CLI prints its message, not a traceback."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


class UsageError(ValueError):
    """Bad input (config key, path, option value) found before any work; the message names the fix."""


def one_line(message: str) -> str:
    """``message`` with its line breaks and runs of spaces collapsed (library messages often span lines)."""
    return " ".join(message.split())


def os_error_line(err: OSError) -> str:
    """An OSError as one line that names the path: ``cannot write out/x.png: No space left on device``."""
    paths = " -> ".join(os.fspath(p) for p in (err.filename, err.filename2) if p is not None)
    reason = one_line(err.strerror or str(err))
    return f"{paths}: {reason}" if paths else reason


@contextlib.contextmanager
def writing_to(path: str | os.PathLike, fix: str) -> Iterator[None]:
    """Turn an OSError raised while writing under ``path`` (read-only, a file in the way, disk full) into a
    UsageError naming the file, the reason and ``fix``."""
    try:
        yield
    except OSError as err:
        raise UsageError(f"cannot write {os_error_line(err) if err.filename else f'{path}: {err}'}; {fix}") from None
