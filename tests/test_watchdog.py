"""The runner's watchdog (stagestore/execution/watchdog.py): the stage groups still listed when
its pipe closes are killed, whole; groups listed as ended are left alone."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import stagestore.execution.watchdog as watchdog
from test_failures import _alive  # a zombie we have not reaped counts as dead


def _wait_dead(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return False


def test_serve_keeps_the_groups_not_yet_ended():
    read_end, write_end = os.pipe()
    os.write(write_end, b"+100\n+200\n-100\n+3")
    os.write(write_end, b"00\nnonsense\n+\n-999\n")
    os.close(write_end)
    try:
        assert watchdog.serve(read_end) == {200, 300}
    finally:
        os.close(read_end)


def test_a_closed_pipe_kills_every_listed_group_and_only_those(tmp_path):
    # Two groups, each a shell with a child `sleep` (the child is what the parent-death signal
    # never reached); one is listed as ended before the pipe closes and must survive.
    groups = [subprocess.Popen(["sh", "-c", "sleep 60 & echo $! > pid; wait"], cwd=tmp_path / d,
                               start_new_session=True)
              for d in ("a", "b") if (tmp_path / d).mkdir() is None]
    keep = None
    guard = subprocess.Popen([sys.executable, "-S", "-E", watchdog.__file__],
                             stdin=subprocess.PIPE, start_new_session=True)
    try:
        for d in ("a", "b"):
            deadline = time.monotonic() + 10
            while not (tmp_path / d / "pid").exists() or not (tmp_path / d / "pid").read_text():
                assert time.monotonic() < deadline
                time.sleep(0.01)
        sleeps = [int((tmp_path / d / "pid").read_text()) for d in ("a", "b")]
        assert guard.stdin is not None
        guard.stdin.write(b"+%d\n+%d\n-%d\n" % (groups[0].pid, groups[1].pid, groups[1].pid))
        guard.stdin.close()  # what the runner's death does
        assert guard.wait(timeout=10) == 0
        assert _wait_dead(sleeps[0]), "the listed group's grandchild survived"
        assert groups[0].wait(timeout=10) < 0
        keep = sleeps[1]
        assert _alive(keep), "a group listed as ended was killed"
    finally:
        for proc in groups:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            proc.wait()
