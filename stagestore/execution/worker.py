"""The worker side of items run elsewhere (dask.py): `run_item(ItemTask) -> ItemOutcome`.

`run_item` is a module-level function of plain, picklable msgspec data, so that any
`concurrent.futures.Executor` that runs calls in other processes can run it (a Dask cluster, a
`ProcessPoolExecutor`).  It opens the store at `ItemTask.store_root` (or, with a remote, a
node-local scratch store filled from the remote), reads the run record, and takes the item
through its stages with the runner's own code (`Execution.item_body`, the code a local item
runs): its `running` record, its stages, its end record.  What the driver decided (the circuit
breaker's `Gate`s) travels in the task; what the driver applies (the breaker calls, the
events, the ended record) travels back in the `ItemOutcome`.  The driver side is dask.py.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import threading
from datetime import datetime
from typing import Literal

import msgspec

from ..errors import StoreError, UsageError
from ..model.records import ItemRecord, RemoteSpec
from ..model.reports import RunEvent, StageReport
from . import processes
from .runner import Execution

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
    # With a remote the run pushes to: the task runs in a node-local scratch store, takes what
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
    from ..store.store import Store

    transfer = None
    if task.remote is None:
        store = Store.open(task.store_root)
    else:
        store, transfer = _scratch(task)
    record = store.manifests.read_run(task.run_id)
    execution = Execution(store, record, task.selected, jobs=1, force=task.force,
                          progress=events.append, remote=transfer, stop=stop,
                          breaker=breaker)  # type: ignore[arg-type]
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
    if transfer is not None:  # the once-per-run snapshots its stages read
        transfer.fetch_inputs(execution.item_run_inputs(), execution.owner)
    ended, stages = execution.item_body(task.item, item, task.shared)
    # The item's records, appended to this process's segment of the run's item log, durable
    # before the driver hears that the item ended (the driver's own sync covers only its own).
    store.manifests.sync_items(task.run_id)
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
                                 hint="run with a push to the remote, which pushes it as it commits")
    return store, transfer


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
