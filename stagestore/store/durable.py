"""The one seam for every durable change to the store and to a folder remote.

Every create, write, fsync, rename, link, unlink, mkdir, chmod and removal that stagestore makes
inside a store, or inside a `file://` remote (`storage.FileStorage`), goes through this module,
so that

* the write ordering that docs/format.md argues about lives in one place, and
* a test can install a hook (`set_fault_hook`) that sees every operation before it happens: to
  count them, to raise an `OSError` at the Nth, or to end the process there; and a recorder
  (`set_recorder`) that also gets the source of renames and links, to model a power loss.

Functions take the path they act on even where the OS call needs only a descriptor, so the hook
can say where it is.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

FaultHook = Callable[[str, str], None]
_hook: FaultHook | None = None
Recorder = Callable[[str, str, "str | None"], None]
_recorder: Recorder | None = None

_COPY_CHUNK = 8 << 20


def set_fault_hook(hook: FaultHook | None) -> FaultHook | None:
    """Install `hook(op, path)`, called before every durable operation; returns the previous."""
    global _hook
    previous, _hook = _hook, hook
    return previous


def set_recorder(recorder: Recorder | None) -> Recorder | None:
    """Install `recorder(op, path, src)`, called before every durable operation right after the
    fault hook (`src` is the source of a rename or link, else None); returns the previous.  The
    power-loss tests use it to keep a model of what a crash could leave on disk."""
    global _recorder
    previous, _recorder = _recorder, recorder
    return previous


def _op(name: str, path: str | os.PathLike[str], src: str | os.PathLike[str] | None = None) -> None:
    if _hook is not None:
        _hook(name, os.fspath(path))
    if _recorder is not None:
        _recorder(name, os.fspath(path), os.fspath(src) if src is not None else None)


def create_exclusive(path: str | os.PathLike[str], mode: int = 0o644) -> int:
    _op("create", path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)


def write_all(fd: int, data: bytes | memoryview, path: str | os.PathLike[str]) -> None:
    _op("write", path)
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_fd(fd: int, path: str | os.PathLike[str]) -> None:
    _op("fsync", path)
    os.fsync(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """fsync a file that was written by someone else (a stage) and closed."""
    _op("fsync", path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: str | os.PathLike[str]) -> bool:
    """Make everything on the filesystem holding `path` durable: the data, modes and folder
    entries of every file (Linux `syncfs(2)`, which reports writeback errors since 5.8).

    One call instead of one fsync per file: for 10,000 small files about 0.15 s instead of 3 s
    here. Returns False, having done nothing, where `syncfs` does not exist; the caller then
    fsyncs file by file.
    """
    function = _syncfs_function()
    if function is None:
        return False
    _op("syncfs", path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if function(fd) != 0:
            import ctypes

            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), os.fspath(path))
    finally:
        os.close(fd)
    return True


_SYNCFS: list[Any] = []


def syncfs_available() -> bool:
    return _syncfs_function() is not None


class Deferral:
    """Writes to one filesystem whose fsyncs are left to one later `syncfs` (docs/format.md,
    rule 18): the objects, folder entries and cache entries of item stages, made durable by
    the item log's group commit just before it would fsync its segment.  `note` counts a
    deferred write; `sync` makes every write noted before it durable."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._pending = 0

    def note(self) -> None:
        with self._lock:
            self._pending += 1

    def sync(self) -> bool:
        """One `syncfs` if anything was deferred since the last; whether it made one."""
        with self._lock:
            count = self._pending
        if not count:
            return False
        if not syncfs(self.path):  # cannot happen: a Deferral exists only where syncfs does
            raise OSError(errno.ENOSYS, "syncfs is not available", self.path)
        with self._lock:
            self._pending -= count
        return True


