"""`stat-cache.json`: skip hashing a workspace file whose stat has not changed since it was hashed.

A no-op rerun must not read gigabytes of unchanged inputs again. Like git's index, the store
remembers, for each workspace file it hashed, the file's device, inode, size, mtime_ns and
ctime_ns and the digest of its bytes. A later snapshot that finds all five unchanged, and the
object of that digest in the store, uses the digest without reading the file.

The racy-timestamp rule (git's "racily clean" entries): a file modified again within the
filesystem's timestamp granularity of the moment it was stat-ed could keep its mtime, so an
entry is trusted only if the file's mtime and ctime were at least `RACY_NS` older than the wall
clock just before that stat (`seen_ns`). Such a file is hashed again next time, and its entry
becomes trustworthy then.

The cache is advisory: a missing, damaged, newer-version or concurrently replaced file only
costs a re-hash. It is written like every record (temp, fsync, rename, folder fsync), merged
with what is on disk at that moment, so two runs saving at once lose at most each other's
newest entries. docs/format.md specifies it.
"""

from __future__ import annotations

import os
import threading

import msgspec

from ..errors import StagestoreError
from ..model.records import StatCacheEntry, StatCacheRecord, decode_record
from . import durable
from .layout import StoreLayout

# Coarser than any local filesystem's timestamps (ext4, xfs, btrfs: ns, but set from a clock
# that ticks every few ms; FAT: 2 s), so a file modified after its stat always shows a new mtime.
RACY_NS = 2_000_000_000
# Most entries kept (about 20 MB); the ones seen longest ago go first.
MAX_ENTRIES = 100_000


class StatCache:
    def __init__(self, layout: StoreLayout) -> None:
        self.path = layout.stat_cache
        self.layout = layout
        self._entries: dict[str, StatCacheEntry] | None = None
        self._new: dict[str, StatCacheEntry] = {}
        self._lock = threading.Lock()

    def _read(self) -> dict[str, StatCacheEntry]:
        try:
            record: StatCacheRecord = decode_record(self.path.read_bytes(), StatCacheRecord,
                                                    str(self.path))
        except (OSError, StagestoreError):
            return {}
        return {entry.path: entry for entry in record.entries}

    def lookup(self, path: str, st: os.stat_result) -> str | None:
        """The digest of `path`'s bytes if its stat `st` matches a trustworthy entry."""
        with self._lock:
            if self._entries is None:
                self._entries = self._read()
            entry = self._new.get(path) or self._entries.get(path)
        if entry is None or (entry.dev, entry.ino, entry.size, entry.mtime_ns, entry.ctime_ns) != (
                st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns):
            return None
        if max(entry.mtime_ns, entry.ctime_ns) + RACY_NS >= entry.seen_ns:
            return None  # racy: modified too close to the stat to be sure
        return entry.hash

    def remember(self, path: str, st: os.stat_result, digest: str, seen_ns: int) -> None:
        """`digest` is the hash of `path`'s bytes as of `st`, a stat taken at wall clock `seen_ns`."""
        entry = StatCacheEntry(path=path, dev=st.st_dev, ino=st.st_ino, size=st.st_size,
                               mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns, hash=digest,
                               seen_ns=seen_ns)
        with self._lock:
            self._new[path] = entry

    def save(self, owner: str) -> None:
        """Write the entries remembered since the last save, merged into the file on disk."""
        with self._lock:
            if not self._new:
                return
            merged = self._read()
            merged.update(self._new)
            entries = sorted(merged.values(), key=lambda e: e.seen_ns)[-MAX_ENTRIES:]
            # Compact JSON, unlike the other records: it can hold 100,000 entries.
            data = msgspec.json.encode(StatCacheRecord(entries=sorted(entries, key=lambda e: e.path)))
            durable.write_file_atomic(self.path, data, self.layout.new_tmp_path(owner, "stats"))
            self._entries = {entry.path: entry for entry in entries}
            self._new = {}
