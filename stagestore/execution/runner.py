"""`run`: execute a pipeline's stages in dependency order, reusing identical work.

A run first snapshots every workspace input it needs into the store and writes its run record
(`runs/<run_id>/_run.json`: the pipeline definition and those snapshots), so that a rerun or a
`recover` of the run sees exactly what the run started with.  Then each stage, once its upstream
stages have succeeded, is processed by `stagework.StageWork`: reused if identical work exists,
else executed with retries and fallbacks, its manifest written last.

An item run (`items`) first runs the stages that do not depend on the item, once, as a DAG; then
takes every item, in the order given, through the per-item stages in order, stopping an item at
its first failure (recorded in its item record the moment it happens).  In sampling mode a
systemic failure aborts the run.  Where the items run, and how many at once, is up to the item
scheduler (scheduler.py; the default, `LocalScheduler`, runs up to `jobs` in threads here),
which works through the run's `ItemHost` (`_Host` here); everything else about an item is
decided here.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from ..errors import ItemsNeededError, CorruptRecordError, OutputError, PipelineError, RunInterrupted, UsageError
from ..model.failures import INFRASTRUCTURE_GATE, UPSTREAM_MISSING
from ..model.records import (ArtifactRef, ExecutionOptions, FirstFailure, ItemRecord, PipelineRef,
                             RunRecord, StageManifest, SystemicFailure, decode_record, now)
from ..model.reports import ItemReport, PushReport, RunEvent, RunReport, StageReport
from ..pipeline.model import Pipeline, item_stages, stage_input_paths
from ..pipeline.syntax import placeholders, render_item_path
from ..store.layout import run_owner, validate_name
from ..store import durable, unsynced
from ..store.locking import owner_locked, store_lock
from ..store.objects import SyncBatch
from ..store.store import Store
from ..store.trees import store_tree
from . import processes
from .classify import runner_failure
from .resilience import CircuitBreaker, SystemicDetector
from .scheduler import ItemHost, ItemScheduler, LocalScheduler
from .stagework import ProgressCallback, StageWork

if TYPE_CHECKING:
    from ..remote.transfer import Transfer


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + os.urandom(3).hex()


def run(pipeline: Pipeline, store: Store, *, run_id: str | None = None,
        stages: Iterable[str] = (), jobs: int = 1, force: bool = False,
        items: list[str] | None = None, execution: ExecutionOptions | None = None,
        progress: ProgressCallback | None = None, remote: str | None = None,
        push: bool = False, scheduler: ItemScheduler | None = None) -> RunReport:
    """Run `stages` (all when empty) and whatever they need upstream, as run `run_id`; with
    `items`, every item through the stages that run per item (see `read_items`), on
    `scheduler` (None: `LocalScheduler`, a thread pool of `jobs` threads here;
    `dask.DaskScheduler` runs each item as a task on a Dask cluster).

    With `remote` (a remote's name), a stage whose keys have a succeeded manifest on that
    remote is reused from it (its outputs pulled) instead of executed; with `push`, each
    stage's result is pushed there as it commits, and the run's records when it ends
    (`RunReport.push`)."""
    if jobs < 1:
        raise UsageError(f"jobs must be at least 1, got {jobs}")
    scheduler = scheduler if scheduler is not None else LocalScheduler()
    scheduler.check(items=bool(items), remote=remote is not None, push=push)
    if not pipeline.validated:  # built in Python and not validated yet
        pipeline.validate()
    execution = check_execution(execution or ExecutionOptions())
    selected = pipeline.closure(list(stages) or pipeline.order())
    every_item_stage = pipeline.item_stages()
    per_item = [s for s in selected if s in every_item_stage]
    if per_item and not items:
        raise ItemsNeededError(f"stage {per_item[0]!r} runs once per item (it uses {{item}}, "
                               "`per_item`, or an upstream stage that does)")
    if items and not per_item:
        raise UsageError("items were given, but no selected stage runs per item",
                         hint="use {item} in a stage's cmd or input paths, or set per_item = true")
    run_id = validate_name(run_id, "run id") if run_id else new_run_id()
    owner = run_owner(run_id)
    transfer = _transfer(store, remote, push)
    with scheduler.session(store.root, pipeline.workdir, jobs=jobs, remote=transfer is not None), \
            store_lock(store.layout, exclusive=False), \
            owner_locked(store.layout, owner, f"run {run_id!r}"):
        unsynced.check(store.layout)  # a power loss during a run's deferred writes: recover first
        record = _open_or_start_run(pipeline, store, run_id, selected, owner, items or [],
                                    execution)
        try:
            report = Execution(store, record, selected, jobs=jobs, force=force,
                               progress=progress, remote=transfer, push=push,
                               scheduler=scheduler).run()
        except BaseException:
            try:
                store.objects.stat_cache.save(owner)
            except OSError:
                pass  # the error being raised is the one to report
            raise
        # The items' own inputs, hashed as each item started, are saved once, at the end (a
        # save rewrites the whole file); if the run dies first, they are hashed again next time.
        store.objects.stat_cache.save(owner)
        return report


def _transfer(store: Store, remote: str | None, push: bool):  # noqa: ANN202
    if remote is None:
        if push:
            raise UsageError("pushing needs a remote to push to",
                             hint="name a remote, or do not push")
        return None
    from ..remote.remotes import open_remote
    from ..remote.transfer import Transfer

    spec, storage = open_remote(store.layout, remote)
    return Transfer(store, spec.name, storage, spec=spec)


def check_execution(options: ExecutionOptions) -> ExecutionOptions:
    if options.systemic_min_items < 1:
        raise UsageError("systemic_min_items must be at least 1, got "
                         f"{options.systemic_min_items}")
    if not 0 <= options.systemic_threshold <= 1:
        raise UsageError("systemic_threshold must be a ratio from 0 to 1, got "
                         f"{options.systemic_threshold}")
    if options.max_consecutive_failures is not None and options.max_consecutive_failures < 1:
        raise UsageError("max_consecutive_failures must be at least 1, got "
                         f"{options.max_consecutive_failures}")
    return options


def resume(store: Store, run_id: str, *, jobs: int = 1, items: Iterable[str] | None = None,
           progress: ProgressCallback | None = None) -> RunReport:
    """Complete run `run_id` with the definition and inputs it recorded; caller holds locks.
    Items that already ended (succeeded, degraded or failed) are kept as they are; with
    `items`, only those of the others are taken (None: every item that has not ended)."""
    record = store.manifests.read_run(run_id)
    if record.finished_at is not None:
        record = _replace(record, finished_at=None, status=None)
        store.manifests.write_run(record, run_owner(run_id))
    return Execution(store, record, list(record.selected), jobs=jobs, force=False,
                     progress=progress, resuming=True,
                     redo=set(items) if items is not None else None).run()


def _open_or_start_run(pipeline: Pipeline, store: Store, run_id: str, selected: list[str],
                       owner: str, items: list[str], execution: ExecutionOptions) -> RunRecord:
    if store.manifests.layout.run_record_path(run_id).exists():
        record = store.manifests.read_run(run_id)
        if record.definition != pipeline.definition:
            raise UsageError(
                f"run {run_id!r} was started from a different pipeline definition",
                hint="start a new run id, or recover this run to complete it as it was defined")
        if items != record.items:
            raise UsageError(
                f"run {run_id!r} was started with a different list of items",
                hint="start a new run id, or recover this run to complete it with its own items")
        inputs = dict(record.inputs)
        missing = [s for s in selected if s not in inputs]
        inputs.update(snapshot_inputs(pipeline, store, missing, owner))
        # finished_at goes back to None until this invocation finishes, so that a crash now
        # leaves the run marked as interrupted for verify and recover.
        record = _replace(record, inputs=inputs, selected=_merge(record.selected, selected, pipeline),
                          finished_at=None, execution=execution, systemic=None, status=None)
    else:
        record = RunRecord(
            run_id=run_id, pipeline=PipelineRef(name=pipeline.name, version=pipeline.version),
            pipeline_file=str(pipeline.path), workdir=str(pipeline.workdir),
            definition=pipeline.definition, selected=selected,
            inputs=snapshot_inputs(pipeline, store, selected, owner), started_at=now(),
            items=items, execution=execution)
    store.manifests.write_run(record, owner)
    return record


def _merge(old: list[str], new: list[str], pipeline: Pipeline) -> list[str]:
    wanted = set(old) | set(new)
    return [s for s in pipeline.order() if s in wanted]


def _replace(record: RunRecord, **changes) -> RunRecord:  # noqa: ANN003
    return msgspec.structs.replace(record, **changes)


def _item_input(relpath: str) -> bool:
    return any(ref.kind == "item" for ref in placeholders(relpath))


def snapshot_inputs(pipeline: Pipeline, store: Store, stages: Iterable[str],
                    owner: str) -> dict[str, dict[str, ArtifactRef]]:
    """Copy every workspace input of `stages` into the store; each path once per run.  Input
    paths holding `{item}` are snapshotted per item, when the item starts."""
    batch = SyncBatch()
    seen: dict[Path, ArtifactRef] = {}
    result: dict[str, dict[str, ArtifactRef]] = {}
    for stage in stages:
        refs: dict[str, ArtifactRef] = {}
        for name, relpath in stage_input_paths(pipeline.stages[stage], pipeline.workdir).items():
            if _item_input(relpath):
                continue
            path = pipeline.input_path(relpath)
            key = path.resolve()
            if key not in seen:
                seen[key] = _snapshot(store, path, owner, batch, f"stage {stage!r} input {name!r}")
            refs[name] = seen[key]
        result[stage] = refs
    batch.flush()
    store.objects.stat_cache.save(owner)
    return result


def _snapshot(store: Store, path: Path, owner: str, batch: SyncBatch, what: str) -> ArtifactRef:
    try:
        if path.is_dir():
            return store_tree(path, store.objects, owner, batch, move=False, what=what)
        digest, size = store.objects.ingest_file(path, owner, batch)
        return ArtifactRef(hash=digest, size=size, kind="file")
    except FileNotFoundError:
        raise PipelineError(f"{what}: {path} disappeared before it could be stored",
                            hint="keep inputs in place while a run starts") from None
    except OutputError as exc:
        raise PipelineError(f"{exc.message} ({path})", hint=exc.hint) from None


class Execution:
    """One pass over a run's selected stages, and its items."""

    def __init__(self, store: Store, record: RunRecord, selected: list[str], *, jobs: int,
                 force: bool, progress: ProgressCallback | None, resuming: bool = False,
                 redo: set[str] | None = None, remote: Transfer | None = None,
                 push: bool = False, scheduler: ItemScheduler | None = None,
                 stop: processes.StopToken | None = None,
                 breaker: CircuitBreaker | None = None) -> None:
        """`breaker`: the circuit breaker its stages use (default: the run's own, from its
        execution options); a body run elsewhere gets one that reports to the driver's."""
        self.store = store
        # This run's own: a systemic abort or an error stops this run's stages and no other's.
        self.stop = stop if stop is not None else processes.StopToken()
        self.scheduler = scheduler if scheduler is not None else LocalScheduler()
        self.remote = remote
        self.pushing = push and remote is not None
        self.push_report: PushReport | None = None
        self.redo = redo
        self.record = record
        self.selected = selected
        self.jobs = jobs
        self.resuming = resuming
        self.progress = progress
        self.owner = run_owner(record.run_id)
        self.stages = record.definition.stages
        self.workdir = Path(record.workdir)
        per_item = item_stages(self.stages)
        self.shared = [s for s in selected if s not in per_item]
        self.item_order = [s for s in selected if s in per_item]
        options = record.execution
        self.sampling = options.mode == "sampling"
        self.detector = SystemicDetector(
            options.systemic_min_items, options.systemic_threshold,
            {name for name, spec in self.stages.items() if spec.domain == "infrastructure"})
        self.systemic: SystemicFailure | None = None
        self._lock = threading.Lock()
        self.work = StageWork(store, record, force=force, item_stages=per_item,
                              breaker=breaker if breaker is not None else
                              CircuitBreaker(options.max_consecutive_failures),
                              emit=self.emit, remote=remote, stop=self.stop)

    def emit(self, event: str, stage: str | None = None, detail: str = "",
             item: str | None = None) -> None:
        if self.progress is not None:
            record = RunEvent(ts=now().isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                              run_id=self.record.run_id, item=item, stage=stage, event=event,
                              detail=detail)
            if item is None:
                self.progress(record)
            else:  # an item's records are synced in groups: reported once durable
                progress = self.progress
                self.store.manifests.when_durable(self.record.run_id, lambda: progress(record))

    def run(self) -> RunReport:
        """The run to its end.  Raises `RunInterrupted` when a signal stopped it through
        `processes.stop_all`; a run in the main thread sees the signal's own exception first
        (KeyboardInterrupt, or the CLI's `processes.Terminated`), which propagates as it is."""
        try:
            with processes.live(self.stop):
                try:
                    reports = self._run_shared()
                    items = self._run_items(reports) if self.item_order and self.record.items else []
                except processes.Interrupted:
                    raise self._interrupted() from None
                if self.stop.stopped and self.systemic is None:  # stopped between two stages
                    raise self._interrupted()
            return self._end(reports, items)
        finally:
            # This process's segment of the run's item log: synced and let go of, also when
            # the run stops early (what it appended is kept; recover takes it from there).
            try:
                self.store.manifests.close_items(self.record.run_id)
                unsynced.close(self.store.layout, self.owner)
            finally:
                durable.drain_removals()  # the attempt folders: tmp/ is clean when a run returns

    def _end(self, reports: dict[str, StageReport], items: list[ItemReport]) -> RunReport:
        ordered = [reports[s] for s in self.shared]
        if self.systemic is None and self.resuming:
            self.systemic = self.record.systemic  # repairing an aborted run does not unabort it
        outcomes = {r.outcome for r in ordered} | {i.status for i in items}
        if self.systemic is not None:
            status = "aborted"
        elif "failed" in outcomes:
            status = "failed"
        elif outcomes & {"degraded", "skipped"}:
            status = "degraded"
        else:
            status = "succeeded"
        self._finish(ordered, status)
        if self.pushing:  # the records, and any result a per-stage push could not send
            self._push(lambda transfer, tally, into: transfer.push_run(self.record.run_id,
                                                                        tally, into))
        return RunReport(run_id=self.record.run_id, pipeline=self.record.pipeline.name,
                         ok=status == "succeeded", status=status, stages=ordered, items=items,
                         processed=sum(i.status != "not_processed" for i in items),
                         systemic=self.systemic, store=str(self.store.root),
                         push=self.push_report)

    def _interrupted(self) -> RunInterrupted:
        """The run record keeps `finished_at: null`, as after Ctrl-C: recover completes it."""
        signum = self.stop.signum or signal.SIGINT
        return RunInterrupted(f"run {self.record.run_id!r} was interrupted by "
                              f"{signal.Signals(signum).name}", signum=signum)

    # --- the stages that run once per run: a DAG, independent stages in parallel ---

    def _run_shared(self) -> dict[str, StageReport]:
        reports: dict[str, StageReport] = {}
        pending = list(self.shared)
        running: dict[Future[StageReport], str] = {}
        with ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="stage") as pool:
            try:
                while pending or running:
                    if self.stop.stopped:  # a signal (`stop_all`): start no other stage
                        raise processes.Interrupted()
                    for stage in list(pending):
                        ups = self.stages[stage].upstream
                        blocked = self._blocker(ups, reports)
                        if blocked:
                            pending.remove(stage)
                            reports[stage] = self._skip(stage, blocked, reports[blocked])
                        elif all(u in reports for u in ups) and len(running) < self.jobs:
                            pending.remove(stage)
                            running[pool.submit(self.process, stage)] = stage
                    if running:
                        done, _ = wait(running, return_when=FIRST_COMPLETED)
                        for future in done:
                            stage = running.pop(future)
                            reports[stage] = future.result()
            except BaseException:
                self.stop.stop()
                for future in running:
                    future.cancel()
                raise
        return reports

    def process(self, stage: str, item: str | None = None,
                item_inputs: dict[str, ArtifactRef] | None = None) -> StageReport:
        """One stage, and with `--push` its result pushed as soon as its manifest is written."""
        report = self.work.process(stage, item, item_inputs)
        if self.pushing and report.manifest is not None and report.outcome != "failed":
            self._push(lambda transfer, tally, into: transfer.push_manifests(
                [self._committed(stage, item)], tally, into))
        return report

    def _committed(self, stage: str, item: str | None) -> tuple[StageManifest, bytes]:
        manifests = self.store.manifests
        data = manifests.read_bytes(self.record.run_id, stage, item)
        return decode_record(data, StageManifest,
                             manifests.location(self.record.run_id, stage, item)), data

    def _push(self, step) -> None:  # noqa: ANN001
        """Run one push step into the run's push report; a push that fails leaves the run's
        results as they are (they are safe locally) and is reported at the end."""
        from ..remote.storage import RemoteError
        from ..remote.transfer import new_push_report, Tally

        assert self.remote is not None
        with self._lock:
            if self.push_report is None:
                self.push_report = new_push_report(self.remote.name, [self.record.run_id])
            into = self.push_report
        tally = Tally()
        try:
            step(self.remote, tally, into)
        except RemoteError as exc:
            tally.problems.append(exc.message)
        with self._lock:
            into.objects_uploaded += tally.objects
            into.bytes_uploaded += tally.bytes
            into.objects_present += tally.present
            into.problems.extend(tally.problems)
            into.ok = not into.conflicts and not into.problems

    def _blocker(self, upstream: list[str], reports: dict[str, StageReport]) -> str | None:
        """The first upstream stage that keeps a stage from running: it failed or was skipped,
        or it is disabled and is not a built-in kind (which passes its input through)."""
        for up in upstream:
            outcome = reports[up].outcome if up in reports else None
            if outcome in ("failed", "skipped") or (
                    outcome == "disabled" and self.stages[up].kind is None):
                return up
        return None

    def _skip(self, stage: str, blocker: str, blocked_by: StageReport,
              item: str | None = None) -> StageReport:
        """A stage whose upstream did not succeed: not run, and a manifest it has in this run
        from an earlier invocation is removed, since this run no longer records the upstream
        outputs it was made from."""
        self.store.manifests.remove(self.record.run_id, stage, item, self.owner)
        reason = (f"upstream stage {blocker!r} is disabled (enabled = false)"
                  if blocked_by.outcome == "disabled" else
                  f"upstream stage {blocker!r} did not succeed")
        self.emit("skipped", stage, reason, item)
        return StageReport(stage=stage, item=item, outcome="skipped", reason=reason)

    def _finish(self, reports: list[StageReport], status: str) -> None:
        outcomes = dict(self.record.outcomes)
        outcomes.update({r.stage: r.outcome for r in reports})
        self.record = _replace(self.record, outcomes=outcomes, finished_at=now(),
                               systemic=self.systemic, status=status)
        # Every item record this run appended is durable before its run record says it ended.
        self.store.manifests.sync_items(self.record.run_id)
        self.store.manifests.write_run(self.record, self.owner)

    # --- items ---

    def _run_items(self, shared: dict[str, StageReport]) -> list[ItemReport]:
        """Every item through the per-item stages, on the run's item scheduler."""
        return self.scheduler.run_items(_Host(self, shared))

    # An item in three parts, so that its body can run elsewhere (worker.py, for dask.py): the
    # driver's decisions before, the body, and the driver's bookkeeping after.

    def item_before(self, item: str) -> tuple[ItemReport | None, ItemRecord | None]:
        """(the item's report if it is not to be taken now, else None; its record, if any)."""
        if self.systemic is not None or self.stop.stopped:
            return ItemReport(item=item, status="not_processed"), None
        record = self.store.manifests.read_item_optional(self.record.run_id, item)
        if record is not None and self.resuming and record.status != "running":
            with self._lock:  # ended in an earlier invocation: kept as it is
                self.detector.add(item, record.first_failure if record.status == "failed" else None)
            return _item_report(record, []), record
        if self.resuming and self.redo is not None and item not in self.redo:
            # Not asked for (an aborted run is repaired, never continued): it stays unprocessed.
            return ItemReport(item=item, status="not_processed"), record
        return None, record

    def item_body(self, item: str, record: ItemRecord | None, shared: dict[str, StageReport],
                  started: Callable[[], None] | None = None
                  ) -> tuple[ItemRecord, list[StageReport]]:
        """Snapshot the item's inputs and write its `running` record (unless it has one), then
        its stages; its ended record and stage reports.  `started` is called once it has
        started.  Raises `processes.Interrupted` when the run is stopping."""
        record = self.item_start(item, record)
        self.emit("item_start", None, "", item)
        if started is not None:
            started()
        return self._item_stages(item, record, shared)

    def item_start(self, item: str, record: ItemRecord | None) -> ItemRecord:
        """Snapshot the item's own inputs and write its `running` record, unless `record` is
        one; its `running` record."""
        if record is not None and record.status == "running":
            return record
        # The same run taken again keeps each item's snapshots, as it keeps the run's own.
        inputs = record.inputs if record is not None else self._snapshot_item(item)
        record = ItemRecord(run_id=self.record.run_id, item=item, status="running",
                            inputs=inputs, started_at=now())
        self.store.manifests.write_item(record, self.owner)
        return record

    def item_lost(self, item: str, stage: str, signal: str
                  ) -> tuple[ItemRecord, list[StageReport]]:
        """An item whose body was lost elsewhere: failed at `stage` with an infrastructure
        failure whose signal is `signal` (see `ItemHost.lose`)."""
        failure = runner_failure(self.stages[stage], INFRASTRUCTURE_GATE, signal)
        try:
            record = self.store.manifests.read_item_optional(self.record.run_id, item)
        except CorruptRecordError:
            record = None
        if record is None:
            record = ItemRecord(run_id=self.record.run_id, item=item, status="running",
                                inputs={}, started_at=now())
        self.emit("failed", stage, f"{failure.class_} ({failure.category})", item)
        first = FirstFailure(stage=stage, failure=failure, at=now())
        return self._end_item(record, "failed", first), [
            StageReport(stage=stage, item=item, outcome="failed", failure=failure, reason=signal)]

    def item_run_inputs(self) -> dict[str, dict[str, ArtifactRef]]:
        """The snapshots the run record holds for the per-item stages (`ItemHost.run_inputs`)."""
        return {stage: self.record.inputs[stage] for stage in self.item_order
                if self.record.inputs.get(stage)}

    def item_after(self, item: str, record: ItemRecord, reports: list[StageReport]) -> ItemReport:
        """An item that ended: `item_end`, the systemic detector and check."""
        self.emit("item_end", None, record.status, item)
        with self._lock:
            self.detector.add(item, record.first_failure if record.status == "failed" else None)
            if self.sampling and self.systemic is None and self.record.systemic is None:
                self.systemic = self.detector.check()
                if self.systemic is not None:
                    s = self.systemic
                    self.emit("systemic_abort", s.trigger_stage, (
                        f"{s.stage_failures} of {s.processed_items} processed items failed at "
                        f"infrastructure stage {s.trigger_stage!r} ({s.failure_ratio:.0%}, over "
                        f"the threshold of {s.threshold_ratio:.0%}); aborting the run"), item)
                    self.stop.stop()
        return _item_report(record, reports)

    def _item_stages(self, item: str, record: ItemRecord, shared: dict[str, StageReport]
                     ) -> tuple[ItemRecord, list[StageReport]]:
        """The item's stages in order.  It stops at its first failure not covered by a
        fallback; every failure is written to the item record the moment it happens."""
        done: dict[str, StageReport] = {}
        status = "succeeded"
        for stage in self.item_order:
            spec = self.stages[stage]
            root = next((r for r in (self._shared_root(u, shared) for u in spec.upstream
                                     if u in shared) if r is not None), None)
            if root is not None:  # a once-per-run stage this item needs failed
                failure = shared[root].failure or runner_failure(
                    self.stages[root], UPSTREAM_MISSING,
                    f"stage {root!r}, which runs once for all items, did not succeed")
                first = FirstFailure(stage=root, failure=failure, at=now())
                return self._end_item(record, "failed", first), list(done.values())
            skipped = self._blocker(spec.upstream, {**shared, **done})
            if skipped is not None:
                done[stage] = self._skip(stage, skipped, done.get(skipped, shared.get(skipped)),
                                         item)
                status = "degraded"
                continue
            report = self.process(stage, item, record.inputs.get(stage, {}))
            done[stage] = report
            if report.outcome == "failed":
                failure = report.failure or runner_failure(spec, UPSTREAM_MISSING, report.reason or "")
                first = FirstFailure(stage=stage, failure=failure, at=now())
                return self._end_item(record, "failed", first), list(done.values())
            if report.outcome in ("degraded", "skipped"):
                status = "degraded"
                if report.failure is not None:
                    record = msgspec.structs.replace(record, fallbacks=[
                        *record.fallbacks, FirstFailure(stage=stage, failure=report.failure,
                                                        at=now())])
                    self.store.manifests.write_item(record, self.owner)
        return self._end_item(record, status, None), list(done.values())

    @staticmethod
    def _shared_root(stage: str, shared: dict[str, StageReport]) -> str | None:
        """The once-per-run stage whose failure keeps `stage` from being usable, if any: the
        stage itself when it failed, or the failed stage upstream of it when it was skipped for
        that.  None when it is usable, or was skipped by its own `on_failure = "skip"`."""
        report = shared[stage]
        if report.outcome == "failed":
            return stage
        if report.outcome == "skipped" and report.failure is None and report.reason:
            blocker = report.reason.split("'")[1] if "'" in report.reason else None
            if blocker in shared:
                return Execution._shared_root(blocker, shared)
        return None

    def _end_item(self, record: ItemRecord, status: str, first: FirstFailure | None) -> ItemRecord:
        record = msgspec.structs.replace(record, status=status, first_failure=first,
                                         finished_at=now())
        self.store.manifests.write_item(record, self.owner)
        return record

    def _snapshot_item(self, item: str) -> dict[str, dict[str, ArtifactRef]]:
        """The item's own inputs (paths with `{item}`), stored as it starts.  One that does not
        exist is left out; the stage that needs it fails with InputMissingFailure.  Not
        fsynced here: the item record naming them is appended to the item log, whose group
        commit makes them durable first (store/unsynced.py)."""
        batch = SyncBatch(unsynced.begin(self.store.layout, self.owner))
        result: dict[str, dict[str, ArtifactRef]] = {}
        for stage in self.item_order:
            refs = {}
            for name, relpath in self.stages[stage].inputs.items():
                if not _item_input(relpath):
                    continue
                path = self.workdir / render_item_path(relpath, item)
                if not (path.is_file() or path.is_dir()):
                    continue
                try:
                    refs[name] = _snapshot(self.store, path, self.owner, batch,
                                           f"item {item!r} stage {stage!r} input {name!r}")
                except PipelineError:
                    continue  # vanished meanwhile: the stage fails with InputMissingFailure
            if refs:
                result[stage] = refs
        batch.flush()
        return result


