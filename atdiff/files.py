"""Writing files so that a reader (or a kill) never sees half of one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write with any writer; renamed to ``path`` when the block ends,
    so ``path`` holds either its old content or all of the new one. Removed if the block fails (disk full)."""
    partial = path.with_name(f".{path.name}.tmp")
    try:
        yield partial
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)


def write_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as partial:
        partial.write_text(text)
