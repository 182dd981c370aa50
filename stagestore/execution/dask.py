"""Item runs in other processes or on other machines: `stagestore run --items FILE --executor dask`.

The driver (the `stagestore run` process) keeps every decision of an item run; only the body of
an item runs elsewhere:

* driver, before (`Execution.item_before`): systemic abort, interrupt and resume decisions;
* elsewhere (`run_item(ItemTask) -> ItemOutcome`, a module-level function of plain, picklable
  msgspec data): open the store at `ItemTask.store_root`, read the run record, snapshot the
  item's own inputs, write its `running` record, take it through its stages, write its end
  record (`Execution.item_body`, the code a local item runs);
* driver, after (`Execution.item_after`): the systemic detector and check, `item_end`.

The seam is a `concurrent.futures.Executor` made by a factory (`run(..., executor=...)`,
`ItemExecutorFactory` in runner.py).  Without one, items run in a thread pool in the driver as
they always did.  With one, `run_items_elsewhere` submits `run_item(task)` for each item, in
list order, keeping at most as many in flight as the executor has slots (`slots()`, else
`--jobs`), so items start in list order and a decision taken on the driver (an open circuit, a
systemic abort) reaches the next items submitted.  `DaskExecutor` is the Dask one; any other
Executor that runs picklable calls in processes seeing the same paths works too
(`ProcessPoolExecutor` does).

Failures.  stagestore's failure model decides retries: tasks are submitted with `retries=0`,
and a stage failure is a result in the `ItemOutcome`, never an exception.  An exception the
item's own code raises (a damaged record, a full disk, a bug) is returned too (`status="error"`,
so Dask never logs the task as failed) and re-raised on the driver, where it ends the run as
it does locally.  A task that does not complete for any other reason (Dask reschedules the
tasks of a worker that dies by itself; after `allowed-failures` deaths it gives up with
`KilledWorker`) fails its item with an infrastructure failure
(`InfrastructureGateFailure`, category `fatal`) at the first stage the item had not finished,
its signal naming the cause.  A task that runs again after its worker died finds the item's
`running` record and keeps the snapshots it holds; stages that had committed are reused.

Circuit breaker.  It stays on the driver, shared by all items as locally.  When an item is
submitted, the driver decides for each stage whose circuit is open whether this item fails fast
there or is the (single) probe, and the task carries these decisions (`Gate`); the task returns
the breaker calls its stages made (`BreakerCall`) and the driver applies them.  So an item sees
the circuits as they were when it was submitted: at most the items already in flight (one per
slot) miss a circuit that opens meanwhile, as locally the items already past that stage do.  A
probe an item was given and did not use is handed back.

Stopping.  A systemic abort stops submitting (the items left are `not_processed`) and asks
every worker to kill the stage processes of this run's items (`stop_items`): those items end
`not_processed` with their records left `running`, exactly as locally; items that end anyway
are counted.  Ctrl-C does the same, cancels what is pending, and closes the client and the
`LocalCluster`.

Progress.  A worker cannot call the driver's progress callback: each item's events are
collected where it runs and replayed by the driver, in order, when the item returns.

Paths.  Workers must see the store and the workspace at the same paths as the driver (true for
a `LocalCluster`, and for a cluster on a shared filesystem that supports `flock` and atomic
`rename`); the store root is a field of each task, never global state.  Stage commands run with
the worker's environment.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from ..errors import CorruptRecordError, StagestoreError, StoreError, UsageError
from ..model.failures import INFRASTRUCTURE_GATE
from ..model.records import ArtifactRef, FirstFailure, ItemRecord, RemoteSpec, now
from ..model.reports import ItemReport, RunEvent, StageReport
from . import processes
from .classify import runner_failure
from .resilience import CircuitBreaker

if TYPE_CHECKING:
    from .runner import Execution

DASK_HINT = "pip install 'stagestore[dask]'"
CONNECT_TIMEOUT = 10  # seconds to reach a --scheduler
SIGNAL_LIMIT = 1000  # characters of a lost item's signal
NO_WORKERS_GRACE = 30.0  # seconds a LocalCluster may have no worker before the run gives up


# --- what travels: a task, and what it returns -------------------------------------------------


class Gate(msgspec.Struct, frozen=True):
    """The driver's circuit-breaker decision for one stage of one item, taken at submission."""

    admit: bool = True  # False: fail fast with `why`
    probe: bool = False  # this item is the circuit's probe
    why: str = ""
    consecutive: int = 0  # failures in a row, and whether the circuit is open, at submission:
    open: bool = False  # a failure here opens it when consecutive + 1 reaches the limit