def _item_report(record: ItemRecord, stages: list[StageReport]) -> ItemReport:
    first = record.first_failure
    status = "not_processed" if record.status == "running" else record.status
    return ItemReport(item=record.item, status=status,  # type: ignore[arg-type]
                      first_failure_stage=first.stage if first else None,
                      failure=first.failure if first else None, stages=stages)


class _Host(ItemHost):
    """The `ItemHost` of an `Execution`: what its item scheduler may do, and nothing else."""

    def __init__(self, execution: Execution, shared: dict[str, StageReport]) -> None:
        self._ex = execution
        self.run_id = execution.record.run_id
        self.items = list(execution.record.items)
        self.jobs = execution.jobs
        self.store = execution.store
        self.remote = execution.remote
        self.stages = list(execution.item_order)
        self.selected = list(execution.selected)
        self.shared = shared
        self.force = execution.work.force
        self.breaker = execution.work.breaker

    def before(self, item: str) -> tuple[ItemReport | None, ItemRecord | None]:
        return self._ex.item_before(item)

    def body(self, item: str, record: ItemRecord | None,
             started: Callable[[], None] | None = None) -> tuple[ItemRecord, list[StageReport]]:
        return self._ex.item_body(item, record, self.shared, started)

    def after(self, item: str, record: ItemRecord, stages: list[StageReport]) -> ItemReport:
        return self._ex.item_after(item, record, stages)

    @property
    def aborted(self) -> bool:
        return self._ex.systemic is not None

    @property
    def stopping(self) -> bool:
        return self._ex.systemic is not None or self._ex.stop.stopped

    def stop(self) -> None:
        self._ex.stop.stop()

    def emit(self, event: str, stage: str | None = None, detail: str = "",
             item: str | None = None) -> None:
        self._ex.emit(event, stage, detail, item)

    def start(self, item: str, record: ItemRecord | None) -> ItemRecord:
        return self._ex.item_start(item, record)

    def run_inputs(self) -> dict[str, dict[str, ArtifactRef]]:
        return self._ex.item_run_inputs()

    def replay(self, events: list[RunEvent]) -> None:
        if self._ex.progress is not None:
            for event in events:
                self._ex.progress(event)

    def lose(self, item: str, stage: str, signal: str) -> tuple[ItemRecord, list[StageReport]]:
        return self._ex.item_lost(item, stage, signal)
