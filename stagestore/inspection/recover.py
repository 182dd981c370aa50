"""`recover`: bring the store back to a state `verify` passes, idempotently.

Recover plans from verify's findings (it runs the same checks, re-hashing every object):

1. orphaned temps are removed, each while recover holds its owner's lock;
2. objects whose bytes do not match their name are removed: they lie;
3. per run (each while recover holds the run's lock, so a live run is never touched):
   input snapshots that are missing are restored from the workspace when it still holds the
   same content; manifests that name missing objects or disagree with their upstream are
   removed; then the run is completed with the definition and input snapshots it recorded
   when it started, reusing identical work, so every stage without a succeeded manifest
   (missing, failed, damaged) is executed again.  In an item run, items that had not ended are
   taken through their stages; items that ended keep their outcome and first failure, unless
   one of their manifests was damaged, in which case the item is taken again.

A second call after a successful one finds nothing to do.  What cannot be completed (a stage
that fails again, a snapshot whose content is gone) is reported, and the exit code says so.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from ..errors import FormatVersionError, RunBusyError, StagestoreError
from ..execution.runner import ProgressCallback, resume
from ..model.records import ArtifactRef, RunRecord, StageManifest
from ..model.reports import RecoverAction, RecoverReport, RunReport
from ..pipeline.model import CODE_INPUT, code_path, item_stages
from ..pipeline.syntax import render_item_path
from ..store import durable, unsynced
from ..store.hashing import hash_file
from ..store.layout import TMP_SEP, StoreLayout, run_owner
from ..store.locking import OwnerLock, owner_is_live, owner_locked, store_lock
from ..store.manifests import CACHE_OWNER, CacheRebuild
from ..store.objects import SyncBatch
from ..store.store import Store
from ..store.trees import artifact_present, describe_artifact, store_tree
from .verify import BytesProgress, Verifier, orphaned_temps


RECOVER_OWNER = "recover"


def recover(store: Store, *, run_id: str | None = None, dry_run: bool = False, jobs: int = 1,
            progress: ProgressCallback | None = None,
            hash_progress: BytesProgress | None = None) -> RecoverReport:
    """Remove orphaned temps and complete interrupted runs (all, or only `run_id`), as they
    were defined.  Re-hashes every object as `verify` does and plans from what it finds:
    damaged objects are removed and manifests naming them are redone.  Idempotent.  With
    `dry_run`, says what it would do and changes nothing.  Raises `RunNotFoundError` for an
    unknown `run_id`; what could not be completed is in the report's `unresolved`."""
    with store_lock(store.layout, exclusive=False), \
            owner_locked(store.layout, RECOVER_OWNER, "recover"):
        plan = _Recovery(store, dry_run, jobs, progress)
        if run_id and not store.manifests.has_run(run_id):
            store.manifests.read_run(run_id)  # raises RunNotFoundError with its hint
        plan.remove_orphans()
        findings = Verifier(store, [], hash_progress, cache_index=False).run()
        plan.remove_corrupt_objects({f.object for f in findings.problems
                                     if f.kind == "object_corrupt" and f.object})
        plan.remove_unsynced_markers()
        plan.repair_views({f.object for f in findings.warnings
                           if f.kind == "view_damaged" and f.object})
        for rid in [run_id] if run_id else store.manifests.runs():
            plan.recover_run(rid)
        cache = plan.rebuild_cache_index()
        return RecoverReport(ok=not plan.unresolved, dry_run=dry_run, actions=plan.actions,
                             runs=plan.runs, unresolved=plan.unresolved,
                             cache_entries_rebuilt=cache.rebuilt,
                             cache_entries_removed=cache.removed)


