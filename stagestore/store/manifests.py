"""`runs/` and `cache/`: stage manifests, run records and the cache index.

A manifest is the commit point of a stage: it is written last, through a temp file, fsync and
rename, after every object it names is durable.  The cache index (`cache/`) maps a stage's
(input_hash, config_hash) to the run holding a succeeded manifest for it; it is derived data,
checked against the manifest on every lookup, so a stale or lost entry can cost a re-execution
but never return a wrong result.  A lookup never scans other runs: rebuilding stale entries from
the manifests is the job of `gc`, `recover` and `forget` (`CacheIndex.rebuild`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

from ..errors import (CorruptRecordError, FormatVersionError, InvalidNameError, RunNotFoundError,
                      StagestoreError)
from ..model.records import (CacheEntry, ItemRecord, RunRecord, StageManifest, decode_record,
                             encode_record)
from . import durable
from .hashing import PREFIX, digest_canonical, digest_hex, is_digest
from .layout import ITEMS_DIR, StoreLayout, item_id, run_owner, validate_name
from .locking import OwnerLock, owner_is_live


class ManifestStore:
    """Reads and writes `runs/<run_id>/<stage>.json`, `runs/<run_id>/_run.json` and, for item
    runs, `runs/<run_id>/items/<item>/<stage>.json` and `.../_item.json`."""

    def __init__(self, layout: StoreLayout) -> None:
        self.layout = layout

    # --- writing ---

    def _ensure_run_dir(self, run_id: str) -> Path:
        run_dir = self.layout.run_dir(run_id)
        durable.mkdir(run_dir)
        return run_dir

    def _ensure_scope_dir(self, run_id: str, item: str | None) -> Path:
        self._ensure_run_dir(run_id)
        if item is None:
            return self.layout.run_dir(run_id)
        scope = self.layout.scope_dir(run_id, item)
        durable.mkdir(scope.parent)
        durable.mkdir(scope)
        return scope

    def sync_scope(self, run_id: str, item: str | None) -> None:
        """Make the entries of a run's (or an item's) folder durable, and the folder's own."""
        durable.fsync_dir(self._ensure_scope_dir(run_id, item))

    def write(self, manifest: StageManifest, owner: str) -> Path:
        self._ensure_scope_dir(manifest.run_id, manifest.item)
        path = self.layout.manifest_path(manifest.run_id, manifest.stage, manifest.item)
        durable.write_file_atomic(path, encode_record(manifest),
                                  self.layout.new_tmp_path(owner, "manifest"))
        return path

    def install(self, run_id: str, item: str | None, name: str, data: bytes, owner: str) -> Path:
        """Write a record pulled from a remote byte for byte: `<stage>.json`, `_item.json` or
        `_run.json` of the run's (or the item's) folder.  The caller has decoded and checked
        it, and made every object it names durable."""
        scope = self._ensure_scope_dir(run_id, item)
        path = scope / name
        durable.write_file_atomic(path, data, self.layout.new_tmp_path(owner, "pulled"))
        return path

    def write_item(self, record: ItemRecord, owner: str) -> Path:
        self._ensure_scope_dir(record.run_id, record.item)
        path = self.layout.item_record_path(record.run_id, record.item)
        durable.write_file_atomic(path, encode_record(record),
                                  self.layout.new_tmp_path(owner, "item"))
        return path

    def write_run(self, record: RunRecord, owner: str) -> Path:
        self._ensure_run_dir(record.run_id)
        path = self.layout.run_record_path(record.run_id)
        durable.write_file_atomic(path, encode_record(record),
                                  self.layout.new_tmp_path(owner, "run"))
        return path

    def delete_run(self, run_id: str, owner: str) -> None:
        """Remove a run at once: its folder is renamed into `tmp/` (one atomic step), then
        deleted.  A crash in between leaves an orphaned temp, never a half-forgotten run."""
        grave = self.layout.new_tmp_path(owner, "forgotten")
        durable.rename(self.layout.run_dir(run_id), grave)
        durable.fsync_dir(self.layout.runs)
        durable.rmtree(grave)

    # --- reading ---

    def read(self, run_id: str, stage: str, item: str | None = None) -> StageManifest:
        path = self.layout.manifest_path(run_id, stage, item)
        manifest: StageManifest = decode_record(path.read_bytes(), StageManifest, str(path))
        check_manifest(manifest, run_id, stage, str(path), item)
        return manifest

    def read_optional(self, run_id: str, stage: str, item: str | None = None) -> StageManifest | None:
        try:
            return self.read(run_id, stage, item)
        except FileNotFoundError:
            return None

    def read_item(self, run_id: str, item: str) -> ItemRecord:
        path = self.layout.item_record_path(run_id, item)
        record: ItemRecord = decode_record(path.read_bytes(), ItemRecord, str(path))
        if record.run_id != run_id or record.item != item:
            raise CorruptRecordError(f"{path}: records run {record.run_id!r} item {record.item!r}",
                                     path=str(path))
        return record

    def read_item_optional(self, run_id: str, item: str) -> ItemRecord | None:
        try:
            return self.read_item(run_id, item)
        except FileNotFoundError:
            return None

    def items(self, run_id: str) -> list[str]:
        """Item ids that have a folder in the run, sorted by folder name; others are strays."""
        return sorted(item for item, ok in self._item_entries(run_id) if ok)

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
        """Stage names that have a manifest file in the run or item (decodable or not), sorted."""
        return sorted(name for name, ok in self._entries(run_id, item) if ok)

    def strays(self, run_id: str, item: str | None = None) -> list[str]:
        """Entries of a run or item folder that are neither its record nor a stage manifest."""
        return sorted(name for name, ok in self._entries(run_id, item) if not ok)

    def _entries(self, run_id: str, item: str | None = None) -> list[tuple[str, bool]]:
        folder = self.layout.scope_dir(run_id, item)
        if not folder.is_dir():
            return []
        found = []
        for entry in os.scandir(folder):
            if entry.name == ("_run.json" if item is None else "_item.json"):
                continue
            if item is None and entry.name == ITEMS_DIR and entry.is_dir(follow_symlinks=False):
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
        entry = CacheEntry(run_id=manifest.run_id, item=manifest.item, stage=manifest.stage,
                           input_hash=manifest.input_hash, config_hash=manifest.config_hash)
        durable.write_file_atomic(path, encode_record(entry), self.layout.new_tmp_path(owner, "cache"))

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

    def rebuild(self, owner: str, *, dry_run: bool = False, lock_work: bool = True) -> CacheRebuild:
        """Point each stale entry at the best run holding a succeeded manifest with its key
        (`results`), or remove it when none does.  The caller holds `owner`'s lock (its temps
        are written under that name).  With `lock_work`, each entry is checked again and
        rewritten under its key's work lock, which a run holds from executing a stage to
        writing its manifest, so an entry a run has just written is never undone; an entry
        whose work lock is busy is left to that run.  gc holds the store lock exclusively and
        needs none."""
        stale = self.stale()
        if not stale:
            return CacheRebuild(0, 0)
        results = self.results()
        rebuilt = removed = 0
        touched: set[Path] = set()
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

    def _write(self, manifest: StageManifest, path: Path, owner: str) -> None:
        entry = CacheEntry(run_id=manifest.run_id, item=manifest.item, stage=manifest.stage,
                           input_hash=manifest.input_hash, config_hash=manifest.config_hash)
        durable.write_file_atomic(path, encode_record(entry), self.layout.new_tmp_path(owner, "cache"))


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