class BreakerCall(msgspec.Struct, frozen=True):
    """One call an item's stages made to the breaker: `admit` (ok: admitted) or `record`."""

    stage: str
    admit: bool
    ok: bool
    probe: bool
    failure_class: str = ""


class ItemTask(msgspec.Struct, frozen=True, kw_only=True):
    """Everything `run_item` needs; the rest it reads from the store at `store_root`."""

    store_root: str
    run_id: str
    item: str
    selected: list[str]  # this invocation's stages (the run record keeps every invocation's)
    shared: dict[str, StageReport]  # the once-per-run stages' results
    force: bool
    seen_ended_at: datetime | None  # the end of the item record the driver saw, if it had ended
    breaker_limit: int | None
    gates: dict[str, Gate] = {}
    stop_token: str
    # With `run --remote NAME --push`: the task runs in a node-local scratch store, takes what
    # it needs from that remote and pushes its results there (see `_scratch`).
    remote: RemoteSpec | None = None
    run_record: bytes = b""  # the driver's run record, byte for byte
    item_record: ItemRecord | None = None  # the `running` record the driver wrote: its inputs


class ItemOutcome(msgspec.Struct, kw_only=True):
    """What an item's task returns: a summary, never an output.  `ended`: taken through its
    stages; `kept`: an earlier attempt of this task had ended it; `interrupted`: stopped by
    `stop_items`; `not_started`: its run was stopping when the task started; `error`: the
    item's own code raised an exception, which the driver re-raises."""

    status: Literal["ended", "kept", "interrupted", "not_started", "error"]
    record: ItemRecord | None = None
    stages: list[StageReport] = []
    events: list[RunEvent] = []
    breaker: list[BreakerCall] = []
    # `error`: the exception the item's own code raised, pickled, and its text should it not
    # unpickle on the driver (a class the driver cannot import, say).
    error: bytes = b""
    error_text: str = ""


# --- the worker side -----------------------------------------------------------------------------


class TaskBreaker:
    """What `StageWork` sees as its circuit breaker inside a task: the driver's `Gate`s, and a
    log of the calls, which the driver applies to the run's breaker."""

    def __init__(self, limit: int | None, gates: dict[str, Gate]) -> None:
        self.limit = limit
        self.gates = gates
        self.calls: list[BreakerCall] = []

    def admit(self, stage: str) -> tuple[bool, bool, str]:
        if not self.limit:
            return True, False, ""
        gate = self.gates.get(stage, Gate())
        self.calls.append(BreakerCall(stage=stage, admit=True, ok=gate.admit, probe=gate.probe))
        return gate.admit, gate.probe, gate.why

    def record(self, stage: str, ok: bool, probe: bool, failure_class: str = "") -> bool:
        if not self.limit:
            return False
        self.calls.append(BreakerCall(stage=stage, admit=False, ok=ok, probe=probe,
                                      failure_class=failure_class))
        gate = self.gates.get(stage, Gate())
        return not ok and not gate.open and gate.consecutive + 1 >= self.limit


# The runs with items in this process, by stop token: each its own `processes.StopToken`,
# shared by its items here, and how many of them are running; and the tokens stopped.
_registry = threading.Lock()
_active: dict[str, tuple[processes.StopToken, int]] = {}
_stopped: set[str] = set()


def _enter(token: str) -> processes.StopToken | None:
    """The run's stop token here, for one more item of it; None if the run was stopped."""
    with _registry:
        if token in _stopped:
            return None
        stop, running = _active.get(token, (processes.StopToken(), 0))
        _active[token] = (stop, running + 1)
        return stop


def _leave(token: str) -> None:
    with _registry:
        stop, running = _active[token]
        if running == 1:
            del _active[token]
        else:
            _active[token] = (stop, running - 1)


def stop_items(token: str) -> int:
    """Run on every worker (`Client.run`): items of `token` not started yet will not start, and
    the stage processes of those running are killed.  Returns how many were running here."""
    with _registry:
        _stopped.add(token)
        stop, running = _active.get(token, (None, 0))
    if stop is not None:
        stop.stop()
    return running


