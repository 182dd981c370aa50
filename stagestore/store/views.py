"""`views/<tree hex>/`: one read-only materialised view per tree, shared by the attempts that
read that tree, kept across runs and updated by difference.

Handing a stage a folder of 100,000 files used to cost 100,000 hard links, a stat of each
before and after the command, and their removal, on every execution.  A view is built once
per tree (hard links to the objects, as before), and each execution that reuses it costs a
stat of each of its *folders* and an inotify watch on each, not a call per file.  The safety
argument is in docs/format.md (`views/`): in short, a view is trusted only while

* its seal (`seal.json`) names the tree, was written in this boot, and every folder still has
  the inode, mtime and ctime the seal recorded (an entry added, removed or renamed, or a chmod,
  changes them);
* no attempt that used it died without checking it (a marker in `users/` whose owner is not
  live: the stage may have written into it and nobody looked);
* every attempt that used it watched it while its command ran (inotify on every folder: a
  write, truncate, chmod, create, removal or rename through the view is an event), or, where
  inotify is not available, checked every file's ctime afterwards.

Anything else makes it suspect: a full check (every path, type, size and mode against the
listing; every file whose ctime is newer than the seal hashed again) or a rebuild.  A view is
never trusted over the objects: it is derived state, removed by `gc` when unused and by
`recover` whenever objects were damaged.
"""

from __future__ import annotations

import os
import stat
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import CorruptRecordError, FormatVersionError, InvalidNameError
from ..model.records import TreeEntry, TreeListing, ViewFolder, ViewSeal, decode_record, \
    encode_record
from . import durable
from .hashing import digest_hex, hash_file
from .layout import TMP_SEP, StoreLayout, validate_relpath
from .locking import OwnerLock
from .objects import ObjectStore

TREE = "tree"  # the view itself: what the stage is handed
SEAL = "seal.json"
USERS = "users"  # one empty marker per attempt using the view, named after its attempt folder
EXEC_MODE = 0o555  # executables are private copies in the view: readable, runnable, not writable
# A file's ctime is stamped from the kernel's coarse clock, which lags the wall clock by up to
# one tick (at most 10 ms): a write at or after `since` has a ctime no older than this before it.
CTIME_SLACK_NS = 50_000_000
# Update by difference when it touches at most this share of the new tree's entries; beyond
# that a fresh build (which keeps the older view) costs about the same.
MOVE_MAX_SHARE = 0.5


class ViewLease:
    """One attempt's use of one view: the path to hand over, and the watch on it."""

    def __init__(self, views: ViewStore, digest: str, user: str, path: Path, files: int,
                 watch: FolderWatch | None, folders: list[ViewFolder], since_ns: int) -> None:
        self.views = views
        self.digest = digest
        self.user = user
        self.path = path
        self.files = files
        self._watch = watch
        self._folders = folders
        self._since_ns = since_ns
        self.changed: list[str] = []
        self.checked = False

    def check(self) -> list[str]:
        """What changed in the view since it was handed over (relative paths; "" is the view
        itself); empty when nothing did.  A changed view is condemned at once."""
        self.checked = True
        changed: list[str] | None = None
        if self._watch is not None:
            changed = self._watch.changes()
        if changed is None:  # no watch, or its queue overflowed: look at every file
            listing = self.views.listing(self.digest)
            changed = full_check(self.path, listing, self._since_ns)
        changed += [f.path for f in _folders_changed(self.path, self._folders)]
        self.changed = sorted(set(changed))
        if self.changed:
            self.views.condemn(self.digest, self.user.partition(TMP_SEP)[0] or "unknown")
        return self.changed

    def release(self) -> None:
        """Stop watching and drop the marker; an attempt abandoned before its check is checked
        now, so that nothing it wrote into the view goes unseen once the marker is gone."""
        if not self.checked:
            self.check()
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        durable.unlink(self.views.container(self.digest) / USERS / self.user)


