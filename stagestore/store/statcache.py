"""`stat-cache/`: skip hashing workspace files, and whole folders, unchanged since last hashed.

A no-op rerun must not read gigabytes of unchanged inputs again, nor rebuild the listing of a
100,000-file folder.  Like git's index, the store remembers, for each workspace folder it
snapshotted, each file's inode, size, mtime_ns, ctime_ns and executable bit and the digest of its
bytes, plus the folder's own tree digest.  A later snapshot that stats a folder's files and finds
exactly the remembered list (and the same subfolder digests) reuses the folder's tree digest
without reading a file or building a listing; a file whose stat matches its entry reuses its
digest.

One record per folder (`StatCacheFolder`), in its own file named by the BLAKE3 of the folder's
absolute path, read only when that folder is snapshotted and rewritten only when its entries
changed; so a run touching one folder of a thousand reads and writes that folder's record only.
Each file is msgpack followed by the BLAKE3 of those bytes: a torn or damaged record fails the
check and reads as absent, so it can never vouch for anything.  Records are replaced atomically
(temp, rename) without an fsync: after a power loss a record is either an intact one (old or
new, each true of the stats it names) or fails its check.

The racy-timestamp rule (git's "racily clean" entries): a file modified again within the
filesystem's timestamp granularity of the moment it was stat-ed could keep its mtime, so an
entry is kept only if the file's mtime and ctime were at least `RACY_NS` older than the wall
clock just before that stat.  A racy file is hashed again next time, and remembered then.

The cache is derived and advisory: a missing, damaged or newer-version record only costs a
re-hash.  Entries name objects that were durable before the record was written; `gc` clears the
cache before it deletes any object (`clear`), so an entry never names a deleted object.
docs/format.md specifies it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import blake3
import msgspec

from ..model.records import STAT_CACHE_SCHEMA_VERSION, StatCacheFolder
from . import durable
from .layout import StoreLayout

# Coarser than any local filesystem's timestamps (ext4, xfs, btrfs: ns, but set from a clock
# that ticks every few ms; FAT: 2 s), so a file modified after its stat always shows a new mtime.
RACY_NS = 2_000_000_000
# Most folder records kept; beyond it, the records changed longest ago go first.
MAX_FOLDERS = 20_000
_CHECK = 32  # bytes of BLAKE3 after the msgpack body

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(StatCacheFolder)

FileStat = tuple[str, int, int, int, int, bool]  # name, ino, size, mtime_ns, ctime_ns, u+x


def file_stat(name: str, st: os.stat_result) -> FileStat:
    return (name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
            bool(st.st_mode & 0o100))


def racy(st: FileStat, seen_ns: int) -> bool:
    """Whether a file with stat `st`, stat-ed at wall clock `seen_ns`, may change unseen."""
    return max(st[3], st[4]) + RACY_NS >= seen_ns


def encode_folder(record: StatCacheFolder) -> bytes:
    body = _ENCODER.encode(record)
    return body + blake3.blake3(body).digest()


def decode_folder(data: bytes) -> StatCacheFolder | None:
    """The record in `data`, or None if it is torn, damaged or of another version."""
    body, check = data[:-_CHECK], data[-_CHECK:]
    if len(data) <= _CHECK or blake3.blake3(body).digest() != check:
        return None
    try:
        record = _DECODER.decode(body)  # another version may not decode: absent all the same
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    if record.schema_version != STAT_CACHE_SCHEMA_VERSION or len(record.files) != len(record.hashes):
        return None
    return record


class FolderEntries:
    """One folder's remembered entries, as a snapshot uses them."""

    __slots__ = ("record", "_by_name")

    def __init__(self, record: StatCacheFolder | None) -> None:
        self.record = record
        self._by_name: dict[str, tuple[FileStat, str]] | None = None

    def unchanged(self, dev: int, ino: int, files: list[FileStat],
                  dirs: list[tuple[str, str, int]]) -> tuple[str, int] | None:
        """The folder's (tree digest, bytes) if it holds exactly the remembered entries."""
        r = self.record
        if r is None or r.tree is None or r.dev != dev or r.ino != ino:
            return None
        if r.files != files or r.dirs != dirs:
            return None
        return r.tree, r.total

    def digest(self, st: FileStat) -> str | None:
        """The digest of a file whose stat is `st`, if remembered with exactly that stat."""
        if self.record is None:
            return None
        if self._by_name is None:
            self._by_name = {f[0]: (f, h) for f, h in zip(self.record.files, self.record.hashes)}
        found = self._by_name.get(st[0])
        return found[1] if found is not None and found[0] == st else None