def missing_paths(paths: list[str]) -> list[str]:
    """Run on every worker: which of `paths` are not folders there."""
    return [path for path in paths if not os.path.isdir(path)]


def run_item(task: ItemTask) -> ItemOutcome:
    """One item through its stages, in whatever process runs this (a Dask worker)."""
    stop = _enter(task.stop_token)
    if stop is None:
        return ItemOutcome(status="not_started")
    events: list[RunEvent] = []
    breaker = TaskBreaker(task.breaker_limit, task.gates)
    try:
        return _run_item(task, events, breaker, stop)
    except processes.Interrupted:
        return ItemOutcome(status="interrupted", events=events, breaker=breaker.calls)
    except Exception as exc:  # noqa: BLE001 - the driver re-raises it
        # Returned, not raised: a raising task is Dask's failure, logged with a traceback on
        # the worker; this one is stagestore's, reported by the driver as one error.
        return _error_outcome(exc, events, breaker)
    finally:
        _leave(task.stop_token)


def _error_outcome(exc: Exception, events: list[RunEvent], breaker: TaskBreaker) -> ItemOutcome:
    text = f"{type(exc).__name__}: {exc}"
    try:
        data = pickle.dumps(exc)
    except Exception:  # noqa: BLE001 - an exception that does not pickle travels as its text
        data = b""
    return ItemOutcome(status="error", events=events, breaker=breaker.calls, error=data,
                       error_text=text)


def _run_item(task: ItemTask, events: list[RunEvent], breaker: TaskBreaker,
              stop: processes.StopToken) -> ItemOutcome:
    from .runner import Execution
    from ..store.store import Store

    transfer = None
    if task.remote is None:
        store = Store.open(task.store_root)
    else:
        store, transfer = _scratch(task)
    record = store.manifests.read_run(task.run_id)
    execution = Execution(store, record, task.selected, jobs=1, force=task.force,
                          progress=events.append, remote=transfer, stop=stop)
    execution.work.breaker = breaker  # type: ignore[assignment]
    item = store.manifests.read_item_optional(task.run_id, task.item)
    if item is not None and item.status != "running" and item.finished_at != task.seen_ended_at:
        # Ended by an earlier attempt of this task, whose worker died before it returned.
        _push_item(transfer, task)
        return ItemOutcome(status="kept", record=item)
    if item is None and task.item_record is not None:  # the driver's snapshots of its inputs
        assert transfer is not None
        transfer.fetch_inputs(task.item_record.inputs, execution.owner)
        store.manifests.write_item(task.item_record, execution.owner)
        item = task.item_record
    if transfer is not None:  # the once-per-run snapshots its stages read (`_run_inputs`)
        transfer.fetch_inputs(_run_inputs(execution), execution.owner)
    ended, stages = execution.item_body(task.item, item, task.shared)
    _push_item(transfer, task)
    return ItemOutcome(status="ended", record=ended, stages=stages, events=events,
                       breaker=breaker.calls)


def scratch_root(remote: RemoteSpec) -> str:
    """The node-local store of remote-mode tasks: `$STAGESTORE_SCRATCH`, else
    `<temp folder>/stagestore-scratch`, then one folder per remote URL."""
    from ..store.hashing import digest_bytes, digest_hex

    base = os.environ.get("STAGESTORE_SCRATCH") or os.path.join(tempfile.gettempdir(),
                                                                 "stagestore-scratch")
    return os.path.join(base, digest_hex(digest_bytes(remote.url.encode()))[:16])


def _scratch(task: ItemTask):  # noqa: ANN202
    """The task's scratch store, holding the run record and the results of the once-per-run
    stages (pulled from the remote, which the driver pushed them to), and the remote.  The
    snapshots the item's stages read are pulled by `_run_item`."""
    from ..store.layout import run_owner
    from ..remote.storage import open_storage
    from ..store.store import Store
    from ..remote.transfer import Transfer

    assert task.remote is not None
    root = scratch_root(task.remote)
    try:
        store = Store.create(root)
    except OSError as exc:
        raise StoreError(f"cannot create the scratch store of remote-mode items at {root}: "
                         f"{exc.strerror or exc}",
                         hint="set STAGESTORE_SCRATCH on the workers to a writable folder "
                              "on a local disk") from None
    owner = run_owner(task.run_id)
    path = store.layout.run_record_path(task.run_id)
    if not path.exists() or path.read_bytes() != task.run_record:
        store.manifests.install(task.run_id, None, "_run.json", task.run_record, owner)
    spec = task.remote
    transfer = Transfer(store, spec.name, open_storage(spec.url, endpoint=spec.endpoint,
                                                       region=spec.region))
    for stage, report in task.shared.items():
        if report.manifest is not None and report.outcome != "failed":
            if not transfer.fetch_manifest(task.run_id, stage, None, owner):
                raise UsageError(f"stage {stage!r} of run {task.run_id} is not on remote "
                                 f"{spec.name!r}, so items cannot run on workers",
                                 hint="run with --push, which pushes it as it commits")
    return store, transfer


