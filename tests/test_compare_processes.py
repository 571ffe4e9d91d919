"""`atdiff compare`'s training children end with it: a SIGTERM to compare (``timeout``, a scheduler) is
passed on to them instead of leaving them training as orphans, and a SIGKILL, which compare cannot
catch, ends them too (the kernel signals them: ``atdiff.processes``)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

from atdiff.eval.compare import ChildProcesses, last_error

SCRIPT = textwrap.dedent(
    """
    import sys
    from concurrent.futures import ThreadPoolExecutor
    from atdiff.eval.compare import ChildProcesses
    from atdiff.processes import child_environment

    children = ChildProcesses()
    # Each child reports its PID as the name of an empty file: two children writing lines into one
    # pipe could interleave them. It ends with its parent as `atdiff train` does (atdiff.cli.main).
    report = ("from atdiff.processes import end_with_parent; end_with_parent(); import os, sys, time; "
              "open(os.path.join(sys.argv[1], str(os.getpid())), 'x').close(); time.sleep(120)")
    child = [sys.executable, "-c", report, sys.argv[1]]
    with children.forwarding_sigterm(), ThreadPoolExecutor(max_workers=2) as pool:
        print(sum(pool.map(lambda _: children.call(child, env=child_environment()), range(2))))
    """
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has ended; only its parent has not reaped it yet
        return stat.read().split(") ")[-1][0] != "Z"


def started_children(tmp_path) -> tuple[subprocess.Popen, list[int]]:
    parent = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path)])
    deadline = time.monotonic() + 60
    while len(list(tmp_path.iterdir())) < 2 and parent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = [int(p.name) for p in tmp_path.iterdir()]
    assert len(pids) == 2 and all(alive(pid) for pid in pids)  # both children started
    return parent, pids


def test_sigterm_reaches_the_children_and_waits_for_them(tmp_path):
    parent, pids = started_children(tmp_path)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    assert_ended(pids)


def test_the_children_end_when_compare_is_killed(tmp_path):
    parent, pids = started_children(tmp_path)
    parent.kill()  # SIGKILL: no handler runs in compare
    assert parent.wait(timeout=30) == -signal.SIGKILL
    assert_ended(pids)


def assert_ended(pids: list[int]) -> None:
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids), "a training child outlived compare"


def test_a_failed_childs_reason_is_its_last_error_line(tmp_path):
    """compare names why a training stopped: the child's output goes to its log, whose error line is read back."""
    log = tmp_path / "train.log"
    fail = "import sys; sys.stderr.write('train:  50%|#####     | 1/2\\r'); sys.exit('atdiff train: error: data.root: no such folder')"
    assert ChildProcesses().call([sys.executable, "-c", fail], log, echo=False) == 1
    assert last_error(log) == "atdiff train: error: data.root: no such folder"
    crash, start = "raise RuntimeError('CUDA out of memory')", log.stat().st_size
    assert ChildProcesses().call([sys.executable, "-c", crash], log, echo=False) == 1  # appended: a resumed run
    assert last_error(log, start) == "RuntimeError: CUDA out of memory"  # a traceback's last line