class StatCache:
    def __init__(self, layout: StoreLayout) -> None:
        self.layout = layout
        self.folder = layout.stat_cache
        self._loaded: dict[str, FolderEntries] = {}
        self._new: dict[str, StatCacheFolder] = {}
        self._files: dict[str, dict[str, tuple[FileStat, str]]] = {}  # `remember`, unsaved
        self._lock = threading.Lock()

    def _path(self, folder: str) -> Path:
        return self.folder / blake3.blake3(os.fsencode(folder)).hexdigest()[:32]

    def entries(self, folder: str) -> FolderEntries:
        """What is remembered of the folder at absolute path `folder` (read on first use)."""
        with self._lock:
            found = self._loaded.get(folder)
        if found is not None:
            return found
        record = None
        try:
            record = decode_folder(self._path(folder).read_bytes())
        except OSError:
            pass
        if record is not None and record.path != folder:
            record = None  # another folder whose path hashed to the same name
        found = FolderEntries(record)
        with self._lock:
            return self._loaded.setdefault(folder, found)

    def remember_folder(self, folder: str, dev: int, ino: int, files: list[FileStat],
                        hashes: list[str], seen_ns: int, dirs: list[tuple[str, str, int]],
                        tree: str | None, total: int) -> None:
        """A folder snapshotted now: its files with their digests, its subfolders' trees and
        its own tree.  Racy entries are left out, and then the tree too."""
        keep = [i for i, st in enumerate(files) if not racy(st, seen_ns)]
        if len(keep) != len(files):
            files, hashes, tree = [files[i] for i in keep], [hashes[i] for i in keep], None
        record = StatCacheFolder(path=folder, dev=dev, ino=ino, files=files, hashes=hashes,
                                 dirs=dirs, tree=tree, total=total if tree else 0)
        self._put(folder, record)

    def lookup(self, path: str, st: os.stat_result) -> str | None:
        """The digest of the file at absolute `path` if its stat `st` matches its entry."""
        folder, _, name = path.rpartition("/")
        entry = file_stat(name, st)
        with self._lock:
            pending = self._files.get(folder, {}).get(name)
        if pending is not None:
            return pending[1] if pending[0] == entry else None
        return self.entries(folder).digest(entry)

    def remember(self, path: str, st: os.stat_result, digest: str, seen_ns: int) -> None:
        """`digest` is the hash of the file at absolute `path` as of `st`, a stat taken at wall
        clock `seen_ns`.  Kept in memory and merged into its folder's record by `save`, once per
        folder (an item run remembers one file per item, thousands in one folder)."""
        folder, _, name = path.rpartition("/")
        entry = file_stat(name, st)
        if racy(entry, seen_ns):
            return
        with self._lock:
            self._files.setdefault(folder, {})[name] = (entry, digest)

    def _put(self, folder: str, record: StatCacheFolder) -> None:
        with self._lock:
            self._new[folder] = record
            self._loaded[folder] = FolderEntries(record)

    def save(self, owner: str) -> None:
        """Write the folder records changed since the last save, each replacing its file."""
        with self._lock:
            new, self._new = self._new, {}
            files, self._files = self._files, {}
        for folder, updates in files.items():
            merged = self._merge(new.get(folder) or self.entries(folder).record, folder, updates)
            if merged is not None:
                new[folder] = merged
        with self._lock:
            # Read again next time: a `gc` in another process may clear the records before a
            # later run of this one, and only the files on disk say so.
            self._loaded.clear()
        if not new:
            return
        if not self.folder.is_dir():
            durable.mkdir(self.folder)
        for folder, record in new.items():
            # No fsync: a record is checksummed (a torn one reads as absent) and true of the
            # stats it names whenever it was written, and nothing durable depends on it.
            durable.write_file_atomic(self._path(folder), encode_folder(record),
                                      self.layout.new_tmp_path(owner, "stats"), sync=False)
        self._evict()

    @staticmethod
    def _merge(old: StatCacheFolder | None, folder: str,
               updates: dict[str, tuple[FileStat, str]]) -> StatCacheFolder | None:
        """`old` with the entries of `updates`, or None if it holds them all already."""
        known = {f[0]: (f, h) for f, h in zip(old.files, old.hashes)} if old else {}
        if all(known.get(name) == update for name, update in updates.items()):
            return None
        known.update(updates)
        try:
            st = os.stat(folder)
        except OSError:
            return None
        names = sorted(known)
        # The folder's tree is dropped: it was computed without these entries.
        return StatCacheFolder(path=folder, dev=st.st_dev, ino=st.st_ino,
                               files=[known[n][0] for n in names],
                               hashes=[known[n][1] for n in names],
                               dirs=old.dirs if old else [])

    def _evict(self) -> None:
        try:
            names = os.listdir(self.folder)
        except OSError:
            return
        if len(names) <= MAX_FOLDERS:
            return
        aged = []
        for name in names:
            try:
                aged.append((os.stat(self.folder / name).st_mtime_ns, name))
            except OSError:
                continue
        aged.sort()
        for _, name in aged[:len(aged) - MAX_FOLDERS]:
            durable.unlink(self.folder / name)

    def clear(self) -> None:
        """Forget every record, durably, before objects they may name are deleted (`gc`)."""
        with self._lock:
            self._loaded.clear()
            self._new.clear()
            self._files.clear()
        if self.layout.legacy_stat_cache.exists():
            durable.unlink(self.layout.legacy_stat_cache)
        if not self.folder.is_dir():
            return
        removed = False
        for name in os.listdir(self.folder):
            removed = durable.unlink(self.folder / name) or removed
        if removed:
            durable.fsync_dir(self.folder)