def _run_inputs(ex: Execution) -> dict[str, dict[str, ArtifactRef]]:
    """The snapshots the run record holds for the stages that run per item: their inputs that
    are not per item (a script, a folder) and a `call` stage's code, taken once at run start.
    An item reads them as much as its own snapshots, so they cross to its scratch store too."""
    return {stage: ex.record.inputs[stage] for stage in ex.item_order
            if ex.record.inputs.get(stage)}


def _push_item(transfer, task: ItemTask) -> None:  # noqa: ANN001
    """Push the item's results from the scratch store; an item whose results did not reach
    the remote is an error of the run (the driver re-raises it)."""
    if transfer is None:
        return
    report = transfer.push_item(task.run_id, task.item)
    if not report.ok:
        from ..remote.storage import RemoteError

        what = report.problems[:1] or [f"a conflict at stage {report.conflicts[0].stage}"]
        raise RemoteError(f"item {task.item!r}: its results could not be pushed to remote "
                          f"{transfer.name!r}: {what[0]}")


# --- the driver side -----------------------------------------------------------------------------


def run_items_elsewhere(ex: Execution, shared: dict[str, StageReport]) -> list[ItemReport]:
    """Every item of the run as a `run_item` task on `ex.executor`; see the module docstring."""
    assert ex.executor is not None
    items = ex.record.items
    reports: dict[int, ItemReport] = {}
    token = f"{ex.record.run_id}~{os.urandom(6).hex()}"
    breaker = ex.work.breaker
    if ex.remote is not None:  # what every item's scratch store fetches (`_run_inputs`)
        ex.remote.send_inputs(_run_inputs(ex))
    with ex.executor(ex.jobs) as pool:
        slots: Callable[[], int] | None = getattr(pool, "slots", None)
        stop: Callable[[str], Any] | None = getattr(pool, "stop", None)
        running: dict[Future[ItemOutcome], tuple[int, ItemTask]] = {}
        position, stopped = 0, False
        try:
            while position < len(items) or running:
                room = max(1, slots() if slots is not None else ex.jobs) - len(running)
                while position < len(items) and room > 0:
                    index, item = position, items[position]
                    position += 1
                    decided, record = ex.item_before(item)
                    if decided is not None:
                        reports[index] = decided
                        continue
                    task = ItemTask(
                        store_root=str(ex.store.root), run_id=ex.record.run_id, item=item,
                        selected=list(ex.selected), shared=shared, force=ex.work.force,
                        seen_ended_at=record.finished_at if record is not None and
                        record.status != "running" else None,
                        breaker_limit=breaker.limit, gates=_gates(breaker, ex.item_order),
                        stop_token=token)
                    if ex.remote is not None:
                        task = _for_remote(ex, task, record)
                    running[pool.submit(run_item, task)] = (index, task)
                    room -= 1
                if not running:
                    continue
                # No reference to a future is kept once it is handled: Dask then forgets its
                # result, and does not compute it again when the worker holding it dies.
                done = sorted(wait(running, timeout=1.0, return_when=FIRST_COMPLETED).done,
                              key=lambda f: running[f][0])
                while done:
                    index, task = running.pop(done[0])
                    reports[index] = _returned(ex, task, done.pop(0))
                if ex.systemic is not None and not stopped:
                    stopped = True
                    stop_items(token)  # those running in this process (an executor of threads)
                    if stop is not None:
                        stop(token)
        except BaseException:
            ex.stop.stop()
            stop_items(token)
            if stop is not None and running:
                try:
                    stop(token)
                except Exception:  # noqa: BLE001 - the error being raised is the one to report
                    pass
            for future in running:
                future.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return [reports[index] for index in range(len(items))]


