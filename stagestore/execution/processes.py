"""The child processes of stage attempts and checks.

Each runs in its own process group (so a timeout, or the end of its leader, kills all of it),
is listed with the process's watchdog while it runs (so the whole group dies with a killed
runner: `watchdog.py`), and is tracked while it runs by its run's `StopToken`, so that
stopping the run (an interrupt, a systemic abort) kills every one of that run's at once, and
those of no other run.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess


class Interrupted(Exception):
    """The run is stopping; the attempt in hand is abandoned, not recorded."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread by the handler `handle_signals` installs,
    as Python raises KeyboardInterrupt for SIGINT: not an Exception, so that it unwinds
    everything the same way."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopToken:
    """One run's stop state: once stopped (a signal, a systemic abort, an error that ends the
    run), no new process starts, every process group started under it is killed, and an
    attempt whose process was killed for that is not recorded as the stage's own failure.

    Each run has its own, so that stopping one run leaves the others of the process alone."""

    def __init__(self) -> None:
        self._event = threading.Event()
        # Reentrant: a signal handler (`stop_all`) may run in the main thread while it holds it.
        self._lock = threading.RLock()
        self._live: set[subprocess.Popen] = set()
        self.signum: int | None = None  # the signal that stopped it, if one did

    @property
    def stopped(self) -> bool:
        return self._event.is_set()

    def stop(self, signum: int | None = None) -> None:
        """Stop, and kill every process group still running under this token."""
        with self._lock:
            if not self._event.is_set():
                self.signum = signum
            self._event.set()
            procs = list(self._live)
        for proc in procs:
            _kill_group(proc)

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds, less if the token is stopped meanwhile; whether it is."""
        return self._event.wait(timeout)

    def _add(self, proc: subprocess.Popen) -> bool:
        """Track `proc`; False when the token was stopped first (`stop` did not see it)."""
        with self._lock:
            self._live.add(proc)
            return not self._event.is_set()

    def _discard(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._live.discard(proc)


# The tokens of the runs going on in this process, for the signal handlers only: a signal is
# process-wide, so it stops every run; anything else stops only its own run's token.
_tokens_lock = threading.RLock()  # reentrant, for the signal handler: see StopToken._lock
_tokens: set[StopToken] = set()


@contextmanager
def live(token: StopToken) -> Iterator[StopToken]:
    """Register `token` as a run of this process while the block runs (see `stop_all`)."""
    with _tokens_lock:
        _tokens.add(token)
    try:
        yield token
    finally:
        with _tokens_lock:
            _tokens.discard(token)


def stop_all(signum: int) -> None:
    """Stop every run of this process (a signal arrived): kill all their process groups."""
    with _tokens_lock:
        tokens = list(_tokens)
    for token in tokens:
        token.stop(signum)


@contextmanager
def handle_signals() -> Iterator[None]:
    """While the block runs (the CLI's command), SIGINT, SIGTERM and SIGHUP stop every run of
    the process at once (`stop_all`) and then unwind the main thread: KeyboardInterrupt for
    SIGINT, `Terminated` for the others, raised only once so that a second signal cannot cut
    the unwinding short.  A signal the process was started ignoring (`nohup`) stays ignored.
    Only in the main thread, the one Python runs signal handlers in."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def handler(signum: int, frame: object) -> None:
        nonlocal raised
        stop_all(signum)
        if raised:
            return
        raised = True
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    previous = {}
    for signum, default in ((signal.SIGINT, signal.default_int_handler),
                            (signal.SIGTERM, signal.SIG_DFL), (signal.SIGHUP, signal.SIG_DFL)):
        if signal.getsignal(signum) is default:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _Watchdog:
    """This process's watchdog (`watchdog.py`): started with the first stage process, told of
    every process group as it starts and once it has ended.  A child forked from this process
    (multiprocessing) forgets it and starts its own when it needs one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._proc: subprocess.Popen | None = None
        self._failed = False

    def _start(self) -> int | None:
        import subprocess
        from pathlib import Path

        read_end, write_end = os.pipe()  # both non-inheritable; the read end becomes stdin
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-S", "-E", str(Path(__file__).with_name("watchdog.py"))],
                stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True)
        except OSError:
            os.close(write_end)
            self._failed = True
            return None
        finally:
            os.close(read_end)
        self._fd = write_end
        return write_end

    def ready(self) -> bool:
        """Start the watchdog if it is not running yet; False when it cannot be started."""
        with self._lock:
            if self._fd is None and not self._failed:
                self._start()
            return self._fd is not None

    def _send(self, line: bytes) -> None:
        fd = self._fd
        if fd is not None:
            try:
                os.write(fd, line)  # a few bytes, under PIPE_BUF: one atomic write
            except OSError:
                pass

    def add(self, pgid: int) -> None:
        self._send(b"+%d\n" % pgid)

    def discard(self, pgid: int) -> None:
        self._send(b"-%d\n" % pgid)

    def forget(self) -> None:
        """In a forked child: the parent's watchdog is the parent's."""
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self.__init__()  # type: ignore[misc]


_watchdog = _Watchdog()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_watchdog.forget)


@cache
def _child_setup():  # noqa: ANN202
    """The fallback where no watchdog can be started: a preexec function setting
    PR_SET_PDEATHSIG on Linux (only the direct child then dies with the runner), or None.

    The signal fires when the *thread* that forked the child exits; each attempt forks and waits
    in the same worker thread, so the child cannot outlive its waiter.  A preexec function
    makes Python fork instead of vfork: about 1.2 ms more per process.
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
              stdout: IO[bytes], stderr: IO[bytes], timeout: float | None,
              stop: StopToken) -> int | None:
    """Run `argv` to its end in a new process group; its exit code (negative: the signal), or
    None when it timed out.  Whatever happens, the whole group is killed once the leader has
    ended: nothing it started outlives it.  Raises `Interrupted` when `stop` is stopped, before
    the start or because the process was killed for that; `OSError` if it cannot start.
    """
    import subprocess  # here, not at the top: a run that reuses every stage never needs it

    if stop.stopped:
        raise Interrupted()
    # The watchdog is started (once) before the stage, so that a stage never runs unguarded
    # for want of one; without it, the parent-death signal guards the direct child.
    guarded = _watchdog.ready()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                            stderr=stderr, start_new_session=True,
                            preexec_fn=None if guarded else _child_setup())
    if guarded:
        _watchdog.add(proc.pid)
    try:
        if not stop._add(proc):  # stopped while it started: `stop` could not kill it
            _kill_group(proc)
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait()
            code = None
    finally:
        _kill_group(proc)
        stop._discard(proc)
        if guarded:
            _watchdog.discard(proc.pid)
    if stop.stopped:
        raise Interrupted()
    return code
