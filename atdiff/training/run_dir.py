"""The run folder (``training.output_dir``): one run per folder, checked before anything is
written, locked while training, and made a diffusers pipeline folder at the end.

A run folder is marked by its lock file: atdiff writes only into a new or empty folder or one
holding that file, and deletes only what it wrote there (``TEMP_PREFIX`` entries, its own old
checkpoints, the pipeline components it replaces).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UsageError, os_error_line
from ..files import TEMP_PREFIX, read_json_object, remove_temp, temp_path, write_atomic
from ..integrity import LOCK_NAME, MANIFEST, PIPELINE_INDEX, PIPELINE_MODULE, pipeline_components
from ..pipelines import ImageDiffusionPipeline
from .checkpoint import ABANDONED, list_checkpoints
from .tensor_tree import os_errors

STATS = "training_stats.json"
# Errors that mean "the output folder cannot take our files", whichever file hit them.
FULL = (errno.ENOSPC, errno.EDQUOT)
# The folders atdiff train writes into inside a run (tracker logs, sample grids, evals, checkpoints
# moved aside): a link there would take its writes out of the run folder.
SUBFOLDERS = ("logs", "samples", "evals", ABANDONED)


# ------------------------------------------------------------------------------------------------
# Before training
# ------------------------------------------------------------------------------------------------


def check_output_dir(output_dir: Path, resume: str | None) -> None:
    """Refuse, before anything is written, a file, a folder holding something else than an atdiff
    run, and a run that already has checkpoints or a pipeline unless resuming it."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"training.output_dir {output_dir} is a file, not a folder; pass a folder with --output-dir")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (output_dir / LOCK_NAME).exists():
        raise UsageError(
            f"{output_dir} is not empty and holds no atdiff run (no {LOCK_NAME}); atdiff writes only into "
            f"new or empty folders: pass another --output-dir"
        )
    for name in SUBFOLDERS:
        if (output_dir / name).is_symlink():
            raise UsageError(f"{output_dir / name} is a symbolic link; atdiff train writes only into its run folder's own "
                             f"folders: replace the link with a folder, or pass another --output-dir")
    if resume is None:
        taken = [p.name for p in (output_dir / PIPELINE_INDEX, *(p for _, p in list_checkpoints(output_dir))) if p.exists()]
        if taken:
            raise UsageError(
                f"{output_dir} already holds a run ({', '.join(taken[:3])}); continue it with --resume latest "
                f"or pass another --output-dir"
            )