def _for_remote(ex: Execution, task: ItemTask, record: ItemRecord | None) -> ItemTask:
    """A task for a worker's scratch store: the driver snapshots the item's inputs here (the
    worker may not see the workspace), writes the `running` record and pushes the snapshots;
    the task carries the run record and that item record."""
    assert ex.remote is not None and ex.remote.spec is not None
    if record is None or record.status != "running":
        inputs = record.inputs if record is not None else ex._snapshot_item(task.item)
        record = ItemRecord(run_id=ex.record.run_id, item=task.item, status="running",
                            inputs=inputs, started_at=now())
        ex.store.manifests.write_item(record, ex.owner)
    ex.remote.send_inputs(record.inputs)
    run_record = ex.store.layout.run_record_path(ex.record.run_id).read_bytes()
    return msgspec.structs.replace(task, remote=ex.remote.spec, run_record=run_record,
                                   item_record=record)


def _results_home(ex: Execution, task: ItemTask, outcome: ItemOutcome) -> None:
    """Remote mode: the item's manifests (and their objects) pulled from the remote, and its
    ended record written, so the driver's store holds the whole run."""
    assert ex.remote is not None and outcome.record is not None
    for stage in ex.item_order:  # those it has no manifest of (skipped, not reached) are absent
        ex.remote.fetch_manifest(ex.record.run_id, stage, task.item, ex.owner)
    ex.store.manifests.write_item(outcome.record, ex.owner)


def _returned(ex: Execution, task: ItemTask, future: Future[ItemOutcome]) -> ItemReport:
    """The driver's part after an item's task: replay its events, apply its breaker calls,
    then what a local item does when it ends."""
    breaker = ex.work.breaker
    try:
        outcome = future.result()
    except Exception as exc:  # noqa: BLE001 - the task did not complete (e.g. KilledWorker)
        _settle(breaker, task.gates, [])
        return ex.item_after(task.item, *_lost(ex, task.item, exc))
    if outcome.status == "error":
        _settle(breaker, task.gates, [])
        raise _raised(outcome) from None  # as a local run raises it
    if ex.progress is not None:
        for event in outcome.events:
            ex.progress(event)
    for stage in _settle(breaker, task.gates, outcome.breaker):
        if not any(e.event == "circuit_open" and e.stage == stage for e in outcome.events):
            ex.emit("circuit_open", stage, (
                f"circuit opened: stage {stage!r} failed {breaker.limit} times in a row; later "
                "items fail fast here until a probe item succeeds"), task.item)
    if outcome.status in ("interrupted", "not_started"):
        if ex.systemic is not None or ex.stop.stopped:
            return ItemReport(item=task.item, status="not_processed")
        return ex.item_after(task.item, *_lost(ex, task.item, RuntimeError(
            "the item was stopped on its worker")))
    assert outcome.record is not None
    if task.remote is not None:
        _results_home(ex, task, outcome)
    return ex.item_after(task.item, outcome.record, outcome.stages)


def _raised(outcome: ItemOutcome) -> BaseException:
    """The exception an item's task returned, as the driver re-raises it."""
    if outcome.error:
        try:
            return pickle.loads(outcome.error)  # noqa: S301 - our own worker pickled it
        except Exception:  # noqa: BLE001 - e.g. a class the driver cannot import
            pass
    return StagestoreError(f"an item's task failed on its worker: {outcome.error_text}")


def _lost(ex: Execution, item: str, exc: BaseException) -> tuple[ItemRecord, list[StageReport]]:
    """An item whose task did not complete: failed, with an infrastructure failure at the
    first stage it had not finished."""
    stage = _unfinished_stage(ex, item)
    cause = " ".join(f"{type(exc).__name__}: {exc}".split())
    signal = f"the item's task did not complete on the cluster: {cause}"[:SIGNAL_LIMIT]
    failure = runner_failure(ex.stages[stage], INFRASTRUCTURE_GATE, signal)
    try:
        record = ex.store.manifests.read_item_optional(ex.record.run_id, item)
    except CorruptRecordError:
        record = None
    if record is None:
        record = ItemRecord(run_id=ex.record.run_id, item=item, status="running", inputs={},
                            started_at=now())
    ex.emit("failed", stage, f"{failure.class_} ({failure.category})", item)
    first = FirstFailure(stage=stage, failure=failure, at=now())
    return ex._end_item(record, "failed", first), [
        StageReport(stage=stage, item=item, outcome="failed", failure=failure, reason=signal)]