class _Recovery:
    def __init__(self, store: Store, dry_run: bool, jobs: int,
                 progress: ProgressCallback | None) -> None:
        self.store = store
        self.layout: StoreLayout = store.layout
        self.dry_run = dry_run
        self.jobs = jobs
        self.progress = progress
        self.actions: list[RecoverAction] = []
        self.unresolved: list[str] = []
        self.runs: list[RunReport] = []
        self._removed: set[str] = set()
        self._shared: dict[str, StageManifest] = {}

    def act(self, action: str, done: str, planned: str, **where: str | None) -> None:
        self.actions.append(RecoverAction(action=action, message=planned if self.dry_run else done,
                                          **where))

    # --- temps and objects ---

    def remove_orphans(self) -> None:
        by_owner: dict[str | None, list] = {}
        for entry, owner in orphaned_temps(self.layout):
            by_owner.setdefault(owner, []).append(entry)
        # This recover holds the `recover` owner lock, so `orphaned_temps` sees that owner as
        # live; but it has made no temp yet, and recovers never overlap: every `recover~` temp
        # is an earlier recover's, one that died (a crash inside a recover).
        mine = [entry for entry in sorted(os.scandir(self.layout.tmp), key=lambda e: e.name)
                if StoreLayout.tmp_owner(entry.name) == RECOVER_OWNER] \
            if self.layout.tmp.is_dir() else []
        for owner, entries in [*by_owner.items(), *([(RECOVER_OWNER, mine)] if mine else [])]:
            if owner == RECOVER_OWNER:  # ours: see above
                self._remove_temps(entries)
                continue
            lock = OwnerLock(self.layout, owner) if owner is not None else None
            if lock is not None and not lock.try_acquire():
                continue  # its owner came back to life since the scan: not an orphan any more
            try:
                self._remove_temps(entries)
            finally:
                if lock is not None:
                    lock.release()
        if (by_owner or mine) and not self.dry_run:
            durable.fsync_dir(self.layout.tmp)

    def remove_unsynced_markers(self) -> None:
        """Every object has been re-hashed and the damaged ones removed: the markers of writers
        that died with deferred writes (store/unsynced.py) have done their work."""
        for entry in unsynced.markers(self.layout):
            owner = StoreLayout.tmp_owner(entry.name)
            if owner is not None and owner != RECOVER_OWNER and owner_is_live(self.layout, owner):
                continue
            self.act("remove_temp", f"removed orphaned temp {entry.name}",
                     f"would remove orphaned temp {entry.name}", path=entry.path)
        if not self.dry_run:
            unsynced.remove_dead(self.layout)

    def _remove_temps(self, entries: list[os.DirEntry]) -> None:
        for entry in entries:
            if entry.name.endswith(TMP_SEP + unsynced.LABEL):
                continue  # a marker goes once the objects are checked: remove_unsynced_markers
            self.act("remove_temp", f"removed orphaned temp {entry.name}",
                     f"would remove orphaned temp {entry.name}", path=entry.path)
            if not self.dry_run:
                durable.rmtree(entry.path)

    def remove_corrupt_objects(self, digests: set[str]) -> None:
        for digest in sorted(digests):
            path = self.store.objects.path(digest)
            self.act("remove_object", f"removed damaged object {digest}",
                     f"would remove damaged object {digest}", path=str(path))
            self._removed.add(digest)
            if self.dry_run:
                continue
            if len(self._removed) == 1:
                # The stat cache may name this object: forget it first (durably), as gc does, so
                # that restoring a snapshot, and every later one, hashes the workspace again
                # instead of taking a digest whose object is gone.
                self.store.objects.stat_cache.clear()
            # A run may rename a good copy over the damaged object at any moment, so the object
            # is first moved aside (one atomic step) and hashed again there: a good copy goes
            # back, only a damaged one is deleted.
            aside = self.layout.new_tmp_path(RECOVER_OWNER, "damaged")
            try:
                durable.rename(path, aside)
            except FileNotFoundError:
                continue
            durable.fsync_dir(path.parent)
            good = aside.is_file() and not aside.is_symlink() and hash_file(aside) == digest
            if good:
                durable.rename(aside, path)
                durable.fsync_dir(path.parent)
                self._removed.discard(digest)
            else:
                durable.rmtree(aside)

    def repair_views(self, damaged: set[str]) -> None:
        """Views are derived: after a damaged object was removed every view goes (one may hold
        the damaged inode); otherwise views that differ from their tree go, and views used by
        attempts that died are checked in full."""
        from ..store.views import ViewStore

        views = ViewStore(self.store.objects)
        if self._removed:
            for name in views.names():
                self.act("remove_view", f"removed view {name} (objects were damaged)",
                         f"would remove view {name} (objects were damaged)",
                         path=str(self.layout.views / name))
            if not self.dry_run:
                views.discard_all(RECOVER_OWNER)
            return
        for digest in sorted(damaged):
            name = digest.partition(":")[2]
            self.act("remove_view", f"removed damaged view {name}",
                     f"would remove damaged view {name}", path=str(self.layout.views / name))
            if not self.dry_run:
                views.discard_all_of(name, RECOVER_OWNER)
        if self.dry_run:
            return
        for name in views.names():
            done = views.repair(name, RECOVER_OWNER)
            if done is not None:
                self.act("check_view", f"{done} view {name}, which an interrupted attempt used",
                         f"would check view {name}", path=str(self.layout.views / name))

    def _present(self, digest: str) -> bool:
        return digest not in self._removed and self.store.objects.exists(digest)

    def missing(self, ref: ArtifactRef) -> bool:
        """Whether the artifact, or any file of it, is gone (or about to be removed)."""
        return not artifact_present(self.store.objects, ref, gone=self._removed.__contains__)

    # --- the cache index ---

    def rebuild_cache_index(self) -> CacheRebuild:
        """Last, so that it sees the manifests this recover removed and wrote.  Runs may be
        writing entries meanwhile: each is rewritten under its key's work lock.  A `forget`
        holds the cache-index lock from its first deletion to the end of its own repair: the
        entries naming its runs are its to repair, so then the index is left to it."""
        lock = OwnerLock(self.layout, CACHE_OWNER)
        if not lock.try_acquire():
            return CacheRebuild(0, 0)
        try:
            done = self.store.cache.rebuild(RECOVER_OWNER, dry_run=self.dry_run)
        finally:
            lock.release()
        parts, planned = [], []
        if done.rebuilt:
            parts.append(f"pointed {done.rebuilt} cache entries at runs that hold the same results")
            planned.append(f"would point {done.rebuilt} cache entries at runs that hold the "
                           "same results")
        if done.removed:
            parts.append(f"removed {done.removed} cache entries that no run's manifest can replace")
            planned.append(f"would remove {done.removed} cache entries that no run's manifest "
                           "can replace")
        if parts:
            self.act("rebuild_cache_index", "; ".join(parts), "; ".join(planned))
        return done

    # --- runs ---

    def recover_run(self, run_id: str) -> None:
        try:
            with owner_locked(self.layout, run_owner(run_id), f"run {run_id!r}"):
                try:
                    self._recover_run(run_id)
                finally:  # what it appended to the run's item log, durable
                    self.store.manifests.close_items(run_id)
        except RunBusyError:
            self.act("skip_live_run", f"skipped run {run_id}: a live process is running it",
                     f"would skip run {run_id}: a live process is running it", run_id=run_id)

    def _recover_run(self, run_id: str) -> None:
        manifests = self.store.manifests
        if not self.layout.run_record_path(run_id).exists():
            if manifests.stages(run_id):
                self.unresolved.append(f"run {run_id}: manifests without a run record; it cannot "
                                       f"be completed (`stagestore forget {run_id}` removes it)")
                return
            # A run that crashed before its record was written has nothing to complete.
            self.act("remove_empty_run", f"removed run {run_id}, which never started",
                     f"would remove run {run_id}, which never started", run_id=run_id)
            if not self.dry_run:
                durable.rmtree(self.layout.run_dir(run_id))
                durable.fsync_dir(self.layout.runs)
            return
        try:
            record = manifests.read_run(run_id)
        except StagestoreError as exc:
            self.unresolved.append(f"run {run_id}: {exc.message}")
            return
        self._cut_torn_tails(run_id)
        for path, offset, length in manifests.item_log_damage(run_id):
            self.unresolved.append(
                f"run {run_id}: {length} bytes at offset {offset} of {path} are damaged and the "
                "item records written there are lost; items whose records remain are checked "
                f"and completed as usual (`stagestore forget {run_id}` removes the run)")
        if not self._restore_snapshots(record):
            return
        todo = self._stages_to_redo(record)
        if todo is None:
            return
        items = self._items_to_redo(record)
        if items is None:
            return
        if items:
            todo.append(f"{len(items)} item(s)")
        if not todo and record.finished_at is not None:
            return
        self.act("complete_run",
                 f"completed run {run_id}: " + ", ".join(todo) if todo else f"recorded the end of run {run_id}",
                 f"would complete run {run_id}: " + ", ".join(todo) if todo
                 else f"would record the end of run {run_id}", run_id=run_id)
        if self.dry_run:
            return
        report = resume(self.store, run_id, jobs=self.jobs, progress=self.progress,
                        items=items if record.items else None)
        self.runs.append(report)
        for stage in report.stages:
            if stage.outcome in ("failed", "skipped"):
                why = stage.failure.signal.splitlines()[-1] if stage.failure else stage.reason
                self.unresolved.append(f"run {run_id} stage {stage.stage}: {stage.outcome}: {why}")
        for item in report.items:
            if item.status == "failed" and item.stages:  # taken again now, and failed again
                why = item.failure.signal.splitlines()[-1] if item.failure else ""
                self.unresolved.append(f"run {run_id} item {item.item!r} stage "
                                       f"{item.first_failure_stage}: failed: {why}")

    def _cut_torn_tails(self, run_id: str) -> None:
        """Cut the torn tails of the run's item log (appends a crash cut short): readers
        ignore them already; cut, they cannot hide records appended after them."""
        tails = self.store.manifests.item_log_tails(run_id)
        for path, offset, length in tails:
            self.act("cut_item_log", f"cut the torn tail of {path.name} ({length} bytes from "
                     f"offset {offset})", f"would cut the torn tail of {path.name} ({length} "
                     f"bytes from offset {offset})", run_id=run_id, path=str(path))
        if tails and not self.dry_run:
            self.store.manifests.cut_torn_tails(run_id, run_owner(run_id))

    def _restore_snapshots(self, record: RunRecord, inputs: dict | None = None,
                           item: str | None = None) -> bool:
        """Re-copy missing input snapshots (of the run, or of one item) from the workspace if
        it still has that content."""
        ok = True
        batch = SyncBatch()
        for stage, refs in (record.inputs if inputs is None else inputs).items():
            for name, ref in refs.items():
                if not self.missing(ref):
                    continue
                spec = record.definition.stages[stage]
                relpath = code_path(spec, ref.kind) if name == CODE_INPUT else spec.inputs[name]
                if item is not None:
                    relpath = render_item_path(relpath, item)
                source = Path(record.workdir) / relpath
                try:
                    found, listing = describe_artifact(source, f"input {name!r}")
                    same = found.hash == ref.hash
                except (StagestoreError, OSError):
                    same, listing = False, None
                if not same:
                    ok = False
                    self.unresolved.append(
                        f"run {record.run_id}: the snapshot of stage {stage} input {name!r} is "
                        f"damaged, and {source} no longer holds that content; the run cannot be "
                        f"completed (`stagestore forget {record.run_id}` removes it)")
                    continue
                self.act("restore_snapshot", f"restored snapshot of {stage} input {name!r} from {source}",
                         f"would restore snapshot of {stage} input {name!r} from {source}",
                         run_id=record.run_id, stage=stage)
                restored = {ref.hash} | {e.hash for e in (listing.entries if listing else ())
                                         if e.hash is not None}
                self._removed.difference_update(restored)
                if not self.dry_run:
                    owner = run_owner(record.run_id)
                    if source.is_dir():
                        store_tree(source, self.store.objects, owner, batch, move=False, what=name)
                    else:
                        self.store.objects.ingest_file(source, owner, batch)
        batch.flush()
        return ok

    def _stages_to_redo(self, record: RunRecord, item: str | None = None,
                        shared: dict[str, StageManifest] | None = None) -> list[str] | None:
        """Selected stages (of the run, or of one item) without a sound succeeded manifest;
        damaged manifests are removed."""
        manifests = self.store.manifests
        per_item = item_stages(record.definition.stages)
        todo: list[str] = []
        loaded: dict[str, StageManifest] = dict(shared or {})
        where = f"run {record.run_id}" + (f" item {item!r}" if item is not None else "")
        for stage in record.selected:
            if (stage in per_item) != (item is not None):
                continue
            try:
                manifest = manifests.read_optional(record.run_id, stage, item)
            except FormatVersionError as exc:
                self.unresolved.append(f"{where} stage {stage}: {exc.message}")
                return None
            except StagestoreError:
                manifest, damage = None, "it is not a valid manifest"
            else:
                if manifest is None or manifest.status not in ("succeeded", "disabled"):
                    todo.append(stage)
                    continue
                damage = self._damage(manifest, loaded)
            if damage:
                todo.append(stage)
                path = manifests.location(record.run_id, stage, item)
                self.act("remove_manifest", f"removed manifest of {where} stage "
                         f"{stage} ({damage}); the stage runs again",
                         f"would remove manifest of {where} stage {stage} ({damage}) "
                         "and run the stage again", run_id=record.run_id, stage=stage,
                         path=str(path))
                if not self.dry_run:
                    manifests.remove(record.run_id, stage, item, run_owner(record.run_id))
            elif manifest is not None:
                loaded[stage] = manifest
        if item is None:
            self._shared = loaded
        return todo

    def _items_to_redo(self, record: RunRecord) -> list[str] | None:
        """Items that did not end, and ended items whose manifests were damaged: those are set
        back to `running` (keeping their input snapshots) so that `resume` takes them again.
        Items that ended soundly are kept as they are, first failures included."""
        if not record.items:
            return []
        manifests = self.store.manifests
        redo = []
        for item in record.items:
            try:
                item_record = manifests.read_item_optional(record.run_id, item)
            except StagestoreError as exc:
                self.unresolved.append(f"run {record.run_id} item {item!r}: {exc.message}")
                return None
            # An item's snapshots are written without fsync (store/unsynced.py): after a power
            # loss its record can survive while they did not, whether it ended or not.
            if item_record is not None and \
                    not self._restore_snapshots(record, item_record.inputs, item):
                return None
            if item_record is None or item_record.status == "running":
                if record.finished_at is None and record.systemic is None:
                    redo.append(item)  # not an aborted run's: it is continued
                continue
            before = len(self.actions)
            if self._stages_to_redo(record, item, self._shared) is None:
                return None
            if any(a.action == "remove_manifest" for a in self.actions[before:]):
                redo.append(item)
                if not self.dry_run:
                    manifests.write_item(msgspec.structs.replace(
                        item_record, status="running", first_failure=None, finished_at=None),
                        run_owner(record.run_id))
        return redo

    def _damage(self, manifest: StageManifest, loaded: dict[str, StageManifest]) -> str | None:
        for name, ref in manifest.outputs.items():
            if self.missing(ref):
                return f"output {name!r} is missing or damaged"
        for log in manifest.logs:
            if not (self._present(log.stdout) and self._present(log.stderr)):
                return f"the logs of attempt {log.attempt} are missing or damaged"
        for up, expected in manifest.upstream.items():
            if up in loaded and loaded[up].output_hash != expected:
                return f"it read outputs of {up} that {up}'s manifest no longer records"
        return None
