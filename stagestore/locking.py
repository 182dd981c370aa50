"""Locks between stagestore processes on one store.

Two kinds:

* The **store lock** (`locks/store.db`, filelock's SQLite-backed `ReadWriteLock`): every run,
  recover and verify holds it shared for its whole duration; `gc` holds it exclusive.  So gc
  never runs while a run may be between writing objects and writing the manifest that names
  them, and a run never looks up an object gc is about to delete.
* **Owner locks** (`locks/<owner>.lock`, `flock(2)`): a run holds `run-<run_id>.lock` exclusive
  while it works.  Every temp entry in `tmp/` is named after its owner, so "an orphaned temp" is
  exactly "a temp whose owner lock can be taken".  The kernel releases both kinds when a
  process dies, however it dies (SIGKILL included), so no lock is ever stale.

Lock files are never deleted while the store is in use: deleting a lock file someone is waiting
on lets two processes each lock a different inode under the same name.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import RunBusyError
from .layout import StoreLayout


class OwnerLock:
    """An exclusive `flock` on `locks/<owner>.lock`, held until `release()`."""

    def __init__(self, layout: StoreLayout, owner: str) -> None:
        self.owner = owner
        self.path = layout.owner_lock_path(owner)
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None


@contextmanager
def owner_locked(layout: StoreLayout, owner: str, what: str) -> Iterator[OwnerLock]:
    """Hold an owner lock, or raise `RunBusyError` naming `what` if a live process has it."""
    lock = OwnerLock(layout, owner)
    if not lock.try_acquire():
        raise RunBusyError(f"{what} is in use by another live stagestore process",
                           hint="wait for it to finish, or choose another run id")
    try:
        yield lock
    finally:
        lock.release()


def owner_is_live(layout: StoreLayout, owner: str) -> bool:
    """Whether some process (this one included) holds `owner`'s lock right now."""
    if not layout.owner_lock_path(owner).exists():
        return False
    probe = OwnerLock(layout, owner)
    if probe.try_acquire():
        probe.release()
        return False
    return True


@contextmanager
def store_lock(layout: StoreLayout, *, exclusive: bool, timeout: float = -1) -> Iterator[None]:
    """Hold the store lock shared (runs, recover, verify) or exclusive (gc)."""
    from filelock import ReadWriteLock, Timeout  # imported here: it pulls in sqlite3

    lock = ReadWriteLock(os.fspath(layout.store_lock), timeout=timeout, is_singleton=False)
    try:
        acquire = lock.write_lock if exclusive else lock.read_lock
        with acquire():
            yield
    except Timeout:
        raise RunBusyError(
            "the store is locked by another stagestore process "
            + ("(a run, recover or verify)" if exclusive else "(gc)"),
            hint="wait for it to finish and try again") from None
