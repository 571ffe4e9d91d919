"""`atdiff compare`'s training children end with it: a SIGTERM to compare (``timeout``, a scheduler) is
passed on to them instead of leaving them training as orphans."""

import os
import signal
import subprocess
import sys
import textwrap
import time

SCRIPT = textwrap.dedent(
    """
    import sys
    from concurrent.futures import ThreadPoolExecutor
    from atdiff.eval.compare import ChildProcesses

    children = ChildProcesses()
    child = [sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(120)"]
    with children.forwarding_sigterm(), ThreadPoolExecutor(max_workers=2) as pool:
        print(sum(pool.map(lambda _: children.call(child), range(2))))
    """
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has ended; only its parent has not reaped it yet
        return stat.read().split(") ")[-1][0] != "Z"


def test_sigterm_reaches_the_children_and_waits_for_them():
    parent = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True)
    pids = [int(parent.stdout.readline()) for _ in range(2)]  # both children started
    assert all(alive(pid) for pid in pids)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids), "a training child outlived compare"
