"""Locks between stagestore processes on one store.

Two kinds:

* The **store lock** (`locks/store.lock` and `locks/store.gate`, `flock(2)` shared/exclusive,
  a waiting exclusive holder first): every run, recover and verify holds it shared for its
  whole duration; `gc` holds it exclusive.  So gc
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
import time
from collections.abc import Iterator
from contextlib import contextmanager

import msgspec

from ..errors import RunBusyError
from .layout import FORMAT_VERSION, StoreLayout


class OwnerLock:
    """An exclusive `flock` on `locks/<owner>.lock`, held until `release()`."""

    def __init__(self, layout: StoreLayout, owner: str) -> None:
        self.owner = owner
        self.path = layout.owner_lock_path(owner)
        self._fd: int | None = None

    def try_acquire(self, wait: bool = False) -> bool:
        """Take the lock; False when another holder has it (with `wait`, wait for it instead)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
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
    """Whether some process (this one included) holds `owner`'s lock right now.

    A pure probe: the lock file is opened without `O_CREAT` (a missing one has no holder), so
    probing writes nothing (`doctor` is read-only) and cannot bring back a lock file that `gc`
    has just removed."""
    path = layout.owner_lock_path(owner)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except PermissionError:  # a store we may only read; a local flock needs no write access
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)  # closing lets go of the flock
    return False


@contextmanager
def store_lock(layout: StoreLayout, *, exclusive: bool, timeout: float = -1) -> Iterator[None]:
    """Hold the store lock shared (runs, recover, verify, forget) or exclusive (gc).

    Two `flock(2)` files: `locks/store.lock` carries the hold itself, and `locks/store.gate`
    gives a waiting exclusive holder priority.  A shared holder passes the gate (a shared
    `flock`, let go at once) before it takes its shared hold; an exclusive holder keeps the gate
    exclusive while it waits for the shared holders to leave and while it works.  So a waiting
    `gc` holds off runs started after it, and a stream of runs cannot starve it.

    `timeout` is in seconds; -1 waits without limit.  Raises `RunBusyError` when it runs out.
    A format-1 store is upgraded to format 2 first (`upgrade_store_lock`), and a format-2 or
    format-3 store to this stagestore's format (`upgrade_format`).
    """
    if layout.format_version < 2:
        upgrade_store_lock(layout)
    if layout.format_version < FORMAT_VERSION:
        upgrade_format(layout)
    gate = _open_lock_file(layout.store_gate)
    hold: int | None = None
    try:
        deadline = None if timeout < 0 else time.monotonic() + timeout
        _flock(gate, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, deadline, exclusive)
        hold = _open_lock_file(layout.store_lock)
        _flock(hold, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, deadline, exclusive)
        if not exclusive:
            os.close(gate)  # closing lets go of the flock
            gate = None
        yield
    finally:
        for fd in (hold, gate):
            if fd is not None:
                os.close(fd)


def _open_lock_file(path: os.PathLike[str]) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


_POLL_FIRST, _POLL_MAX = 0.005, 0.1  # seconds between tries when a timeout is set


def _flock(fd: int, operation: int, deadline: float | None, exclusive: bool) -> None:
    """`flock(fd, operation)`, blocking until `deadline` (None: no limit)."""
    if deadline is None:
        fcntl.flock(fd, operation)
        return
    pause = _POLL_FIRST
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
        left = deadline - time.monotonic()
        if left <= 0:
            raise RunBusyError(
                "the store is locked by another stagestore process "
                + ("(a run, recover or verify)" if exclusive else "(gc)"),
                hint="wait for it to finish and try again")
        time.sleep(min(pause, left))
        pause = min(pause * 2, _POLL_MAX)


LEGACY_LOCK_WAIT = 2.0  # seconds: another new process holds format 1's lock only to upgrade


