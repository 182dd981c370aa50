"""`runs/` and `cache/`: stage manifests, run records and the cache index.

A manifest is the commit point of a stage: it is written last, through a temp file, fsync and
rename, after every object it names is durable.  The cache index (`cache/`) maps a stage's
(input_hash, config_hash) to the run holding a succeeded manifest for it; it is derived data,
checked against the manifest on every lookup, so a stale or lost entry can cost a re-execution
but never return a wrong result.  A lookup never scans other runs: rebuilding stale entries from
the manifests is the job of `gc`, `recover` and `forget` (`CacheIndex.rebuild`).
"""

from __future__ import annotations

import errno
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

from ..errors import (CorruptRecordError, FormatVersionError, InvalidNameError, RunNotFoundError,
                      StagestoreError)
from ..model.records import (CacheEntry, ItemRecord, RunRecord, StageManifest, decode_record,
                             encode_record)
from . import durable, itemlog, unsynced
from .hashing import PREFIX, digest_canonical, digest_hex, is_digest
from .layout import ITEMS_DIR, StoreLayout, item_dirname, item_id, run_owner, validate_name
from .locking import OwnerLock, owner_is_live


class ManifestStore:
    """Reads and writes `runs/<run_id>/<stage>.json` and `runs/<run_id>/_run.json`, and, for
    item runs, the item manifests and item records: appended to the run's item log
    (`runs/<run_id>/_items.<hex>.log`, format 3, `itemlog.py`), and read from it or from
    format 2's files `runs/<run_id>/items/<item>/<stage>.json` and `.../_item.json`.  In a run
    that has both (made before the upgrade, then taken again), a record in the log wins over
    the file of the same item and stage."""

    def __init__(self, layout: StoreLayout) -> None:
        self.layout = layout
        self._logs: dict[str, itemlog.RunLog] = {}
        self._logs_lock = threading.Lock()
        self._found_synced: set[tuple[str, str]] = set()

    # --- the item log ---

    def _log(self, run_id: str) -> itemlog.RunLog:
        """The run's item log, brought up to date."""
        with self._logs_lock:
            log = self._logs.get(run_id)
            if log is None:
                log = self._logs[run_id] = itemlog.RunLog(self.layout.run_dir(run_id))
        log.refresh()
        return log

    def _append(self, run_id: str, kind: bytes, item: str, stage: str, data: bytes,
                owner: str) -> Path:
        item_dirname(item)  # refuses an id no folder could name, as format 2 did
        if stage:
            validate_name(stage, "stage name")
        writer = itemlog.existing_writer(self.layout.root, run_id)
        if writer is None:
            self._ensure_run_dir(run_id)
            with self._logs_lock:
                log = self._logs.get(run_id)
                if log is None:
                    log = self._logs[run_id] = itemlog.RunLog(self.layout.run_dir(run_id))
            writer = itemlog.writer(self.layout.root, run_id, self.layout.run_dir(run_id), log,
                                    self.layout.new_tmp_path(owner, "itemlog"),
                                    unsynced.deferral(self.layout))
        writer.append(kind, item, stage, data)
        return writer.path

    def sync_items(self, run_id: str) -> None:
        """Make every item record this process has appended to the run durable (one fsync)."""
        writer = itemlog.existing_writer(self.layout.root, run_id)
        if writer is not None:
            writer.sync()

    def when_durable(self, run_id: str, call: Callable[[], None]) -> None:
        """Call `call` once every item record this process has appended to the run so far is
        durable: at once when they are, else after the group sync that covers them.  The
        runner reports an item's progress through it, so that nothing is reported done that a
        power loss could take back."""
        writer = itemlog.existing_writer(self.layout.root, run_id)
        if writer is None:
            call()
        else:
            writer.when_durable(call)

    def close_items(self, run_id: str) -> None:
        """`sync_items`, then let go of this process's segment of the run."""
        itemlog.close_writer(self.layout.root, run_id)

    def item_log_tails(self, run_id: str) -> list[tuple[Path, int, int]]:
        """(segment, where its torn tail starts, its length in bytes) per segment with one."""
        return self._log(run_id).torn_tails()

    def item_log_damage(self, run_id: str) -> list[tuple[Path, int, int]]:
        """(segment, offset, length) of bad bytes inside a segment, good records after them:
        damage to data that was synced (the records there are lost)."""
        return self._log(run_id).damaged()

    def item_log_invalid(self, run_id: str) -> list[tuple[Path, StagestoreError]]:
        """Segments whose header is not an item log's (or is a later version's)."""
        return list(self._log(run_id).invalid())

    def cut_torn_tails(self, run_id: str, owner: str) -> list[tuple[Path, int, int]]:
        """Cut every segment of the run back to its last good record (a segment with no
        complete header is removed); the caller holds the run's owner lock.  Returns what
        was cut."""
        ours = itemlog.existing_writer(self.layout.root, run_id)
        cut = []
        for path, end, torn in self.item_log_tails(run_id):
            if ours is not None and path == ours.path:
                continue
            if end == 0:
                durable.unlink(path)
                durable.fsync_dir(path.parent)
            else:
                durable.truncate(path, end)
                durable.fsync_file(path)
            cut.append((path, end, torn))
        return cut

    # --- writing ---

    def _ensure_run_dir(self, run_id: str) -> Path:
        run_dir = self.layout.run_dir(run_id)
        durable.mkdir(run_dir)
        return run_dir

    def sync_scope(self, run_id: str, item: str | None) -> None:
        """Make the records of a run (or of its items) that a killed process may have left
        unsynced durable: the run folder's entries and the folder itself, and for an item,
        every segment of the run's item log, once per process (this process's own segment
        is synced with its next group)."""
        if item is None:
            durable.fsync_dir(self._ensure_run_dir(run_id))
            return
        if self.layout.scope_dir(run_id, item).is_dir():  # a format-2 item folder
            durable.fsync_dir(self.layout.scope_dir(run_id, item))
        ours = itemlog.existing_writer(self.layout.root, run_id)
        log = self._log(run_id)
        fresh = [seg.path for seg in log.segments.values()
                 if (ours is None or seg.path != ours.path)
                 and (run_id, seg.path.name) not in self._found_synced]
        if fresh and (run_id, "") not in self._found_synced:
            durable.fsync_dir(self.layout.run_dir(run_id))
            self._found_synced.add((run_id, ""))
        for path in sorted(fresh):
            durable.fsync_file(path)
            self._found_synced.add((run_id, path.name))

    def write(self, manifest: StageManifest, owner: str) -> Path:
        if manifest.item is not None:
            return self._append(manifest.run_id, itemlog.KIND_MANIFEST, manifest.item,
                                manifest.stage, encode_record(manifest), owner)
        self._ensure_run_dir(manifest.run_id)
        path = self.layout.manifest_path(manifest.run_id, manifest.stage, manifest.item)
        durable.write_file_atomic(path, encode_record(manifest),
                                  self.layout.new_tmp_path(owner, "manifest"))
        return path

    def install(self, run_id: str, item: str | None, name: str, data: bytes, owner: str) -> Path:
        """Write a record pulled from a remote byte for byte: `<stage>.json` or `_run.json` of
        the run's folder, or an item's `<stage>.json` or `_item.json`, appended to the run's
        item log.  The caller has decoded and checked it, and made every object it names
        durable."""
        if item is not None:
            if name == "_item.json":
                return self._append(run_id, itemlog.KIND_ITEM, item, itemlog.ITEM_KEY, data,
                                    owner)
            return self._append(run_id, itemlog.KIND_MANIFEST, item, name.removesuffix(".json"),
                                data, owner)
        path = self._ensure_run_dir(run_id) / name
        durable.write_file_atomic(path, data, self.layout.new_tmp_path(owner, "pulled"))
        return path

    def write_item(self, record: ItemRecord, owner: str) -> Path:
        return self._append(record.run_id, itemlog.KIND_ITEM, record.item, itemlog.ITEM_KEY,
                            encode_record(record), owner)

    def write_run(self, record: RunRecord, owner: str) -> Path:
        self._ensure_run_dir(record.run_id)
        path = self.layout.run_record_path(record.run_id)
        durable.write_file_atomic(path, encode_record(record),
                                  self.layout.new_tmp_path(owner, "run"))
        return path

    def remove(self, run_id: str, stage: str, item: str | None, owner: str) -> bool:
        """Remove a stage's manifest from the run (or from one item); returns whether there
        was one.  An item's is removed by a removal record in the item log, which hides a
        format-2 file of that item and stage too."""
        if item is None:
            path = self.layout.manifest_path(run_id, stage)
            if not path.exists():
                return False
            durable.unlink(path)
            durable.fsync_dir(path.parent)
            return True
        if not self.exists(run_id, stage, item):
            return False
        self._append(run_id, itemlog.KIND_REMOVED, item, stage, b"", owner)
        return True

    def delete_run(self, run_id: str, owner: str) -> None:
        """Remove a run at once: its folder is renamed into `tmp/` (one atomic step), then
        deleted.  A crash in between leaves an orphaned temp, never a half-forgotten run."""
        itemlog.close_writer(self.layout.root, run_id)
        grave = self.layout.new_tmp_path(owner, "forgotten")
        durable.rename(self.layout.run_dir(run_id), grave)
        durable.fsync_dir(self.layout.runs)
        durable.rmtree(grave)
        with self._logs_lock:
            self._logs.pop(run_id, None)

    # --- reading ---

    def _logged(self, run_id: str, item: str, stage: str) -> tuple[bytes, str] | None:
        """The item log's latest record of (item, stage): (its bytes, where it is), or None
        when the log has none; `FileNotFoundError` when it is a removal."""
        log = self._log(run_id)
        entry = log.get(item, stage)
        if entry is None:
            return None
        where = self._where(run_id, entry.segment, item, stage)
        if entry.kind == itemlog.KIND_REMOVED:
            raise FileNotFoundError(errno.ENOENT, "removed", where)
        return log.payload(entry, item, stage), where

    def _where(self, run_id: str, segment: str, item: str, stage: str) -> str:
        what = f"stage {stage}" if stage else "item record"
        return f"{self.layout.run_dir(run_id) / segment} (item {item!r} {what})"

    def location(self, run_id: str, stage: str, item: str | None = None) -> str:
        """Where a manifest is (or would be), to name it in messages and reports."""
        if item is not None:
            entry = self._log(run_id).latest.get(item, {}).get(stage)
            if entry is not None or not self.layout.manifest_path(run_id, stage, item).exists():
                segment = entry.segment if entry is not None else "_items.*.log"
                return self._where(run_id, segment, item, stage)
        return str(self.layout.manifest_path(run_id, stage, item))

    def item_location(self, run_id: str, item: str) -> str:
        entry = self._log(run_id).latest.get(item, {}).get(itemlog.ITEM_KEY)
        if entry is not None or not self.layout.item_record_path(run_id, item).exists():
            return self._where(run_id, entry.segment if entry else "_items.*.log", item, "")
        return str(self.layout.item_record_path(run_id, item))

    def read_bytes(self, run_id: str, stage: str, item: str | None = None) -> bytes:
        """A manifest's bytes as written; `FileNotFoundError` when there is none."""
        if item is not None:
            found = self._logged(run_id, item, validate_name(stage, "stage name"))
            if found is not None:
                return found[0]
        return self.layout.manifest_path(run_id, stage, item).read_bytes()

    def read_item_bytes(self, run_id: str, item: str) -> bytes:
        item_dirname(item)
        found = self._logged(run_id, item, itemlog.ITEM_KEY)
        if found is not None:
            return found[0]
        return self.layout.item_record_path(run_id, item).read_bytes()

    def exists(self, run_id: str, stage: str, item: str | None = None) -> bool:
        """Whether the run (or item) has a manifest of the stage, valid or not."""
        try:
            if item is not None:
                entry = self._log(run_id).get(item, validate_name(stage, "stage name"))
                if entry is not None:
                    return entry.kind != itemlog.KIND_REMOVED
            return self.layout.manifest_path(run_id, stage, item).is_file()
        except InvalidNameError:
            return False

    def read(self, run_id: str, stage: str, item: str | None = None) -> StageManifest:
        if item is not None:
            found = self._logged(run_id, item, validate_name(stage, "stage name"))
            if found is not None:
                manifest: StageManifest = decode_record(found[0], StageManifest, found[1])
                check_manifest(manifest, run_id, stage, found[1], item)
                return manifest
        path = self.layout.manifest_path(run_id, stage, item)
        manifest = decode_record(path.read_bytes(), StageManifest, str(path))
        check_manifest(manifest, run_id, stage, str(path), item)
        return manifest

    def read_optional(self, run_id: str, stage: str, item: str | None = None) -> StageManifest | None:
        try:
            return self.read(run_id, stage, item)
        except FileNotFoundError:
            return None

    def read_item(self, run_id: str, item: str) -> ItemRecord:
        item_dirname(item)
        found = self._logged(run_id, item, itemlog.ITEM_KEY)
        if found is not None:
            data, where = found
        else:
            path = self.layout.item_record_path(run_id, item)
            data, where = path.read_bytes(), str(path)
        record: ItemRecord = decode_record(data, ItemRecord, where)
        if record.run_id != run_id or record.item != item:
            raise CorruptRecordError(f"{where}: records run {record.run_id!r} item {record.item!r}",
                                     path=where)
        return record

    def read_item_optional(self, run_id: str, item: str) -> ItemRecord | None:
        try:
            return self.read_item(run_id, item)
        except FileNotFoundError:
            return None

    def items(self, run_id: str) -> list[str]:
        """Item ids that have a record or manifest in the run's item log, or a format-2 item
        folder, sorted; other entries of `items/` are strays."""
        found = {item for item, ok in self._item_entries(run_id) if ok}
        found.update(self._log(run_id).items())
        return sorted(found)

    def item_strays(self, run_id: str) -> list[str]:
        return sorted(name for name, ok in self._item_entries(run_id) if not ok)

    def _item_entries(self, run_id: str) -> list[tuple[str, bool]]:
        found = []
        try:
            entries = list(os.scandir(self.layout.items_dir(run_id)))
        except (FileNotFoundError, NotADirectoryError):
            return []
        for entry in entries:
            try:
                found.append((item_id(entry.name), entry.is_dir(follow_symlinks=False)))
            except InvalidNameError:
                found.append((entry.name, False))
        return [(name, ok) for name, ok in found]

    def read_run(self, run_id: str) -> RunRecord:
        path = self.layout.run_record_path(run_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RunNotFoundError(f"run {run_id!r} not found in {self.layout.root}",
                                   hint="`stagestore runs` lists the runs in this store") from None
        record: RunRecord = decode_record(data, RunRecord, str(path))
        if record.run_id != run_id:
            raise CorruptRecordError(f"{path}: records run {record.run_id!r}", path=str(path))
        return record

    def has_run(self, run_id: str) -> bool:
        return self.layout.run_dir(run_id).is_dir()

    def runs(self) -> list[str]:
        """Run ids in the store, oldest first by folder mtime, then name."""
        root = self.layout.runs
        if not root.is_dir():
            return []
        found = []
        for entry in os.scandir(root):
            if entry.is_dir(follow_symlinks=False):
                try:
                    validate_name(entry.name)
                except InvalidNameError:
                    continue
                found.append((entry.name, entry.stat().st_mtime_ns))
        return [name for name, _ in sorted(found, key=lambda item: (item[1], item[0]))]

    def stages(self, run_id: str, item: str | None = None) -> list[str]:
        """Stage names that have a manifest in the run or item (decodable or not), sorted."""
        found = {name for name, ok in self._entries(run_id, item) if ok}
        if item is not None:
            for stage, entry in self._log(run_id).of_item(item).items():
                if stage == itemlog.ITEM_KEY:
                    continue
                if entry.kind == itemlog.KIND_REMOVED:
                    found.discard(stage)
                else:
                    found.add(stage)
        return sorted(found)

    def strays(self, run_id: str, item: str | None = None) -> list[str]:
        """Entries of a run or item folder that are neither its record, a stage manifest nor
        (in the run's folder) an item log segment."""
        return sorted(name for name, ok in self._entries(run_id, item) if not ok)

    def _entries(self, run_id: str, item: str | None = None) -> list[tuple[str, bool]]:
        folder = self.layout.scope_dir(run_id, item)
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = []
        for entry in entries:
            if entry.name == ("_run.json" if item is None else "_item.json"):
                continue
            if item is None and entry.name == ITEMS_DIR and entry.is_dir(follow_symlinks=False):
                continue
            if item is None and itemlog.SEGMENT_RE.fullmatch(entry.name) and \
                    entry.is_file(follow_symlinks=False):
                continue
            stage = entry.name[:-5] if entry.name.endswith(".json") else None
            try:
                ok = stage is not None and validate_name(stage) == stage and entry.is_file()
            except InvalidNameError:
                ok = False
            found.append((stage if ok else entry.name, ok))
        return found

    def scopes(self, run_id: str) -> list[str | None]:
        """The run itself (None), then each of its items."""
        return [None, *self.items(run_id)]

    def iter_manifests(self, run_ids: list[str] | None = None) -> Iterator[
            tuple[str, str | None, str, StageManifest | Exception]]:
        """(run, item, stage, manifest or the error decoding it) for every manifest in the
        store (or in `run_ids`); item is None for a stage that runs once per run."""
        for run_id in self.runs() if run_ids is None else run_ids:
            for item in self.scopes(run_id):
                for stage in self.stages(run_id, item):
                    try:
                        yield run_id, item, stage, self.read(run_id, stage, item)
                    except (OSError, StagestoreError) as exc:  # corrupt, newer, unreadable
                        yield run_id, item, stage, exc


def check_manifest(manifest: StageManifest, run_id: str, stage: str, where: str,
                   item: str | None = None) -> None:
    """The checks msgspec's types cannot express: names, digests, self-consistency."""

    def bad(message: str) -> CorruptRecordError:
        return CorruptRecordError(f"{where}: {message}", path=where)

    if manifest.run_id != run_id or manifest.stage != stage or manifest.item != item:
        raise bad(f"records run {manifest.run_id!r} stage {manifest.stage!r}"
                  + (f" item {manifest.item!r}" if manifest.item is not None else ""))
    try:
        for name in manifest.outputs:
            validate_name(name, "output name")
        for name in manifest.upstream:
            validate_name(name, "upstream stage")
        for key in manifest.inputs:
            parts = key.split(".")
            if not ((len(parts) == 2 and parts[0] == "inputs") or
                    (len(parts) == 3 and parts[0] == "upstream")):
                raise InvalidNameError(f"input key {key!r} is neither inputs.NAME nor upstream.STAGE.NAME")
            for part in parts[1:]:
                if key != "inputs._code":
                    validate_name(part, "input key part")
    except InvalidNameError as exc:
        raise bad(str(exc)) from None
    refs = [*manifest.outputs.values(), *manifest.inputs.values()]
    hashes = [manifest.input_hash, manifest.config_hash, *(r.hash for r in refs)]
    hashes += [log.stdout for log in manifest.logs] + [log.stderr for log in manifest.logs]
    if manifest.output_hash is not None:
        hashes.append(manifest.output_hash)
    for value in hashes:
        if not is_digest(value):
            raise bad(f"{value!r} is not a blake3 digest")
    if manifest.status in ("succeeded", "degraded", "disabled"):
        if manifest.output_hash != output_hash(manifest.outputs):
            raise bad("output_hash does not match its outputs")
    if manifest.status == "disabled" and (manifest.attempts or manifest.failure is not None):
        raise bad("a disabled manifest records attempts or a failure")
    if manifest.status == "succeeded" and manifest.failure is not None:
        raise bad("a succeeded manifest carries a failure")
    if manifest.status == "degraded" and (manifest.failure is None or manifest.degraded_from is None):
        raise bad("a degraded manifest must carry its failure and the run it fell back to")
    if manifest.status == "failed" and (manifest.output_hash is not None or manifest.outputs):
        raise bad("a failed manifest carries outputs")


def output_hash(outputs: dict) -> str:
    return digest_canonical(sorted((name, ref.hash) for name, ref in outputs.items()))


def indexed(manifest: StageManifest) -> bool:
    """Whether the cache index should hold the manifest's key: a succeeded result that was
    executed (it has attempts) or reused (`cached_from`).  A passthrough stage's, which costs
    nothing to redo, never gets an entry."""
    return manifest.status == "succeeded" and (bool(manifest.logs) or manifest.cached_from is not None)


def cache_key(input_hash: str, config_hash: str) -> str:
    return digest_canonical(["stagestore-cache-key", input_hash, config_hash])


class CacheIndex:
    """`cache/<xx>/<rest>.json`: (input_hash, config_hash) -> run holding a succeeded manifest."""

    def __init__(self, layout: StoreLayout, manifests: ManifestStore) -> None:
        self.layout = layout
        self.manifests = manifests

    def record(self, manifest: StageManifest, owner: str) -> None:
        if manifest.status != "succeeded":
            return
        path = self.layout.cache_entry_path(cache_key(manifest.input_hash, manifest.config_hash))
        durable.makedirs(path.parent)
        # Not synced: the index is derived (docs/format.md, invariant 11).  After a power loss an
        # entry may be missing, torn or older, which a lookup takes as a miss and `recover`
        # rebuilds from the manifests.  Its two fsyncs were a tenth of an item run's time.
        self._write(manifest, path, owner, sync=False)

    def lookup(self, input_hash: str, config_hash: str) -> StageManifest | None:
        """A succeeded manifest with these keys, or None; a stale entry is a miss."""
        path = self.layout.cache_entry_path(cache_key(input_hash, config_hash))
        try:
            entry: CacheEntry = decode_record(path.read_bytes(), CacheEntry, str(path))
            manifest = self.manifests.read(entry.run_id, entry.stage, entry.item)
        except (OSError, CorruptRecordError, InvalidNameError):
            return None
        except FormatVersionError:  # a newer-format manifest: not ours to reuse
            return None
        if (manifest.status == "succeeded" and manifest.input_hash == input_hash
                and manifest.config_hash == config_hash):
            return manifest
        return None

    # --- rebuilding from the manifests (gc, recover, forget; verify reports) ---

    def entry_paths(self) -> list[Path]:
        """Every file in a shard folder of `cache/`, sorted."""
        found = []
        try:
            shards = list(os.scandir(self.layout.cache))
        except FileNotFoundError:
            return []
        for shard in shards:
            if not shard.is_dir(follow_symlinks=False):
                continue
            found += [Path(e.path) for e in os.scandir(shard.path) if e.is_file(follow_symlinks=False)]
        return sorted(found)

    def check(self, path: Path, known: Mapping[Location, str | None] | None = None) -> StaleEntry | None:
        """What is wrong with the entry at `path`, or None when it leads to a succeeded manifest
        with its key (or is gone, or was written by a newer stagestore: not ours to judge).
        `known` maps manifests already read to their cache key (None: not succeeded)."""
        name = f"cache entry {path.parent.name}/{path.name}"
        key = _path_key(path)
        try:
            entry: CacheEntry = decode_record(path.read_bytes(), CacheEntry, str(path))
        except FileNotFoundError:
            return None
        except FormatVersionError:
            return None
        except (OSError, StagestoreError) as exc:
            reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else exc.message
            return StaleEntry(path, "cache_entry_invalid", f"{name} cannot be read: {reason}", key,
                              None)
        own = cache_key(entry.input_hash, entry.config_hash)
        if key != own:
            return StaleEntry(path, "cache_entry_invalid",
                              f"{name} is filed under a key that is not its own", key, entry)
        where = f"run {entry.run_id}" + (f" item {entry.item!r}" if entry.item is not None else "") \
            + f" stage {entry.stage}"
        location = (entry.run_id, entry.item, entry.stage)
        if known is not None and location in known:
            found = known[location]
        else:
            try:
                manifest = self.manifests.read(entry.run_id, entry.stage, entry.item)
            except FileNotFoundError:
                return StaleEntry(path, "cache_entry_stale",
                                  f"{name} names {where}, whose manifest does not exist", key, entry)
            except FormatVersionError:
                return None
            except (OSError, StagestoreError):
                return StaleEntry(path, "cache_entry_stale",
                                  f"{name} names {where}, whose manifest cannot be read", key, entry)
            found = cache_key(manifest.input_hash, manifest.config_hash) \
                if manifest.status == "succeeded" else None
        if found != own:
            return StaleEntry(path, "cache_entry_stale", f"{name} names {where}, whose manifest is "
                              "not a succeeded result with the entry's keys", key, entry)
        return None

    def stale(self, known: Mapping[Location, str | None] | None = None) -> list[StaleEntry]:
        """Entries that do not lead to a succeeded manifest with their key, except those naming
        a run a live process holds: it writes an entry before the manifest that entry names."""
        found = []
        for path in self.entry_paths():
            wrong = self.check(path, known)
            if wrong is not None and not (wrong.entry is not None and _names_live_run(
                    self.layout, wrong.entry.run_id)):
                found.append(wrong)
        return found

    def results(self) -> dict[str, StageManifest]:
        """Cache key -> the succeeded manifest a rebuilt entry names.  Of several with one key,
        the one of the run whose record says it started last (a run whose record cannot be
        read counts as older than any other); then the greatest (run id, item, stage)."""
        started: dict[str, float] = {}
        best: dict[str, tuple[tuple[float, str, str, str], StageManifest]] = {}
        for run_id, item, stage, manifest in self.manifests.iter_manifests():
            if isinstance(manifest, Exception) or manifest.status != "succeeded":
                continue
            if run_id not in started:
                try:
                    started[run_id] = self.manifests.read_run(run_id).started_at.timestamp()
                except StagestoreError:
                    started[run_id] = float("-inf")
            rank = (started[run_id], run_id, item or "", stage)
            key = cache_key(manifest.input_hash, manifest.config_hash)
            if key not in best or rank > best[key][0]:
                best[key] = (rank, manifest)
        return {key: manifest for key, (_, manifest) in best.items()}

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys, of those given, with no entry file: a power loss can lose an entry whose
        manifest is durable, since entries are not fsynced (invariant 11)."""
        return sorted(key for key in set(keys)
                      if not os.path.lexists(self.layout.cache_entry_path(key)))

    def rebuild(self, owner: str, *, dry_run: bool = False, lock_work: bool = True,
                fill_missing: bool = True) -> CacheRebuild:
        """Point each stale entry at the best run holding a succeeded manifest with its key
        (`results`), or remove it when none does; with `fill_missing`, write the entries that
        are missing (`forget`, which only removes manifests, leaves none missing).  The caller
        holds `owner`'s lock (its temps are written under that name).  With `lock_work`, each entry is checked again and
        rewritten under its key's work lock, which a run holds from executing a stage to
        writing its manifest, so an entry a run has just written is never undone; an entry
        whose work lock is busy is left to that run.  gc holds the store lock exclusively and
        needs none."""
        stale = self.stale()
        results = self.results() if stale or fill_missing else {}
        missing = self.missing(k for k, m in results.items() if indexed(m)) if fill_missing else []
        if not stale and not missing:
            return CacheRebuild(0, 0)
        rebuilt = removed = 0
        touched: set[Path] = set()
        for key in missing:
            if dry_run:
                rebuilt += 1
                continue
            lock = OwnerLock(self.layout, "work-" + digest_hex(key)) if lock_work else None
            if lock is not None and not lock.try_acquire():
                continue  # a run is executing that stage: it writes the entry itself
            try:
                path = self.layout.cache_entry_path(key)
                if os.path.lexists(path) or not self._holds(results[key], key):
                    continue
                durable.makedirs(path.parent)
                self._write(results[key], path, owner)
                rebuilt += 1
            finally:
                if lock is not None:
                    lock.release()
        for wrong in stale:
            replacement = results.get(wrong.key) if wrong.key is not None else None
            if dry_run:
                rebuilt, removed = rebuilt + (replacement is not None), removed + (replacement is None)
                continue
            lock = OwnerLock(self.layout, "work-" + digest_hex(wrong.key)) \
                if lock_work and wrong.key is not None else None
            if lock is not None and not lock.try_acquire():
                continue
            try:
                if lock is not None and self.check(wrong.path) is None:
                    continue  # a run rewrote it since the scan
                if replacement is not None and not self._holds(replacement, wrong.key):
                    replacement = None  # forgotten or replaced since the scan
                if replacement is not None:
                    self._write(replacement, wrong.path, owner)
                    rebuilt += 1
                else:
                    durable.unlink(wrong.path)
                    touched.add(wrong.path.parent)
                    removed += 1
            finally:
                if lock is not None:
                    lock.release()
        for folder in sorted(touched):
            durable.fsync_dir(folder)
        return CacheRebuild(rebuilt, removed)

    def _holds(self, manifest: StageManifest, key: str | None) -> bool:
        """Whether the manifest's file still holds a succeeded result with this key."""
        try:
            now = self.manifests.read(manifest.run_id, manifest.stage, manifest.item)
        except (OSError, StagestoreError):
            return False
        return now.status == "succeeded" and cache_key(now.input_hash, now.config_hash) == key

    def _write(self, manifest: StageManifest, path: Path, owner: str, *, sync: bool = True) -> None:
        entry = CacheEntry(run_id=manifest.run_id, item=manifest.item, stage=manifest.stage,
                           input_hash=manifest.input_hash, config_hash=manifest.config_hash)
        durable.write_file_atomic(path, encode_record(entry), self.layout.new_tmp_path(owner, "cache"),
                                  sync=sync)


CACHE_OWNER = "forget"
"""The cache-index lock: held by `forget` from its first deletion to the end of its repair, and
by `gc` and `recover` while they rebuild; `forget` and `gc` also write their temps under it."""

Location = tuple[str, "str | None", str]
"""(run id, item, stage): where a manifest is."""


class StaleEntry(NamedTuple):
    """A cache entry that does not lead to a succeeded manifest with its key."""

    path: Path
    kind: str  # cache_entry_invalid (cannot be read, or filed under another key), cache_entry_stale
    problem: str
    key: str | None  # the cache key its path stands for; None for a name that is not one
    entry: CacheEntry | None  # as decoded, when it decodes


class CacheRebuild(NamedTuple):
    rebuilt: int  # entries pointed at another manifest with their key
    removed: int  # entries no manifest could replace


_ENTRY_NAME = re.compile(r"[0-9a-f]{62}\.json")
_SHARD_NAME = re.compile(r"[0-9a-f]{2}")


def _path_key(path: Path) -> str | None:
    if _SHARD_NAME.fullmatch(path.parent.name) and _ENTRY_NAME.fullmatch(path.name):
        return PREFIX + path.parent.name + path.name[:-len(".json")]
    return None


def _names_live_run(layout: StoreLayout, run_id: str) -> bool:
    try:
        return owner_is_live(layout, run_owner(validate_name(run_id)))
    except InvalidNameError:
        return False
