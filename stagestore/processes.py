"""The child processes of stage attempts and checks.

Each runs in its own process group (so a timeout, or the end of its leader, kills all of it)
with the parent-death signal set (so it dies with a killed runner), and is tracked while it
runs, so that an interrupt can kill every one at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from functools import cache
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess

_live_lock = threading.Lock()
_live: set[subprocess.Popen] = set()
# Set while the runner is being interrupted (or a systemic failure aborts it): no new attempt
# starts, and an attempt whose process we killed is not recorded as the stage's own failure.
stopping = threading.Event()


class Interrupted(Exception):
    """The runner is stopping; the attempt in hand is abandoned, not recorded."""


def kill_all() -> None:
    """Kill every stage process group still running (the runner is being interrupted)."""
    stopping.set()
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@cache
def _child_setup():  # noqa: ANN202
    """A preexec function setting PR_SET_PDEATHSIG on Linux, or None elsewhere.

    The signal fires when the *thread* that forked the child exits; each attempt forks and waits
    in the same worker thread, so the child cannot outlive its waiter.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    pr_set_pdeathsig = 1
    sigkill = int(signal.SIGKILL)

    def setup() -> None:
        prctl(pr_set_pdeathsig, sigkill, 0, 0, 0)

    return setup


def run_group(argv: list[str], *, cwd: os.PathLike[str] | str, env: dict[str, str],
              stdout: IO[bytes], stderr: IO[bytes], timeout: float | None) -> int | None:
    """Run `argv` to its end in a new process group; its exit code (negative: the signal), or
    None when it timed out.  Whatever happens, the whole group is killed once the leader has
    ended: nothing it started outlives it.  Raises `Interrupted` when the runner is stopping,
    before the start or because the process was killed for that; `OSError` if it cannot start.
    """
    import subprocess  # here, not at the top: a run that reuses every stage never needs it

    if stopping.is_set():
        raise Interrupted()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                            stderr=stderr, start_new_session=True, preexec_fn=_child_setup())
    with _live_lock:
        _live.add(proc)
    try:
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait()
            code = None
    finally:
        _kill_group(proc)
        with _live_lock:
            _live.discard(proc)
    if stopping.is_set():
        raise Interrupted()
    return code