def upgrade_store_lock(layout: StoreLayout) -> None:
    """Move a format-1 store to format 2, whose store lock is `flock` instead of SQLite.

    Under format 1's own lock held exclusive (filelock's SQLite `ReadWriteLock`, imported only
    here), no format-1 process is running, recovering, verifying or collecting in the store;
    once `stagestore.json` says version 2, every format-1 stagestore refuses the store, so the
    two kinds of lock are never relied on at once.  Raises `RunBusyError` when a format-1
    process holds the old lock.
    """
    from filelock import ReadWriteLock, Timeout

    from . import durable
    from ..model.records import STORE_FORMAT_DECODER, StoreFormat

    legacy = ReadWriteLock(os.fspath(layout.legacy_store_lock), timeout=LEGACY_LOCK_WAIT,
                           is_singleton=False)
    try:
        with legacy.write_lock(), owner_locked(layout, "init", "the store's format file"):
            current = STORE_FORMAT_DECODER.decode(layout.format_file.read_bytes())
            if current.version < 2:
                durable.write_file_atomic(
                    layout.format_file,
                    msgspec.json.encode(StoreFormat(version=2)) + b"\n",
                    layout.new_tmp_path("init", "format"))
    except Timeout:
        raise RunBusyError(
            f"store {layout.root} is in use by an older stagestore (store format 1); its store "
            "lock is upgraded to format 2 once no such process is running",
            hint="wait for that process to finish, then try again") from None
    layout.format_version = 2


def upgrade_format(layout: StoreLayout) -> None:
    """Move a format-2 or format-3 store to `FORMAT_VERSION` (docs/format.md, "Versions and
    changes").  Format 3: runs record their items in an item log, folders are trees of trees,
    the stat cache is one record per folder, and trees have shared views.  Format 4: item
    stages defer their fsyncs to the item log's group commit, guarded by `unsynced` markers
    that an older stagestore would not honour.  Nothing is rewritten: `stat-cache.json` is
    deleted (derived, format 2 only) and the format file says the new version.

    Under the store lock held exclusive (every format takes the same `flock`), no older
    process is running, recovering, verifying, forgetting or collecting in the store; once
    `stagestore.json` says the new version, every older stagestore refuses the store, so none
    can misread a run's item log (a format-2 `gc` would take its objects for garbage) or trust
    an object a power loss damaged.  Raises `RunBusyError` when an older process holds the
    store lock past `LEGACY_LOCK_WAIT`.
    """
    from . import durable
    from ..model.records import STORE_FORMAT_DECODER, StoreFormat

    def on_disk() -> int:
        return STORE_FORMAT_DECODER.decode(layout.format_file.read_bytes()).version

    if (version := on_disk()) >= FORMAT_VERSION:  # another process upgraded it meanwhile
        layout.format_version = version
        return
    gate = _open_lock_file(layout.store_gate)
    hold: int | None = None
    try:
        deadline = time.monotonic() + LEGACY_LOCK_WAIT
        try:
            _flock(gate, fcntl.LOCK_EX, deadline, True)
            hold = _open_lock_file(layout.store_lock)
            _flock(hold, fcntl.LOCK_EX, deadline, True)
        except RunBusyError:
            if (version := on_disk()) >= FORMAT_VERSION:
                layout.format_version = version
                return
            raise RunBusyError(
                f"store {layout.root} is in use by an older stagestore (store format "
                f"{version}); it is upgraded to format {FORMAT_VERSION} once no such process "
                "is running", hint="wait for that process to finish, then try again") from None
        with owner_locked(layout, "init", "the store's format file"):
            if (version := on_disk()) < FORMAT_VERSION:
                # Format 2's stat cache was one JSON file; format 3 keeps one record per folder
                # (stat-cache/).  It is derived: deleted, not converted (a re-hash is all it
                # costs).  A crash before the format file says 3 leaves a format-2 store
                # without it, which the next store lock upgrades again.
                if version < 3:
                    durable.unlink(layout.legacy_stat_cache)
                durable.write_file_atomic(
                    layout.format_file,
                    msgspec.json.encode(StoreFormat(version=FORMAT_VERSION)) + b"\n",
                    layout.new_tmp_path("init", "format"))
    finally:
        for fd in (hold, gate):
            if fd is not None:
                os.close(fd)
    layout.format_version = FORMAT_VERSION
