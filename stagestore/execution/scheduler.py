"""The item scheduler: what takes an item run's items through their stages, and where.

The runner (runner.py) decides everything about an item: whether it is taken at all (a
systemic abort, a stop, a resumed run's ended items), the stages it goes through, its records,
the systemic detector.  A scheduler decides only where and when each item's body runs.  It is
given an `ItemHost`, the runner's side of the bargain, and returns one `ItemReport` per item,
in the order of the run's items:

* `LocalScheduler` (the default): a thread pool of `jobs` threads in this process;
* `dask.PoolScheduler` and `dask.DaskScheduler`: each item as a task on a
  `concurrent.futures.Executor` (a Dask cluster), possibly on other machines.

Any other scheduler needs only `ItemScheduler.run_items`: for each item, `host.before`, then
`host.body` unless `before` decided the item, then `host.after`.
"""

from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from ..model.reports import ItemReport
from . import processes

if TYPE_CHECKING:
    from ..model.records import ArtifactRef, ItemRecord
    from ..model.reports import RunEvent, StageReport
    from ..remote.transfer import Transfer
    from ..store.store import Store
    from .resilience import CircuitBreaker


class ItemHost(ABC):
    """The runner's operations on one item run, as a scheduler sees them.

    The first group is what every scheduler uses; the second is for one that runs an item's
    body in another process (`dask.PoolScheduler`), which rebuilds the body there from the
    store and hands the results back to the host."""

    run_id: str
    items: list[str]
    """The run's items, in the order they are to start."""
    jobs: int
    """How many items may run at once here (`run(jobs=...)`)."""

    @abstractmethod
    def before(self, item: str) -> tuple[ItemReport | None, ItemRecord | None]:
        """The host's decision before `item` starts: (its report, when it is not to be taken
        now, else None; its item record, if it has one).  Call in list order."""

    @abstractmethod
    def body(self, item: str, record: ItemRecord | None,
             started: Callable[[], None] | None = None) -> tuple[ItemRecord, list[StageReport]]:
        """Take `item` through its stages here: its `running` record, then its stages; returns
        its ended record and stage reports.  `started` is called once it has started.  Raises
        `processes.Interrupted` when the run is stopping (see `aborted`)."""

    @abstractmethod
    def after(self, item: str, record: ItemRecord, stages: list[StageReport]) -> ItemReport:
        """Account for an item that ended (`item_end`, the systemic detector and check, which
        may abort the run) and return its report."""

    @property
    @abstractmethod
    def aborted(self) -> bool:
        """A systemic failure aborted the run: items not ended are `not_processed`."""

    @property
    @abstractmethod
    def stopping(self) -> bool:
        """The run is stopping (aborted, interrupted, or an error): start no other item."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the run: its stage processes here are killed and no other item starts.  For a
        scheduler to call when it fails."""

    @abstractmethod
    def emit(self, event: str, stage: str | None = None, detail: str = "",
             item: str | None = None) -> None:
        """Report a progress event of this run."""

    # --- for items whose body runs in another process ---

    store: Store
    remote: Transfer | None
    """With `run(remote=..., push=True)`: the remote, which items elsewhere may use as the
    store they share with the host (see `dask.py`)."""
    stages: list[str]
    """The stages an item goes through, in order."""
    selected: list[str]
    """This invocation's stages (a body elsewhere runs as part of them)."""
    shared: dict[str, StageReport]
    """The results of the stages that run once, before the items."""
    force: bool
    breaker: CircuitBreaker
    """The run's circuit breaker, shared by every item."""

    @abstractmethod
    def start(self, item: str, record: ItemRecord | None) -> ItemRecord:
        """The first part of `body`: snapshot the item's own inputs and write its `running`
        record, unless `record` is one (then it is returned as it is)."""

    @abstractmethod
    def run_inputs(self) -> dict[str, dict[str, ArtifactRef]]:
        """The snapshots the run record holds for the per-item stages (their inputs that are
        not per item, a `call` stage's code): what a body elsewhere reads besides the item's
        own snapshots."""

    @abstractmethod
    def replay(self, events: list[RunEvent]) -> None:
        """Report progress events a body elsewhere collected, in order."""

    @abstractmethod
    def lose(self, item: str, stage: str, signal: str) -> tuple[ItemRecord, list[StageReport]]:
        """End an item whose body was lost elsewhere: failed at `stage` with an infrastructure
        failure (`InfrastructureGateFailure`, fatal) whose signal is `signal`.  Returns what
        `after` takes."""


class ItemScheduler(ABC):
    """Runs an item run's items.  `run(scheduler=...)` calls `check` first, holds `session`
    open from before the run record is written to the run's end, and calls `run_items` once,
    after the stages that run once, when there are items."""

    def check(self, *, items: bool, remote: bool, push: bool) -> None:
        """Raise a `UsageError` when this scheduler cannot run such a run (`items`: it has
        items; `remote`: a remote; `push`: it pushes there).  Cheap: no I/O."""

    @contextlib.contextmanager
    def session(self, store_root: Path, workdir: Path, *, jobs: int, remote: bool
                ) -> Iterator[None]:
        """The scheduler's resources for one run (a cluster, say), checked to be usable with
        the store at `store_root` and the workspace at `workdir`, and released at the end."""
        yield

    @abstractmethod
    def run_items(self, host: ItemHost) -> list[ItemReport]:
        """Every item of `host.items`, started in list order; their reports in that order.
        On an exception, `host.stop()` and re-raise it."""


class LocalScheduler(ItemScheduler):
    """A thread pool of `host.jobs` threads in this process.  Items start in list order
    (strictly one after another with jobs=1): item n waits until item n-1 has started."""

    def run_items(self, host: ItemHost) -> list[ItemReport]:
        turns = _Turns()
        with ThreadPoolExecutor(max_workers=host.jobs, thread_name_prefix="item") as pool:
            futures = [pool.submit(_local_item, host, turns, index, item)
                       for index, item in enumerate(host.items)]
            try:
                return [future.result() for future in futures]
            except BaseException:
                host.stop()
                for future in futures:
                    future.cancel()
                raise


def _local_item(host: ItemHost, turns: _Turns, index: int, item: str) -> ItemReport:
    turns.wait(index)
    try:
        decided, record = host.before(item)
        if decided is not None:
            return decided
        try:
            ended, stages = host.body(item, record, started=lambda: turns.take(index))
        except processes.Interrupted:
            if host.aborted:
                return ItemReport(item=item, status="not_processed")
            raise
        return host.after(item, ended, stages)
    finally:
        turns.take(index)  # a no-op once the item has started


class _Turns:
    """Items start in list order: item `index` starts only after item `index - 1` has."""

    def __init__(self) -> None:
        self._turn = threading.Condition()
        self._started = 0

    def wait(self, index: int) -> None:
        with self._turn:
            while self._started < index:
                self._turn.wait(0.1)

    def take(self, index: int) -> None:
        with self._turn:
            self._started = max(self._started, index + 1)
            self._turn.notify_all()