def boot_id() -> str | None:
    """This boot's id (Linux), which a power loss or reboot changes; None elsewhere."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _syncfs_function() -> Any:
    if not _SYNCFS:
        function = None
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                function = ctypes.CDLL(None, use_errno=True).syncfs
                function.argtypes = [ctypes.c_int]
            except (OSError, AttributeError):
                function = None
        _SYNCFS.append(function)
    return _SYNCFS[0]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of a folder (creations, renames, removals) durable."""
    _op("fsync_dir", path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    _op("rename", dst, src)
    os.rename(src, dst)


def link(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Give the file `src` the further name `dst`; `FileExistsError` when `dst` exists, as
    link(2), unlike rename(2), never replaces a name: the commit point of a create-only write."""
    _op("link", dst, src)
    os.link(src, dst)


def chmod(path: str | os.PathLike[str], mode: int) -> None:
    _op("chmod", path)
    os.chmod(path, mode)


def unlink(path: str | os.PathLike[str], missing_ok: bool = True) -> bool:
    """Remove a file; returns whether it existed."""
    _op("unlink", path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        if not missing_ok:
            raise
        return False
    return True


def discard(path: str | os.PathLike[str]) -> None:
    """Best-effort removal of a temp file while cleaning up after another error."""
    try:
        _op("unlink", path)
        os.unlink(path)
    except OSError:
        pass


# Folders whose own entry this process has made durable, by (path, device, inode). A folder
# found already there may have been made by a process that died before it synced the parent
# (or by another thread that has not synced it yet), so the first time this process uses it,
# it syncs the parent itself; after that, once is enough.
_DURABLE_DIRS: set[tuple[str, int, int]] = set()


def mkdir(path: str | os.PathLike[str]) -> bool:
    """Make sure a folder exists and its entry is durable; returns whether it was created."""
    path = Path(path)
    created = True
    try:
        _op("mkdir", path)
        os.mkdir(path)
    except FileExistsError:
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise
        created = False
        if (str(path), st.st_dev, st.st_ino) in _DURABLE_DIRS:
            return False
    fsync_dir(path.parent)
    if created:
        st = os.stat(path)
    _DURABLE_DIRS.add((str(path), st.st_dev, st.st_ino))
    return created


def makedirs(path: str | os.PathLike[str]) -> None:
    """Make sure a folder and its missing parents exist, each entry durable (see `mkdir`)."""
    path = Path(path)
    if not path.parent.is_dir():
        makedirs(path.parent)
    mkdir(path)


def temp_dir(path: str | os.PathLike[str]) -> None:
    """Create a folder of temporary content (an attempt folder, a view): never fsynced."""
    _op("mkdir", path)
    os.mkdir(path)


_LINK_RETRIES = 5


def temp_link(source: str | os.PathLike[str], link_path: str | os.PathLike[str]) -> None:
    """Hard-link an object into a temporary read-only view.

    Another writer may rename a fresh copy over the object at this very moment (committing the
    same content replaces the object, see `ObjectStore.commit_file`).  Linux's link(2) then
    fails with ENOENT when the inode it resolved has just lost its last name, although the path
    exists all along; so ENOENT is retried while the source path exists.
    """
    _op("link", link_path, source)
    for attempt in range(_LINK_RETRIES):
        try:
            os.link(source, link_path)
            return
        except FileNotFoundError:
            if attempt == _LINK_RETRIES - 1 or not os.path.exists(source) \
                    or not os.path.isdir(os.path.dirname(link_path)):
                raise


def write_temp(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a new temporary file (no fsync: it is gone after the attempt)."""
    fd = create_exclusive(path)
    try:
        write_all(fd, data, path)
    finally:
        os.close(fd)


def rmtree(path: str | os.PathLike[str]) -> None:
    """Remove a folder tree, including read-only folders a stage may have left in it."""
    _op("rmtree", path)
    _rmtree_now(path)


def _rmtree_now(path: str | os.PathLike[str]) -> None:
    """`rmtree` without the announcement (the remover thread's, announced already)."""

    def make_writable_and_retry(func, failed_path, exc_info):  # noqa: ANN001
        parent = os.path.dirname(failed_path)
        try:
            os.chmod(parent, stat.S_IRWXU)
            if os.path.isdir(failed_path) and not os.path.islink(failed_path):
                os.chmod(failed_path, stat.S_IRWXU)
            func(failed_path)
        except FileNotFoundError:
            pass

    if os.path.isdir(path) and not os.path.islink(path):
        try:
            _remove_tree(os.fspath(path))
            return
        except OSError:
            pass  # a read-only folder, or a folder swapped for a symlink: the careful way
        import shutil  # here: it imports bz2 and lzma, which a no-op run never needs

        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=make_writable_and_retry)
        else:
            shutil.rmtree(path, onerror=make_writable_and_retry)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class _Remover:
    """Attempt folders removed on a thread of their own (`remove_later`): on an item run their
    removal was a fifth of the time, and nothing waits for it but the run's end (`drain`)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[str] = []
        self._busy = 0
        self._thread: threading.Thread | None = None

    def put(self, path: str) -> None:
        with self._cond:
            self._queue.append(path)
            self._busy += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, daemon=True, name="remover")
                self._thread.start()
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    if not self._cond.wait(timeout=5.0) and not self._queue:
                        self._thread = None
                        return
                path = self._queue.pop(0)
            try:
                _rmtree_now(path)
            except OSError:
                pass  # left as an orphan temp: `verify` reports it once the run has ended, and
                # `recover` removes it, as after a crash
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def drain(self) -> None:
        with self._cond:
            while self._busy:
                self._cond.wait()


_REMOVER = _Remover()


def remove_later(path: str | os.PathLike[str]) -> None:
    """`rmtree` on the remover thread: announced to the seam now, done soon; `drain_removals`
    waits for it.  For temps nothing else names (an attempt folder)."""
    _op("rmtree", path)
    _REMOVER.put(os.fspath(path))


def drain_removals() -> None:
    """Wait until every `remove_later` of this process is done (a run's end)."""
    _REMOVER.drain()


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _remove_tree(path: str) -> None:
    """The fast way for `rmtree` (an attempt folder: a handful of entries, thousands of times
    a run): through folder descriptors opened without following symlinks, so a folder swapped
    for a symlink meanwhile fails (ELOOP) instead of being followed.  Any error leaves the rest
    to `shutil.rmtree`."""
    fd = os.open(path, _DIR_FLAGS)
    try:
        _remove_children(fd)
    finally:
        os.close(fd)
    os.rmdir(path)


def _remove_children(fd: int) -> None:
    with os.scandir(fd) as entries:
        found = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
    for name, is_dir in found:
        if not is_dir:
            os.unlink(name, dir_fd=fd)
            continue
        child = os.open(name, _DIR_FLAGS, dir_fd=fd)
        try:
            _remove_children(child)
        finally:
            os.close(child)
        os.rmdir(name, dir_fd=fd)


def copy_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
              sync: bool = True) -> None:
    """Copy a file's bytes into a new file `dst` (created exclusively) and fsync it; with
    `sync=False` the caller makes it durable later (`syncfs`), before anything names it."""
    fd_out = create_exclusive(dst)
    try:
        _copy_into(src, fd_out, dst)
        if sync:
            fsync_fd(fd_out, dst)
    finally:
        os.close(fd_out)


# copy_file_range(2) refuses some copies rather than making them: EXDEV across filesystems
# (allowed only from Linux 5.3 and, since 5.19, only between two filesystems of one type that
# implements it, such as NFS: a store on disk and a folder remote on tmpfs are refused),
# EOPNOTSUPP or EINVAL on filesystems that do not support it, ENOSYS on old kernels.
_COPY_REFUSED = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


def _copy_into(src: str | os.PathLike[str], fd_out: int, dst: str | os.PathLike[str]) -> None:
    """Copy `src` into the empty file open as `fd_out`: with `copy_file_range` (in the kernel,
    or a reflink where the filesystem shares extents), else, when it refuses, by reading and
    writing, after throwing away whatever part it had copied."""
    with open(src, "rb") as f_in:
        fd_in = f_in.fileno()
        _op("write", dst)
        try:
            while os.copy_file_range(fd_in, fd_out, _COPY_CHUNK):
                pass
        except OSError as exc:
            if exc.errno not in _COPY_REFUSED:
                raise
            os.lseek(fd_out, 0, os.SEEK_SET)
            os.ftruncate(fd_out, 0)
            f_in.seek(0)
            while chunk := f_in.read(_COPY_CHUNK):
                write_all(fd_out, chunk, dst)


def write_file_atomic(path: str | os.PathLike[str], data: bytes, tmp_path: str | os.PathLike[str],
                      mode: int = 0o644, *, sync: bool = True) -> None:
    """Write `data` to `tmp_path`, fsync it, rename it to `path`, fsync `path`'s folder.

    `tmp_path` must be on the same filesystem as `path` (the store's `tmp/`, a folder remote's
    `.tmp/`).  A crash at any point leaves either the old file or the new one under `path`,
    never a mix.  `sync=False` skips both fsyncs, for a derived file that detects its own
    damage (the stat cache's checksummed records): after a power loss `path` may then hold the
    old bytes, the new ones, or a torn or empty file.
    """
    _replace_atomically(path, tmp_path, mode, lambda fd: write_all(fd, data, tmp_path), sync)


def copy_file_atomic(src: str | os.PathLike[str], path: str | os.PathLike[str],
                     tmp_path: str | os.PathLike[str]) -> None:
    """`write_file_atomic` with the bytes of the file `src`: copied into `tmp_path` (see
    `copy_file`, so `src` may be on another filesystem), fsynced, renamed to `path`, whose
    folder is then fsynced."""
    _replace_atomically(path, tmp_path, 0o644, lambda fd: _copy_into(src, fd, tmp_path))


def _replace_atomically(path: str | os.PathLike[str], tmp_path: str | os.PathLike[str],
                        mode: int, fill: Callable[[int], object], sync: bool = True) -> None:
    """Create `tmp_path`, `fill` its descriptor, fsync it, rename it to `path` and fsync
    `path`'s folder; the temp is removed if anything before the rename fails."""
    fd = create_exclusive(tmp_path, mode)
    try:
        try:
            fill(fd)
            if sync:
                fsync_fd(fd, tmp_path)
        finally:
            os.close(fd)
        rename(tmp_path, path)
    except BaseException:
        discard(tmp_path)
        raise
    if sync:
        fsync_dir(os.path.dirname(os.fspath(path)))


def write_file_create_only(path: str | os.PathLike[str], data: bytes,
                           tmp_path: str | os.PathLike[str], mode: int = 0o644) -> bool:
    """Create `path` holding `data` unless a file of that name exists; returns whether this
    call created it (an existing file is left as it is).

    `data` is written to `tmp_path` (on `path`'s filesystem) and fsynced, then `link`ed to
    `path`, so that `path` appears complete or not at all and, of writers racing on one name,
    exactly one wins.  `path`'s folder is fsynced whether or not this call won: a name found
    there may be one whose writer died before it synced the folder.
    """
    fd = create_exclusive(tmp_path, mode)
    try:
        try:
            write_all(fd, data, tmp_path)
            fsync_fd(fd, tmp_path)
        finally:
            os.close(fd)
        try:
            link(tmp_path, path)
            created = True
        except FileExistsError:
            created = False
    except BaseException:
        discard(tmp_path)
        raise
    unlink(tmp_path)
    fsync_dir(os.path.dirname(os.fspath(path)))
    return created


# --- append-only logs (the item log of a run, `store/itemlog.py`) ---


def open_append(path: str | os.PathLike[str]) -> int:
    """Open an existing log file for appending (`O_APPEND`); nothing changes until `append`."""
    _op("open_append", path)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)


def append(fd: int, data: bytes, path: str | os.PathLike[str]) -> None:
    """Append `data` to the log open as `fd` (one `write` call unless the kernel cuts it
    short); durable only once the file is fsynced (`fsync_fd`)."""
    _op("append", path)
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def truncate(path: str | os.PathLike[str], length: int) -> None:
    """Cut a log back to `length` bytes (its torn tail); durable once the file is fsynced."""
    _op("truncate", path)
    os.truncate(path, length)
