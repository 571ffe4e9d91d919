"""Child processes that end with their parent, however the parent ends (``kill -9`` included).

A parent that starts atdiff commands as children (``atdiff compare``'s trainings) sets
``PARENT_PID`` in their environment; ``atdiff.cli.main`` calls ``end_with_parent`` first thing.
On Linux the kernel sends the child SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``),
which ``atdiff train`` answers as a Ctrl-C: a checkpoint after the current step, then exit. The
child sets this up itself rather than in a ``preexec_fn``, which may deadlock in a parent that has
threads (compare starts its children from a thread pool). Elsewhere a daemon thread polls the
parent's PID.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PARENT_PID = "ATDIFF_PARENT_PID"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def child_environment(env: dict | None = None) -> dict:
    """``env`` (default: this process's) with ``PARENT_PID`` naming this process."""
    return {**(os.environ if env is None else env), PARENT_PID: str(os.getpid())}


def end_with_parent() -> None:
    """If started by a parent that set ``PARENT_PID``, get SIGTERM when it dies (see the module docstring)."""
    parent = os.environ.pop(PARENT_PID, None)  # popped: this process's own children are not its parent's
    if parent is None:
        return
    if sys.platform.startswith("linux"):
        # The signal comes when the parent *thread* that started this process ends: compare's pool
        # threads wait for their child, so they outlive it.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    else:
        threading.Thread(target=watch_parent, args=(int(parent),), daemon=True).start()
    if os.getppid() != int(parent):  # it died before the line above: nobody would signal
        os.kill(os.getpid(), signal.SIGTERM)


def watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)
