"""Item runs in other processes or on other machines: `run(scheduler=DaskScheduler(...))`, the
CLI's `stagestore run --items FILE --executor dask`.

The driver (the `stagestore run` process) keeps every decision of an item run; only the body of
an item runs elsewhere.  `PoolScheduler` is an item scheduler (scheduler.py) that, through the
run's `ItemHost`, does:

* driver, before (`ItemHost.before`): systemic abort, interrupt and resume decisions;
* elsewhere (`worker.run_item(ItemTask) -> ItemOutcome`, a module-level function of plain,
  picklable msgspec data): open the store at `ItemTask.store_root`, read the run record,
  snapshot the item's own inputs, write its `running` record, take it through its stages, write
  its end record (the runner's `Execution.item_body`, the code a local item runs);
* driver, after (`ItemHost.after`): the systemic detector and check, `item_end`.

`PoolScheduler` runs the tasks on a `concurrent.futures.Executor` its factory makes: it submits
`run_item(task)` for each item, in list order, keeping at most as many in flight as the
executor has slots (`slots()`, else `jobs`), so items start in list order and a decision taken
on the driver (an open circuit, a systemic abort) reaches the next items submitted.
`DaskScheduler` is the one on Dask (`DaskExecutor`); any other Executor that runs picklable
calls in processes seeing the same paths works too (`ProcessPoolExecutor` does).

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

import contextlib
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from pathlib import Path
from typing import Any

import msgspec

from ..errors import CorruptRecordError, StagestoreError, UsageError
from ..model.records import ItemRecord
from ..model.reports import ItemReport, StageReport
from ..store.layout import run_owner
from .resilience import CircuitBreaker
from .scheduler import ItemHost, ItemScheduler
from .worker import (BreakerCall, Gate, ItemOutcome, ItemTask, missing_paths, run_item,
                     stop_items)

DASK_HINT = "pip install 'stagestore[dask]'"
CONNECT_TIMEOUT = 10  # seconds to reach a scheduler
SIGNAL_LIMIT = 1000  # characters of a lost item's signal
NO_WORKERS_GRACE = 30.0  # seconds a LocalCluster may have no worker before the run gives up

ExecutorFactory = Callable[[int], Executor]
"""Makes the executor of one item run, given the run's `jobs`; used as a context manager for
the items (shut down when they have run)."""


# --- the driver side -----------------------------------------------------------------------------


class PoolScheduler(ItemScheduler):
    """Each item as a `worker.run_item` task on the executor `executor` makes, in processes
    that see the store and the workspace at the same paths as this one or, with a remote the
    run pushes to, in scratch stores of their own (see the module docstring)."""

    name = "pool"  # as the scheduler's messages call it

    def __init__(self, executor: ExecutorFactory) -> None:
        self.executor = executor

    def check(self, *, items: bool, remote: bool, push: bool) -> None:
        """Items elsewhere need an item run; with a remote, that the run pushes to it."""
        if not items:
            raise UsageError(f"the {self.name} scheduler runs the items of an item run, and "
                             "this run has no items",
                             hint="give the run its items, or leave the scheduler out (items "
                                  "then run here)")
        if remote and not push:
            raise UsageError(f"the {self.name} scheduler with a remote runs items in scratch "
                             "stores on the workers, which take the run's shared results from "
                             "the remote and push their own there: the run must push to the "
                             "remote",
                             hint="push to the remote (or run without a remote: workers then "
                                  "share the store)")

    def run_items(self, host: ItemHost) -> list[ItemReport]:
        """Every item of the run as a `run_item` task; see the module docstring."""
        items = host.items
        reports: dict[int, ItemReport] = {}
        token = f"{host.run_id}~{os.urandom(6).hex()}"
        breaker = host.breaker
        if host.remote is not None:  # what every item's scratch store fetches
            host.remote.send_inputs(host.run_inputs())
        with self.executor(host.jobs) as pool:
            slots: Callable[[], int] | None = getattr(pool, "slots", None)
            stop: Callable[[str], Any] | None = getattr(pool, "stop", None)
            running: dict[Future[ItemOutcome], tuple[int, ItemTask]] = {}
            position, stopped = 0, False
            try:
                while position < len(items) or running:
                    room = max(1, slots() if slots is not None else host.jobs) - len(running)
                    while position < len(items) and room > 0:
                        index, item = position, items[position]
                        position += 1
                        decided, record = host.before(item)
                        if decided is not None:
                            reports[index] = decided
                            continue
                        task = ItemTask(
                            store_root=str(host.store.root), run_id=host.run_id, item=item,
                            selected=list(host.selected), shared=host.shared, force=host.force,
                            seen_ended_at=record.finished_at if record is not None and
                            record.status != "running" else None,
                            breaker_limit=breaker.limit, gates=_gates(breaker, host.stages),
                            stop_token=token)
                        if host.remote is not None:
                            task = _for_remote(host, task, record)
                        running[pool.submit(run_item, task)] = (index, task)
                        room -= 1
                    if not running:
                        continue
                    # No reference to a future is kept once it is handled: Dask then forgets
                    # its result, and does not compute it again when the worker holding it dies.
                    done = sorted(wait(running, timeout=1.0, return_when=FIRST_COMPLETED).done,
                                  key=lambda f: running[f][0])
                    while done:
                        index, task = running.pop(done[0])
                        reports[index] = _returned(host, task, done.pop(0))
                    if host.aborted and not stopped:
                        stopped = True
                        stop_items(token)  # those running in this process (an executor of threads)
                        if stop is not None:
                            stop(token)
            except BaseException:
                host.stop()
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


class DaskScheduler(PoolScheduler):
    """Each item as a task on a Dask cluster: the scheduler at `address`, or a `LocalCluster`
    of `local_workers(jobs)` processes started for the run and closed at its end (`session`).
    `debug`: Dask's log lines are shown (from INFO up) rather than silenced.  Raises a
    `UsageError` when Dask is not installed."""

    name = "Dask"

    def __init__(self, address: str | None = None, *, debug: bool = False) -> None:
        require_dask()
        self.address = address
        self.debug = debug
        self._pool: DaskExecutor | None = None
        super().__init__(self._executor)

    def _executor(self, jobs: int) -> DaskExecutor:
        if self._pool is None:
            raise StagestoreError("DaskScheduler.run_items called outside its session")
        return self._pool

    @contextlib.contextmanager
    def session(self, store_root: Path, workdir: Path, *, jobs: int, remote: bool
                ) -> Iterator[None]:
        """Connect to the cluster (or start the local one), check that every worker sees the
        workspace and, unless items run in scratch stores (`remote`), the store; closed when
        the run ends, however it ends."""
        pool = DaskExecutor(self.address, workers=local_workers(jobs), debug=self.debug)
        try:
            pool.check_paths(([] if remote else [str(store_root)]) + [str(workdir)], remote)
            self._pool = pool
            yield
        finally:
            self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)  # a no-op once the items have run


def _for_remote(host: ItemHost, task: ItemTask, record: ItemRecord | None) -> ItemTask:
    """A task for a worker's scratch store: the driver snapshots the item's inputs here (the
    worker may not see the workspace), writes the `running` record and pushes the snapshots;
    the task carries the run record and that item record."""
    assert host.remote is not None and host.remote.spec is not None
    record = host.start(task.item, record)
    host.remote.send_inputs(record.inputs)
    run_record = host.store.layout.run_record_path(host.run_id).read_bytes()
    return msgspec.structs.replace(task, remote=host.remote.spec, run_record=run_record,
                                   item_record=record)


def _results_home(host: ItemHost, task: ItemTask, outcome: ItemOutcome) -> None:
    """Remote mode: the item's manifests (and their objects) pulled from the remote, and its
    ended record written, so the driver's store holds the whole run."""
    assert host.remote is not None and outcome.record is not None
    owner = run_owner(host.run_id)
    for stage in host.stages:  # those it has no manifest of (skipped, not reached) are absent
        host.remote.fetch_manifest(host.run_id, stage, task.item, owner)
    host.store.manifests.write_item(outcome.record, owner)