class ViewStore:
    """The views of one store (`views/`)."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        self.layout: StoreLayout = objects.layout
        self.root = self.layout.views

    def container(self, digest: str) -> Path:
        return self.root / digest_hex(digest)

    def listing(self, digest: str) -> TreeListing:
        from .trees import read_tree

        return read_tree(self.objects, digest)

    # --- handing a view to an attempt ---

    def lease(self, digest: str, user: str, owner: str, label: str) -> ViewLease:
        """A checked view of tree `digest` for the attempt whose folder is named `user`,
        watched from now on; built, repaired or updated from another view first if needed.
        `label` names the role the tree plays (stage, item, input) so that the next tree in
        that role can be built from this one by difference."""
        durable.mkdir(self.root)
        box = self.container(digest)
        with _flocked(self.layout, digest):
            try:
                durable.temp_dir(box)
            except FileExistsError:
                pass
            seal = self._trusted_seal(digest, owner)
            if seal is None:
                seal = self._build(digest, owner, label)
            tree = box / TREE
            watch = FolderWatch.start([tree / f.path if f.path else tree for f in seal.folders])
            try:
                since = time.time_ns()
                if _folders_changed(tree, seal.folders):  # changed before the watch began
                    self.condemn(digest, owner)
                    seal = self._build(digest, owner, label)
                    if watch is not None:
                        watch.close()
                    watch = FolderWatch.start(
                        [tree / f.path if f.path else tree for f in seal.folders])
                    since = time.time_ns()
                users = box / USERS
                try:
                    durable.temp_dir(users)
                except FileExistsError:
                    pass
                durable.write_temp(users / user, b"")
            except BaseException:
                if watch is not None:
                    watch.close()
                raise
        return ViewLease(self, digest, user, tree, seal.files, watch, seal.folders, since)

    def _read_seal(self, digest: str) -> ViewSeal | None:
        path = self.container(digest) / SEAL
        try:
            seal = decode_record(path.read_bytes(), ViewSeal, str(path))
        except (OSError, CorruptRecordError, FormatVersionError):
            return None
        return seal if seal.tree == digest else None

    def _trusted_seal(self, digest: str, owner: str) -> ViewSeal | None:
        """The view's seal if the view can be handed over as it is, after a full check when it
        is suspect; None (and the view gone) when it must be built."""
        box = self.container(digest)
        seal = self._read_seal(digest)
        if seal is None or not (box / TREE).is_dir():
            self.condemn(digest, owner)
            return None
        stale = self._stale_users(digest)
        if stale or seal.boot_id != boot_id():
            listing = self.listing(digest)
            if full_check(box / TREE, listing, seal.sealed_ns):
                self.condemn(digest, owner)
                return None
            seal = self._seal(digest, listing, owner, label=None)
            for name in stale:
                durable.unlink(box / USERS / name)
        return seal

    def _stale_users(self, digest: str) -> list[str]:
        """Markers of attempts whose owner is no longer live: they may have written into the
        view, and nobody checked."""
        from .locking import owner_is_live

        try:
            names = os.listdir(self.container(digest) / USERS)
        except FileNotFoundError:
            return []
        stale = []
        owners: dict[str, bool] = {}
        for name in names:
            owner = self.layout.tmp_owner(name)
            if owner is None:
                stale.append(name)
                continue
            if owner not in owners:
                try:
                    owners[owner] = owner_is_live(self.layout, owner)
                except InvalidNameError:
                    owners[owner] = False
            if not owners[owner]:
                stale.append(name)
        return stale

    def _live_users(self, digest: str) -> bool:
        try:
            names = os.listdir(self.container(digest) / USERS)
        except FileNotFoundError:
            return False
        return len(names) > len(self._stale_users(digest))

    # --- building ---

    def _build(self, digest: str, owner: str, label: str) -> ViewSeal:
        """Build the view of `digest` (its container locked, its `tree/` absent): from the most
        recent view with the same label, by difference, when one is free and close enough;
        else from the objects."""
        listing = self.listing(digest)
        tmp = self._from_base(digest, listing, owner, label)
        if tmp is None:
            tmp = self.layout.new_tmp_path(owner, "view")
            try:
                self._materialize(listing.entries, tmp)
            except BaseException:
                durable.rmtree(tmp)
                raise
        durable.rename(tmp, self.container(digest) / TREE)
        return self._seal(digest, listing, owner, label)

    def _materialize(self, entries: list[TreeEntry], dest: Path) -> None:
        """Create `dest` and the entries under it (paths already checked by `check_tree`)."""
        durable.temp_dir(dest)
        for entry in entries:
            self._add(dest, entry)

    def _add(self, dest: Path, entry: TreeEntry) -> None:
        from .trees import copy_out

        # check_tree validated every path, its parent is listed before it, and nothing but
        # folders and regular files is ever created here: a plain join cannot leave `dest`.
        target = os.path.join(dest, entry.path)
        if entry.kind == "dir":
            durable.temp_dir(target)
        elif entry.executable:
            assert entry.hash is not None
            copy_out(self.objects.path(entry.hash), Path(target), EXEC_MODE)
        else:
            assert entry.hash is not None
            durable.temp_link(self.objects.path(entry.hash), target)

    def _from_base(self, digest: str, listing: TreeListing, owner: str,
                   label: str) -> Path | None:
        """Take over the most recently sealed view with `label` that no attempt is using, and
        turn it into the view of `listing` by difference; returns its temp path, or None."""
        for base in self._bases(digest, label):
            with _flocked(self.layout, base.tree, wait=False) as locked:
                if not locked or self._live_users(base.tree) or self._read_seal(base.tree) != base:
                    continue
                base_box = self.container(base.tree)
                if _folders_changed(base_box / TREE, base.folders) or (
                        self._stale_users(base.tree) or base.boot_id != boot_id()):
                    continue  # suspect: not worth a full check to save a build
                try:
                    # The flat view of the base's tree (a version-2 tree object lists one
                    # folder only; `read_tree` follows its subtrees), checked as it is read.
                    old = self.listing(base.tree)
                except (CorruptRecordError, FormatVersionError, InvalidNameError, OSError):
                    continue
                removed, added = _difference(old.entries, listing.entries)
                if len(removed) + len(added) > MOVE_MAX_SHARE * max(len(listing.entries), 1):
                    return None
                # The seal goes first: a crash from here on leaves an unsealed view (rebuilt)
                # or an orphan temp (removed by recover), never a seal over other content.
                durable.unlink(base_box / SEAL)
                tmp = self.layout.new_tmp_path(owner, "view")
                durable.rename(base_box / TREE, tmp)
                try:
                    for entry in sorted(removed, key=lambda e: e.path, reverse=True):
                        validate_relpath(entry.path, "tree path")
                        path = os.path.join(tmp, entry.path)
                        if entry.kind == "dir":
                            durable.rmtree(path)
                        else:
                            durable.unlink(path)
                    for entry in added:
                        self._add(tmp, entry)
                except BaseException:
                    durable.rmtree(tmp)
                    raise
                return tmp
        return None

    def _bases(self, digest: str, label: str) -> list[ViewSeal]:
        """Sealed views with `label`, most recently sealed first."""
        found = []
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        for name in names:
            labels = self._labels(name)
            if label not in labels or name == digest_hex(digest):
                continue
            seal = self._read_seal("blake3:" + name)
            if seal is not None:
                found.append(seal)
        return sorted(found, key=lambda s: s.sealed_ns, reverse=True)

    def _labels(self, hexname: str) -> list[str]:
        # A hint (which roles used the view), written without a checksum: a power loss may
        # leave garbage, which matches no label and so only costs a fresh build.
        try:
            return (self.root / hexname / "labels").read_bytes().decode("utf-8", "replace") \
                .splitlines()
        except OSError:
            return []

    def _seal(self, digest: str, listing: TreeListing, owner: str,
              label: str | None) -> ViewSeal:
        box = self.container(digest)
        tree = box / TREE
        folders = [_folder_stat(tree, "")]
        files = 0
        for entry in listing.entries:
            if entry.kind == "dir":
                folders.append(_folder_stat(tree, entry.path))
            else:
                files += 1
        seal = ViewSeal(tree=digest, files=files, boot_id=boot_id(), sealed_ns=time.time_ns(),
                        folders=folders)
        self._write(box / SEAL, encode_record(seal), owner)
        if label is not None and label not in self._labels(digest_hex(digest)):
            labels = self._labels(digest_hex(digest)) + [label]
            self._write(box / "labels", "\n".join(labels[-8:]).encode() + b"\n", owner)
        return seal

    def _write(self, path: Path, data: bytes, owner: str) -> None:
        # Not fsynced: a view is derived state, and after a crash of the machine its seal is
        # from another boot, which forces a full check (or a rebuild) before any use.
        tmp = self.layout.new_tmp_path(owner, "view-seal")
        try:
            durable.write_temp(tmp, data)
            durable.rename(tmp, path)
        except BaseException:
            durable.discard(tmp)
            raise

    # --- removing ---

    def condemn(self, digest: str, owner: str) -> None:
        """Take the view of `digest` out of use: seal first, then the folder (renamed into
        `tmp/` and removed there, so a crash leaves an orphan temp, never a partial view)."""
        box = self.container(digest)
        durable.unlink(box / SEAL)
        if (box / TREE).exists():
            tmp = self.layout.new_tmp_path(owner, "view-condemned")
            durable.rename(box / TREE, tmp)
            durable.rmtree(tmp)

    def remove(self, hexname: str) -> None:
        """Remove a whole view folder and its lock (gc, recover: under the exclusive store lock
        or with no run live, so nobody holds or waits on the lock)."""
        durable.rmtree(self.root / hexname)
        durable.unlink(self.layout.owner_lock_path(f"view-{hexname}"))

    def names(self) -> list[str]:
        try:
            return sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []

    def last_used_ns(self, hexname: str) -> int:
        """When an attempt last took or let go of the view (its `users/` folder's mtime), or
        when it was sealed."""
        box = self.root / hexname
        for path in (box / USERS, box / SEAL, box):
            try:
                return os.stat(path).st_mtime_ns
            except FileNotFoundError:
                continue
        return 0

    def repair(self, hexname: str, owner: str) -> str | None:
        """recover: a view that attempts used and never checked (markers of owners no longer
        live) is checked in full under its lock, and its markers dropped, or it is condemned.
        Returns what was done, or None if the view needed nothing."""
        digest = "blake3:" + hexname
        with _flocked(self.layout, digest):
            stale = self._stale_users(digest)
            if not stale:
                return None
            done = "checked"
            if self._trusted_seal(digest, owner) is None:
                done = "discarded"
            for name in stale:
                durable.unlink(self.root / hexname / USERS / name)
            return done

    def discard_all_of(self, hexname: str, owner: str) -> None:
        with _flocked(self.layout, "blake3:" + hexname):
            self.condemn("blake3:" + hexname, owner)

    def discard_all(self, owner: str) -> None:
        """recover, after it removed a damaged object: a view may hold the damaged inode under
        a path the object no longer has, so every view is taken out of use (and rebuilt from
        the objects when next needed)."""
        for hexname in self.names():
            digest = "blake3:" + hexname
            with _flocked(self.layout, digest):
                self.condemn(digest, owner)
                # The markers of dead attempts go too: the view they used is gone, so there
                # is nothing left for anyone to check (a live attempt's marker stays).
                for name in self._stale_users(digest):
                    durable.unlink(self.root / hexname / USERS / name)

    def check(self, hexname: str) -> list[str]:
        """verify: what is wrong with a view (empty if nothing): a full check against its
        tree, from its seal's time."""
        digest = "blake3:" + hexname
        seal = self._read_seal(digest)
        if seal is None:
            return ["no valid seal"] if (self.root / hexname / TREE).exists() else []
        try:
            listing = self.listing(digest)
        except (CorruptRecordError, FormatVersionError, InvalidNameError, OSError) as exc:
            return [f"its tree cannot be read ({getattr(exc, 'message', exc)})"]
        return full_check(self.root / hexname / TREE, listing, seal.sealed_ns)


# --- checks ---


def full_check(tree: Path, listing: TreeListing, since_ns: int) -> list[str]:
    """Paths where the view in `tree` differs from `listing`: missing, extra, of another type,
    size or execute bit, or (for files whose ctime or mtime is at or after `since_ns`) bytes
    that no longer hash to the listed object.  One stat per entry; hashing only the recent."""
    expected = {e.path: e for e in listing.entries}
    seen: set[str] = set()
    bad: list[str] = []
    limit = since_ns - CTIME_SLACK_NS

    def visit(folder: str, prefix: str) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            bad.append(prefix.rstrip("/"))
            return
        for item in entries:
            rel = prefix + item.name
            entry = expected.get(rel)
            try:
                st = item.stat(follow_symlinks=False)
            except OSError:
                bad.append(rel)
                continue
            if entry is None:
                bad.append(rel)
                continue
            seen.add(rel)
            if entry.kind == "dir":
                if not stat.S_ISDIR(st.st_mode):
                    bad.append(rel)
                else:
                    visit(item.path, rel + "/")
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size or \
                    bool(st.st_mode & stat.S_IXUSR) != entry.executable:
                bad.append(rel)
            elif st.st_ctime_ns >= limit or st.st_mtime_ns >= limit:
                try:
                    if hash_file(item.path, st.st_size) != entry.hash:
                        bad.append(rel)
                except OSError:
                    bad.append(rel)

    try:
        if not stat.S_ISDIR(os.lstat(tree).st_mode):
            return [""]
    except FileNotFoundError:
        return [""]
    visit(os.fspath(tree), "")
    bad.extend(path for path in expected if path not in seen)
    return bad


def _folder_stat(tree: Path, rel: str) -> ViewFolder:
    st = os.lstat(os.path.join(tree, rel) if rel else tree)
    return ViewFolder(path=rel, ino=st.st_ino, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns)


def _folders_changed(tree: Path, folders: list[ViewFolder]) -> list[ViewFolder]:
    changed = []
    for folder in folders:
        try:
            now = _folder_stat(tree, folder.path)
        except OSError:
            changed.append(folder)
            continue
        if now != folder:
            changed.append(folder)
    return changed


def _difference(old: list[TreeEntry], new: list[TreeEntry]) -> tuple[list[TreeEntry],
                                                                    list[TreeEntry]]:
    """(entries of `old` to remove, entries of `new` to add, in listing order) to turn a view
    of `old` into one of `new`.  A folder that becomes a file, or the reverse, is removed whole
    (with what is under it) and added again."""
    before = {e.path: _comparable(e) for e in old}
    after = {e.path: _comparable(e) for e in new}
    removed = [e for p, e in before.items() if after.get(p) != e]
    gone_dirs = [e.path + "/" for e in removed if e.kind == "dir"]
    if gone_dirs:
        # What is under a removed folder goes with it; what the new tree keeps there is added.
        def under(path: str) -> bool:
            return any(path.startswith(d) for d in gone_dirs)
        removed = [e for e in removed if not under(e.path)]
        added = [e for p, e in after.items() if before.get(p) != e or under(p)]
    else:
        added = [e for p, e in after.items() if before.get(p) != e]
    return removed, added


def _comparable(entry: TreeEntry) -> TreeEntry:
    """`entry` as a view sees it: a folder is the same folder whatever it holds (a version-2
    tree gives a folder its subtree's digest and size, which change with any file below it;
    those files' own entries say what changed)."""
    if entry.kind == "dir" and (entry.hash is not None or entry.size):
        return TreeEntry(path=entry.path, kind="dir", executable=entry.executable)
    return entry


_BOOT_ID: list[str] = []


def boot_id() -> str:
    """This boot's id (Linux); a view sealed in another boot may have lost un-synced entries
    or held a write nobody saw, so it is checked in full first.  "" where there is none, which
    makes every use of a view a full check."""
    if not _BOOT_ID:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _BOOT_ID.append(f.read().strip())
        except OSError:
            _BOOT_ID.append("")
    return _BOOT_ID[0]


@contextmanager
def _flocked(layout: StoreLayout, digest: str, wait: bool = True) -> Iterator[bool]:
    """`with _flocked(layout, digest)`: the view's lock (`locks/view-<hex>.lock`, an owner
    lock) for the length of the block; `wait=False` gives False instead of waiting."""
    lock = OwnerLock(layout, f"view-{digest_hex(digest)}")
    held = lock.try_acquire(wait=wait)
    try:
        yield held
    finally:
        if held:
            lock.release()


# --- inotify ---

_IN_MODIFY, _IN_ATTRIB, _IN_CLOSE_WRITE = 0x2, 0x4, 0x8
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200
_IN_DELETE_SELF, _IN_MOVE_SELF, _IN_Q_OVERFLOW, _IN_IGNORED = 0x400, 0x800, 0x4000, 0x8000
_IN_ONLYDIR, _IN_DONT_FOLLOW = 0x01000000, 0x02000000
_WATCH_MASK = (_IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO
               | _IN_CREATE | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF)
_EVENT = struct.Struct("iIII")
_INOTIFY: list[object] = []


def _inotify() -> object:
    if not _INOTIFY:
        function = None
        import sys

        if sys.platform.startswith("linux"):
            import ctypes

            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.inotify_init1.argtypes = [ctypes.c_int]
                libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
                function = libc
            except (OSError, AttributeError):
                function = None
        _INOTIFY.append(function)
    return _INOTIFY[0]


class FolderWatch:
    """inotify on a set of folders: every write, truncate, chmod, create, removal or rename of
    an entry through one of them is an event, whatever the writer's privileges.  Events are
    queued by the kernel in the writing system call itself, so once the command's processes
    have ended, reading the queue sees all of their writes."""

    def __init__(self, fd: int, names: dict[int, str]) -> None:
        self.fd = fd
        self.names = names

    @classmethod
    def start(cls, folders: list[Path]) -> FolderWatch | None:
        """Watch `folders` (paths relative to the first are reported); None where inotify is
        missing or out of watches or instances: the caller then checks every file."""
        libc = _inotify()
        if libc is None:
            return None
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)  # type: ignore[attr-defined]
        if fd < 0:
            return None
        root = os.fspath(folders[0]) if folders else ""
        names: dict[int, str] = {}
        for folder in folders:
            wd = libc.inotify_add_watch(  # type: ignore[attr-defined]
                fd, os.fsencode(folder), _WATCH_MASK | _IN_ONLYDIR | _IN_DONT_FOLLOW)
            if wd < 0:
                os.close(fd)
                return None
            names[wd] = os.path.relpath(folder, root) if os.fspath(folder) != root else ""
        return cls(fd, names)

    def changes(self) -> list[str] | None:
        """Relative paths written, created, removed, renamed or chmod-ed so far; None when the
        queue overflowed (the events are lost: the caller checks every file)."""
        found: list[str] = []
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return found
            offset = 0
            while offset < len(data):
                wd, mask, _, length = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size:offset + _EVENT.size + length].rstrip(b"\0")
                offset += _EVENT.size + length
                if mask & _IN_Q_OVERFLOW:
                    return None
                if mask & _IN_IGNORED and not mask & _WATCH_MASK:
                    continue
                folder = self.names.get(wd, "?")
                entry = os.fsdecode(name)
                found.append(f"{folder}/{entry}".strip("/") if entry else folder)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
