"""Where atdiff keeps its caches, and writing files so that a reader (or a kill) never sees half of one.

Everything atdiff writes on the way to its final name carries ``TEMP_PREFIX``, so that what a
killed process left behind can be recognised, and removed, without touching anyone else's files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import UsageError

TEMP_PREFIX = ".atdiff-tmp-"


def cache_dir() -> Path:
    """Root of atdiff's caches (Inception weights, FID statistics, latent stores): ``$ATDIFF_CACHE``,
    else ``~/.cache/atdiff``."""
    return Path(os.environ.get("ATDIFF_CACHE") or Path.home() / ".cache" / "atdiff")


def check_writable(out: Path) -> None:
    """Refuse an ``--out`` that cannot be created: under a file, or in a folder that is not writable."""
    parent = next(p for p in [out, *out.parents] if p.exists())
    if not parent.is_dir():
        raise UsageError(f"--out {out}: {parent} is a file, not a folder; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {parent} is not writable (read-only or no permission); choose another --out")


def temp_path(path: Path, shared: bool = False) -> Path:
    """The temporary sibling ``path`` is written as before it is renamed into place. In a folder that
    several processes write at once (``shared``: the FID cache, filled by parallel trainings' evals)
    it carries the process id, so that no writer removes or renames another's half-written file."""
    return path.with_name(f"{TEMP_PREFIX}{f'{os.getpid()}-' if shared else ''}{path.name}")


@contextlib.contextmanager
def atomic_path(path: Path, shared: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write with any writer, a file or a folder (``save_pretrained``);
    renamed to ``path`` when the block ends, so ``path`` holds either its old content or all of the new
    one. Removed if the block fails (disk full), and first if a killed attempt left it."""
    partial = temp_path(path, shared)
    remove_temp(partial)
    try:
        yield partial
        os.replace(partial, path)  # fails too when a folder has the name
    except BaseException:
        remove_temp(partial)
        raise


def remove_temp(partial: Path) -> None:
    """Remove an entry atdiff wrote: a file or a folder, or a link in its place (never what the link points to)."""
    if partial.is_dir() and not partial.is_symlink():
        shutil.rmtree(partial)
    else:
        partial.unlink(missing_ok=True)


def write_atomic(path: Path, text: str, shared: bool = False) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and a rename (``shared``: see ``temp_path``)."""
    with atomic_path(path, shared) as partial:
        partial.write_text(text)


def read_json_object(path: Path, fix: str) -> dict:
    """A JSON file that must hold an object, read as untrusted input (it carries no manifest): anything
    else is a UsageError naming the file, the problem and ``fix``."""
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path} is not readable JSON ({err}); {fix}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} holds a JSON {type(value).__name__}, not an object; {fix}")
    return value


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