def _returned(host: ItemHost, task: ItemTask, future: Future[ItemOutcome]) -> ItemReport:
    """The driver's part after an item's task: replay its events, apply its breaker calls,
    then what a local item does when it ends."""
    breaker = host.breaker
    try:
        outcome = future.result()
    except Exception as exc:  # noqa: BLE001 - the task did not complete (e.g. KilledWorker)
        _settle(breaker, task.gates, [])
        return host.after(task.item, *_lost(host, task.item, exc))
    if outcome.status == "error":
        _settle(breaker, task.gates, [])
        raise _raised(outcome) from None  # as a local run raises it
    host.replay(outcome.events)
    for stage in _settle(breaker, task.gates, outcome.breaker):
        if not any(e.event == "circuit_open" and e.stage == stage for e in outcome.events):
            host.emit("circuit_open", stage, (
                f"circuit opened: stage {stage!r} failed {breaker.limit} times in a row; later "
                "items fail fast here until a probe item succeeds"), task.item)
    if outcome.status in ("interrupted", "not_started"):
        if host.stopping:
            return ItemReport(item=task.item, status="not_processed")
        return host.after(task.item, *_lost(host, task.item, RuntimeError(
            "the item was stopped on its worker")))
    assert outcome.record is not None
    if task.remote is not None:
        _results_home(host, task, outcome)
    return host.after(task.item, outcome.record, outcome.stages)


def _raised(outcome: ItemOutcome) -> BaseException:
    """The exception an item's task returned, as the driver re-raises it."""
    if outcome.error:
        try:
            return pickle.loads(outcome.error)  # noqa: S301 - our own worker pickled it
        except Exception:  # noqa: BLE001 - e.g. a class the driver cannot import
            pass
    return StagestoreError(f"an item's task failed on its worker: {outcome.error_text}")


def _lost(host: ItemHost, item: str, exc: BaseException
          ) -> tuple[ItemRecord, list[StageReport]]:
    """An item whose task did not complete: failed, with an infrastructure failure at the
    first stage it had not finished."""
    cause = " ".join(f"{type(exc).__name__}: {exc}".split())
    signal = f"the item's task did not complete on the cluster: {cause}"[:SIGNAL_LIMIT]
    return host.lose(item, _unfinished_stage(host, item), signal)


def _unfinished_stage(host: ItemHost, item: str) -> str:
    for stage in host.stages:
        try:
            manifest = host.store.manifests.read_optional(host.run_id, stage, item)
        except CorruptRecordError:
            manifest = None
        if manifest is None or manifest.status == "failed":
            return stage
    return host.stages[-1]


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
        raise UsageError("items on Dask need dask.distributed, which is not installed",
                         hint=DASK_HINT) from None
    return distributed


def local_workers(jobs: int) -> int:
    """The worker processes of the `LocalCluster` for `jobs`: jobs when above 1, else one
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
                                  "or give no scheduler address for a local cluster") from None
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
                    hint="run again with Dask's messages shown (debug) to see why; `stagestore "
                         "recover` completes the run")
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
                                  "with a remote the run pushes to")

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