def _unfinished_stage(ex: Execution, item: str) -> str:
    for stage in ex.item_order:
        try:
            manifest = ex.store.manifests.read_optional(ex.record.run_id, stage, item)
        except CorruptRecordError:
            manifest = None
        if manifest is None or manifest.status == "failed":
            return stage
    return ex.item_order[-1]


def _gates(breaker: CircuitBreaker, stages: list[str]) -> dict[str, Gate]:
    """Per stage with a circuit: closed, fail fast (open, or a probe is out), or the probe
    (reserved now, as `admit` does when it lets a probe through)."""
    if not breaker.limit:
        return {}
    gates: dict[str, Gate] = {}
    for stage in stages:
        state, consecutive, why = breaker.gate(stage)
        if state == "closed":
            gates[stage] = Gate(consecutive=consecutive)
        elif state == "fail_fast":
            gates[stage] = Gate(admit=False, open=True, consecutive=consecutive, why=why)
        elif state == "probe":
            gates[stage] = Gate(probe=True, open=True, consecutive=consecutive)
    return gates


def _settle(breaker: CircuitBreaker, gates: dict[str, Gate], calls: list[BreakerCall]
            ) -> list[str]:
    """Apply an item's breaker calls; hand back a probe it did not use.  Returns the stages
    whose circuit this opened."""
    if not breaker.limit:
        return []
    opened, probed = [], set()
    for call in calls:
        if call.admit:
            if not call.ok:  # a fast failure
                breaker.fast_failure(call.stage)
        else:
            if call.probe:
                probed.add(call.stage)
            if breaker.record(call.stage, call.ok, call.probe, call.failure_class):
                opened.append(call.stage)
    for stage, gate in gates.items():
        if gate.probe and stage not in probed:
            breaker.release_probe(stage)
    return opened


# --- Dask ----------------------------------------------------------------------------------------


def require_dask() -> Any:  # noqa: ANN401
    """The `distributed` module, or a `UsageError` saying how to install it."""
    try:
        import distributed
    except ImportError:
        raise UsageError("--executor dask needs dask.distributed, which is not installed",
                         hint=DASK_HINT) from None
    return distributed


def local_workers(jobs: int) -> int:
    """The worker processes of the `LocalCluster` for `--jobs`: jobs when above 1, else one
    per CPU."""
    return jobs if jobs > 1 else (os.cpu_count() or 1)


