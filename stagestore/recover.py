"""`recover`: remove orphaned temps and complete interrupted runs, idempotently.

Recover never touches what a live process owns: a temp is removed only while recover holds its
owner's lock, and a run is completed only while recover holds the run's lock.  Runs are
completed with the definition and input snapshots they recorded when they started, not with the
pipeline file as it is now.  A second call after a successful one finds nothing to do.
"""

from __future__ import annotations

from . import durable
from .errors import RunBusyError, StagestoreError
from .layout import StoreLayout, run_owner
from .locking import OwnerLock, owner_locked, store_lock
from .records import RunRecord
from .reports import RecoverAction, RecoverReport, RunReport
from .runner import ProgressCallback, resume
from .store import Store
from .verify import orphaned_temps


def recover(store: Store, *, run_id: str | None = None, dry_run: bool = False, jobs: int = 1,
            progress: ProgressCallback | None = None) -> RecoverReport:
    with store_lock(store.layout, exclusive=False):
        actions: list[RecoverAction] = []
        unresolved: list[str] = []
        runs: list[RunReport] = []
        _remove_orphans(store.layout, dry_run, actions)
        run_ids = [run_id] if run_id else store.manifests.runs()
        if run_id and not store.manifests.has_run(run_id):
            store.manifests.read_run(run_id)  # raises RunNotFoundError with its hint
        for rid in run_ids:
            _recover_run(store, rid, dry_run, jobs, progress, actions, runs, unresolved)
        return RecoverReport(ok=not unresolved, dry_run=dry_run, actions=actions, runs=runs,
                             unresolved=unresolved)


def _remove_orphans(layout: StoreLayout, dry_run: bool, actions: list[RecoverAction]) -> None:
    by_owner: dict[str | None, list] = {}
    for entry, owner in orphaned_temps(layout):
        by_owner.setdefault(owner, []).append(entry)
    for owner, entries in by_owner.items():
        lock = OwnerLock(layout, owner) if owner is not None else None
        if lock is not None and not lock.try_acquire():
            continue  # its owner came back to life since the scan: not an orphan any more
        try:
            for entry in entries:
                actions.append(RecoverAction(action="remove_temp", path=entry.path,
                                             message=f"removed orphaned temp {entry.name}"))
                if not dry_run:
                    durable.rmtree(entry.path)
        finally:
            if lock is not None:
                lock.release()
    if by_owner and not dry_run:
        durable.fsync_dir(layout.tmp)


def _incomplete_stages(store: Store, record: RunRecord) -> list[str]:
    """Selected stages without a readable succeeded manifest whose outputs are all present."""
    todo = []
    for stage in record.selected:
        try:
            manifest = store.manifests.read_optional(record.run_id, stage)
        except StagestoreError:
            manifest = None
        if manifest is None or manifest.status != "succeeded" or not all(
                store.objects.exists(ref.hash) for ref in manifest.outputs.values()):
            todo.append(stage)
    return todo


def _recover_run(store: Store, run_id: str, dry_run: bool, jobs: int,
                 progress: ProgressCallback | None, actions: list[RecoverAction],
                 runs: list[RunReport], unresolved: list[str]) -> None:
    manifests = store.manifests
    try:
        with owner_locked(store.layout, run_owner(run_id), f"run {run_id!r}"):
            if not manifests.layout.run_record_path(run_id).exists():
                if manifests.stages(run_id):
                    unresolved.append(f"run {run_id}: manifests without a run record; "
                                      "it cannot be completed")
                    return
                # A run that crashed before its record was written has nothing to complete.
                actions.append(RecoverAction(action="remove_empty_run", run_id=run_id,
                                             message=f"removed run {run_id}, which never started"))
                if not dry_run:
                    durable.rmtree(manifests.layout.run_dir(run_id))
                    durable.fsync_dir(manifests.layout.runs)
                return
            try:
                record = manifests.read_run(run_id)
            except StagestoreError as exc:
                unresolved.append(f"run {run_id}: {exc.message}")
                return
            todo = _incomplete_stages(store, record)
            if not todo and record.finished_at is not None:
                return
            message = (f"completed run {run_id}: " + ", ".join(todo) if todo
                       else f"recorded the end of run {run_id}")
            actions.append(RecoverAction(action="complete_run", run_id=run_id, message=message))
            if dry_run:
                return
            report = resume(store, run_id, jobs=jobs, progress=progress)
            runs.append(report)
            for stage in report.stages:
                if stage.outcome in ("failed", "skipped"):
                    why = stage.failure.signal.splitlines()[-1] if stage.failure else stage.reason
                    unresolved.append(f"run {run_id} stage {stage.stage}: {stage.outcome}: {why}")
    except RunBusyError:
        actions.append(RecoverAction(action="skip_live_run", run_id=run_id,
                                     message=f"skipped run {run_id}: a live process is running it"))