@contextmanager
def run_lock(output_dir: Path) -> Iterator[None]:
    """Hold the run folder for this process: an exclusive lock on its lock file, which the OS releases
    when the process ends however it ends, so a crash or a kill never leaves a stale lock.

    The lock is a POSIX record lock (``lockf``), which belongs to the process: children it forks
    (DataLoader workers) do not inherit it. A ``flock`` belongs to the open file, which forked
    workers share, so a killed run's workers kept its folder locked until they noticed, seconds
    later, and an immediate ``--resume`` was refused. The price of ``lockf``: a process loses the lock
    when it closes any descriptor of the file, so nothing but this function ever opens it."""
    lock = output_dir / LOCK_NAME
    created = not output_dir.exists()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        # The lock file is rewritten with our PID: never through a link (a folder from elsewhere could
        # point it at any of the user's files).
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UsageError(f"{lock} is a symbolic link, not atdiff's lock file; remove it or pass another --output-dir") from None
        raise output_dir_error(output_dir, err) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise UsageError(f"{lock} is not a plain file of its own (a hard link or a device); remove it or pass another --output-dir")
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UsageError(
                f"{output_dir} is in use by another atdiff train (PID {holder}); wait for it to end or pass another --output-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    except BaseException:
        if created:
            remove_unused_run_dir(output_dir)
        raise
    finally:
        os.close(fd)


def remove_unused_run_dir(output_dir: Path) -> None:
    """Remove the run folder this process made when it holds nothing but the lock file: a check that
    needs the model (its classes against the data's) failed before anything was written, and an empty
    run folder would only be in the way. Anything else in it is kept."""
    if [entry.name for entry in output_dir.iterdir()] == [LOCK_NAME]:
        (output_dir / LOCK_NAME).unlink()
        with contextlib.suppress(OSError):  # another process may have just opened its own lock there
            output_dir.rmdir()


def output_dir_error(output_dir: Path, err: OSError) -> UsageError:
    fix = ("free some space, then continue with --resume latest (the checkpoints saved so far are complete)"
           if err.errno in FULL else "pass a writable --output-dir")
    return UsageError(f"cannot write to training.output_dir {output_dir} ({os_error_line(err)}); {fix}")


def is_output_dir_error(output_dir: Path, err: OSError) -> bool:
    """Whether ``err`` (raised while training) is about the output folder rather than, say, the data."""
    if err.errno in FULL:
        return True
    return err.filename is not None and Path(os.path.abspath(err.filename)).is_relative_to(output_dir.absolute())


def prepare_output_dir(output_dir: Path, record: dict[str, str]) -> None:
    """Clear what an atdiff process killed while writing left here (an eval's half-drawn samples too:
    they are of weights the resumed run may not reproduce), and write the run's ``record`` files
    (name -> text: the config in effect, atdiff.training.resume)."""
    for stale in [*output_dir.glob(f"{TEMP_PREFIX}*"), *output_dir.glob(f"evals/{TEMP_PREFIX}*")]:
        remove_temp(stale)
    for name, text in record.items():
        write_atomic(output_dir / name, text)


def read_stats(run_dir: Path) -> dict:
    """``training_stats.json`` ({} when there is none yet). It carries no manifest (it is rewritten with
    each checkpoint), so it is read as any input: anything but a JSON object with a step count is one line."""
    path = run_dir / STATS
    if not path.is_file():
        return {}
    fix = "move it away (the next checkpoint writes a new one, without the wall-clock totals before it)"
    stats = read_json_object(path, fix)
    if type(stats.get("steps", 0)) is not int:
        raise UsageError(f"{path} holds steps={stats['steps']!r}, not a step count; {fix}")
    return stats


def later_run_outputs(output_dir: Path, step: int) -> list[Path]:
    """What the run left at the top of its folder after ``step``: ``training_stats.json`` and the final
    pipeline (its manifest, ``model_index.json``, ``pipeline.py`` and the components it names), when
    the stats are of a later step."""
    stats = output_dir / STATS
    if read_stats(output_dir).get("steps", 0) <= step:
        return []
    try:
        components = pipeline_components(output_dir) if (output_dir / PIPELINE_INDEX).is_file() else []
    except UsageError:  # not a model_index.json atdiff wrote: its components are unknown
        components = []
    outputs = [stats, output_dir / MANIFEST, output_dir / PIPELINE_INDEX, output_dir / f"{PIPELINE_MODULE}.py",
               *(output_dir / name for name in components)]
    return [path for path in outputs if path.exists() and not path.is_symlink()]


# ------------------------------------------------------------------------------------------------
# At the end
# ------------------------------------------------------------------------------------------------


def save_pipeline(output_dir: Path, pipeline: ImageDiffusionPipeline) -> None:
    """Make ``output_dir`` a diffusers pipeline folder. The pipeline, with its manifest, is written
    aside; the old ``model_index.json`` goes first and the new one comes last, after the components
    and the manifest, so whenever the folder has one, every component it names is complete, of the
    same pipeline, and verifies (a folder without one is no pipeline yet)."""
    staging = temp_path(output_dir / "pipeline")
    remove_temp(staging)
    try:
        with os_errors(staging):  # a full disk, as the OSError train() reports
            pipeline.save_pretrained(staging)
    except OSError:
        remove_temp(staging)  # a full disk gets its space back now, not at the next start
        raise
    (output_dir / PIPELINE_INDEX).unlink(missing_ok=True)
    replaced = []
    for entry in staging.iterdir():
        if entry.name == PIPELINE_INDEX:
            continue
        target = output_dir / entry.name
        if target.exists():
            old = temp_path(target)
            remove_temp(old)
            os.replace(target, old)
            replaced.append(old)
        os.replace(entry, target)
    os.replace(staging / PIPELINE_INDEX, output_dir / PIPELINE_INDEX)
    staging.rmdir()
    for old in replaced:
        remove_temp(old)