class DaskExecutor(Executor):
    """A `concurrent.futures.Executor` on a Dask cluster: the scheduler at `scheduler`, or a
    `LocalCluster` of `workers` processes of one thread each, on 127.0.0.1 without a dashboard,
    closed with the executor.  Tasks are submitted with `retries=0, pure=False`."""

    def __init__(self, scheduler: str | None = None, *, workers: int = 1,
                 debug: bool = False) -> None:
        distributed = require_dask()
        # Dask's log lines (a worker restarted, a task given up) are not for the user, who
        # gets stagestore's report and errors: silenced while the executor lasts, unless
        # debugging.  Restored by `shutdown`.
        level = logging.INFO if debug else logging.CRITICAL
        self._log_levels = set_dask_log_levels(level, every=not debug)
        self.cluster = None
        self._closed = False
        self._no_workers_since: float | None = None
        try:
            if scheduler is None:
                # No dashboard; the scheduler's HTTP server (health checks) on a free port,
                # since its default, 8787, is taken by any other cluster, Dask then warning
                # on stderr.
                self.cluster = distributed.LocalCluster(
                    n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                    dashboard_address=":0", scheduler_kwargs={"dashboard": False},
                    silence_logs=level)
                self.client = distributed.Client(self.cluster)
                # Its workers share the terminal: Ctrl-C is the driver's to handle (it stops
                # the items and closes the cluster), not theirs, and so is stderr.
                self.client.register_plugin(_local_worker_plugin(distributed, quiet=not debug))
            else:
                self.client = distributed.Client(scheduler, timeout=CONNECT_TIMEOUT)
        except BaseException as exc:
            self._close_cluster()
            _restore_log_levels(self._log_levels)
            if not isinstance(exc, (OSError, TimeoutError, ValueError)):
                raise
            where = f"the Dask scheduler at {scheduler}" if scheduler else "a local Dask cluster"
            raise UsageError(f"cannot connect to {where}: {' '.join(str(exc).split())}",
                             hint="start one with `dask scheduler` and `dask worker ADDRESS`, "
                                  "or leave out --scheduler for a local cluster") from None
        self._pool = self.client.get_executor(retries=0, pure=False)

    @property
    def address(self) -> str:
        return self.client.scheduler.address

    def submit(self, fn, /, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        return self._pool.submit(fn, *args, **kwargs)

    def slots(self) -> int:
        """Threads of the workers connected now: how many items run at once.  Raises when the
        run's own LocalCluster has had no worker for `NO_WORKERS_GRACE` seconds (its nannies
        could not restart them): nothing would ever run the items left."""
        threads = sum(self.client.nthreads().values())
        if self.cluster is not None:
            if threads:
                self._no_workers_since = None
            elif self._no_workers_since is None:
                self._no_workers_since = time.monotonic()
            elif time.monotonic() - self._no_workers_since > NO_WORKERS_GRACE:
                raise StagestoreError(
                    "the local Dask cluster has lost all its workers",
                    hint="run again with --debug to see Dask's messages; `stagestore recover` "
                         "completes the run")
        return threads

    def stop(self, token: str) -> None:
        self.client.run(stop_items, token, on_error="ignore")

    def check_paths(self, paths: list[str], remote: bool = False) -> None:
        """A `UsageError` naming the workers that do not see every one of `paths`."""
        found = self.client.run(missing_paths, paths, on_error="return")
        bad = {worker: result for worker, result in found.items()
               if isinstance(result, BaseException) or result}
        if bad:
            worker, missing = sorted(bad.items())[0]
            what = ", ".join(missing) if isinstance(missing, list) else repr(missing)
            raise UsageError(f"Dask worker {worker} does not see {what} (and {len(bad) - 1} "
                             "other worker(s) have problems)" if len(bad) > 1 else
                             f"Dask worker {worker} does not see {what}",
                             hint="workers must see the workspace at the same path as "
                                  "`stagestore run` (the checkout, where stage commands run)"
                                  if remote else
                                  "workers must see the store and the workspace at the same "
                                  "paths as `stagestore run` (a shared filesystem), or run "
                                  "with --remote NAME --push")

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._pool.shutdown(wait=wait and not cancel_futures)
        finally:
            try:
                self.client.close()
            finally:
                try:
                    self._close_cluster()
                finally:
                    _restore_log_levels(self._log_levels)

    def _close_cluster(self) -> None:
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            cluster.close()


DASK_LOGGERS = ("distributed", "dask", "tornado", "bokeh")


def set_dask_log_levels(level: int, every: bool = True) -> list[tuple[logging.Logger, int]]:
    """Set `level` on the `distributed` and `dask` loggers and, with `every`, on every logger of
    Dask and the libraries it logs through that has a level of its own (`distributed.client`
    has); the others inherit it.  Returns what `_restore_log_levels` puts back."""
    names = {"distributed", "dask"}
    if every:
        names |= {name for name, logger in list(logging.root.manager.loggerDict.items())
                  if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET
                  and name.split(".")[0] in DASK_LOGGERS}
    changed = []
    for name in sorted(names):
        logger = logging.getLogger(name)
        changed.append((logger, logger.level))
        logger.setLevel(level)
    return changed


def _restore_log_levels(changed: list[tuple[logging.Logger, int]]) -> None:
    for logger, level in reversed(changed):
        logger.setLevel(level)


def _local_worker_plugin(distributed: Any, quiet: bool) -> Any:  # noqa: ANN401
    """A worker plugin for the workers of the run's own `LocalCluster` (pickled by value): the
    worker process ignores SIGINT and, when `quiet`, logs nothing below CRITICAL (its stderr is
    the user's terminal; `silence_logs` reaches only the nanny's logger there)."""

    class LocalWorker(distributed.WorkerPlugin):
        name = "stagestore-local-worker"

        def setup(self, worker) -> None:  # noqa: ANN001
            import signal

            if quiet:
                set_dask_log_levels(logging.CRITICAL)
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.SIG_IGN)

    return LocalWorker()
