"""`forget` and `gc`: drop runs, then reclaim the objects nothing references any more.

gc holds the store lock exclusively, so no run, recover or verify is between writing objects
and writing the records that name them while it decides what is garbage.  It refuses to run
when any record cannot be read: it could not know what that record references.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from ..errors import StagestoreError, StoreError
from ..model.records import ArtifactRef
from ..model.reports import ForgetReport, GcReport
from ..store import durable
from ..store.layout import run_owner
from ..store.locking import OwnerLock, owner_locked, store_lock
from ..store.manifests import CACHE_OWNER
from ..store.store import Store
from ..store.trees import tree_objects
from ..store.views import ViewStore

# A view nobody has used for this long is removed by gc even when its tree is still referenced.
VIEW_IDLE_NS = 7 * 24 * 3600 * 10**9


def forget(store: Store, run_ids: Iterable[str]) -> ForgetReport:
    """Remove runs' manifests and records so gc can reclaim what only they referenced."""
    run_ids = list(dict.fromkeys(run_ids))
    for run_id in run_ids:
        if not store.manifests.has_run(run_id):
            store.manifests.read_run(run_id)  # raises RunNotFoundError
    with store_lock(store.layout, exclusive=False):
        # Held from before the first deletion to the end of the repair, so that a `recover`
        # beside it never takes the entries of a run being forgotten for stale ones and
        # repairs them itself.  Its holders never wait while they hold it, so waiting is safe.
        lock = OwnerLock(store.layout, CACHE_OWNER)
        while not lock.try_acquire():
            time.sleep(0.01)
        try:
            for run_id in run_ids:
                with owner_locked(store.layout, run_owner(run_id), f"run {run_id!r}"):
                    store.manifests.delete_run(run_id, run_owner(run_id))
            store.cache.rebuild(CACHE_OWNER, fill_missing=False)
        finally:
            lock.release()
    return ForgetReport(forgotten=run_ids)


def _refs_of(store: Store, ref: ArtifactRef, live: set[str]) -> None:
    live.add(ref.hash)
    if ref.kind == "tree" and store.objects.exists(ref.hash):
        live.update(tree_objects(store.objects, ref.hash))  # files and subtrees


def referenced_objects(store: Store) -> set[str]:
    """Every object some manifest or run record names; raises if any record is unreadable."""
    live: set[str] = set()
    for run_id in store.manifests.runs():
        if store.layout.run_record_path(run_id).exists():
            record = store.manifests.read_run(run_id)
            for refs in record.inputs.values():
                for ref in refs.values():
                    _refs_of(store, ref, live)
        for path, exc in store.manifests.item_log_invalid(run_id):
            raise StoreError(
                f"gc cannot read the item log {path} of run {run_id}: {exc.message}; it would "
                "not know which objects the records there reference",
                hint="run `stagestore verify`, then restore the file or `stagestore forget "
                     f"{run_id}`")
        for item in store.manifests.items(run_id):
            try:
                item_record = store.manifests.read_item_optional(run_id, item)
            except StagestoreError as exc:
                raise StoreError(
                    f"gc cannot read the record of run {run_id} item {item!r}: {exc.message}; it "
                    "would not know which input snapshots that record references",
                    hint="run `stagestore verify`, then `stagestore recover` or `stagestore "
                         f"forget {run_id}`") from None
            if item_record is not None:
                for refs in item_record.inputs.values():
                    for ref in refs.values():
                        _refs_of(store, ref, live)
    for run_id, item, stage, manifest in store.manifests.iter_manifests():
        if isinstance(manifest, Exception):
            where = f"stage {stage}" if item is None else f"item {item!r} stage {stage}"
            raise StoreError(
                f"gc cannot read the manifest of run {run_id} {where}: {manifest}; it would "
                "not know which objects that manifest references",
                hint="run `stagestore verify`, then `stagestore recover` or `stagestore forget "
                     f"{run_id}`")
        for ref in (*manifest.outputs.values(), *manifest.inputs.values()):
            _refs_of(store, ref, live)
        for log in manifest.logs:
            live.update((log.stdout, log.stderr))
    return live


def _remove_stale_run_locks(store: Store) -> None:
    """Lock files of runs that no longer exist, and the per-key work locks.  Safe only under the
    exclusive store lock: every process that takes a run or work lock holds the store lock
    shared first, so none can hold or be waiting for one now."""
    for entry in os.scandir(store.layout.locks):
        name = entry.name
        if name.startswith("work-") and name.endswith(".lock"):
            durable.unlink(entry.path)
        elif name.startswith("run-") and name.endswith(".lock"):
            run_id = name[len("run-"):-len(".lock")]
            try:
                exists = store.manifests.has_run(run_id)
            except StagestoreError:
                continue
            if not exists:
                durable.unlink(entry.path)


def _unused_views(store: Store, live: set[str]) -> list[str]:
    """Views of trees nothing references any more, or unused for `VIEW_IDLE_NS`.  Removing one
    is safe under the exclusive store lock: no attempt is using it, and nobody holds or waits
    for its lock."""
    views = ViewStore(store.objects)
    cutoff = time.time_ns() - VIEW_IDLE_NS
    return [name for name in views.names()
            if "blake3:" + name not in live or views.last_used_ns(name) < cutoff]


def store_busy(store: Store) -> bool:
    """Whether running stagestore processes hold the store now, so `gc` would wait for them."""
    from ..errors import RunBusyError

    try:
        with store_lock(store.layout, exclusive=True, timeout=0):
            return False
    except RunBusyError:
        return True


def gc(store: Store, *, dry_run: bool = False, timeout: float = -1) -> GcReport:
    """Delete every object no manifest or run record references."""
    with store_lock(store.layout, exclusive=True, timeout=timeout):
        live = referenced_objects(store)
        removed: list[str] = []
        freed = 0
        kept = 0
        touched = set()
        for digest in list(store.objects.list()):
            if digest in live:
                kept += 1
                continue
            path = store.objects.path(digest)
            try:
                freed += path.stat().st_size
            except FileNotFoundError:
                continue
            removed.append(digest)
            if not dry_run:
                if len(removed) == 1:
                    # The stat cache may name this object: forget it first (durably), so that
                    # no snapshot ever takes a digest whose object is gone.
                    store.objects.stat_cache.clear()
                store.objects.delete(digest)
                touched.add(path.parent)
        for folder in sorted(touched):
            durable.fsync_dir(folder)
        # Under the exclusive store lock no run is between writing an entry and its manifest,
        # so no work lock is needed; the cache-index owner names the temps.
        with owner_locked(store.layout, CACHE_OWNER, "the cache index"):
            cache = store.cache.rebuild(CACHE_OWNER, dry_run=dry_run, lock_work=False)
        views = _unused_views(store, live)
        if not dry_run:
            for hexname in views:
                ViewStore(store.objects).remove(hexname)
            _remove_stale_run_locks(store)
        return GcReport(dry_run=dry_run, objects_kept=kept, objects_removed=len(removed),
                        bytes_removed=freed, removed=removed, cache_entries_rebuilt=cache.rebuilt,
                        cache_entries_removed=cache.removed)
