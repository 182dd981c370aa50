"""The item scheduler interface (stagestore/execution/scheduler.py): a scheduler written outside
stagestore, using only `ItemScheduler` and `ItemHost`, is accepted by `run()` and gives the
local scheduler's item reports; `run()` asks it to `check` the run before anything is written
and holds its `session` around the run."""

from __future__ import annotations

import pytest

from stagestore.errors import UsageError
from stagestore.execution import processes
from stagestore.execution.runner import run
from stagestore.execution.scheduler import ItemHost, ItemScheduler, LocalScheduler
from stagestore.model.records import ExecutionOptions
from stagestore.model.reports import ItemReport
from stagestore.store.store import Store

PIPELINE = """
[pipeline]
name = "sched"

[stages.prep]
cmd = ["sh", "-c", "echo shared > {outputs.o}"]
outputs = ["o"]

[stages.fetch]
domain = "infrastructure"
upstream = ["prep"]
cmd = ["sh", "-c", "case {item} in down*) exit 3;; esac; echo {item} > {outputs.o}"]
outputs = ["o"]

[stages.build]
upstream = ["fetch"]
cmd = ["sh", "-c", "case {item} in bad*) exit 1;; esac; cat {upstream.fetch.o} > {outputs.o}"]
outputs = ["o"]
"""


class SerialScheduler(ItemScheduler):
    """Every item in the calling thread, one after another: the whole of a scheduler."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def check(self, *, items: bool, remote: bool, push: bool) -> None:
        self.calls.append("check")

    def run_items(self, host: ItemHost) -> list[ItemReport]:
        self.calls.append("run_items")
        reports = []
        for item in host.items:
            decided, record = host.before(item)
            if decided is None:
                try:
                    decided = host.after(item, *host.body(item, record))
                except processes.Interrupted:
                    if not host.aborted:
                        raise
                    decided = ItemReport(item=item, status="not_processed")
            reports.append(decided)
        return reports


def _summary(report):  # noqa: ANN001, ANN202
    return report.status, [(i.item, i.status, i.first_failure_stage,
                            i.failure.class_ if i.failure else None,
                            [(s.stage, s.outcome) for s in i.stages]) for i in report.items]


def _both(ws, items, **kwargs):  # noqa: ANN001, ANN003, ANN202
    ws.pipeline(PIPELINE)
    local = run(ws.load(), Store.create(ws.root / "local"), run_id="r", items=items,
                scheduler=LocalScheduler(), **kwargs)
    serial = SerialScheduler()
    custom = run(ws.load(), Store.create(ws.root / "serial"), run_id="r", items=items,
                 scheduler=serial, **kwargs)
    assert serial.calls == ["check", "run_items"]
    return local, custom


def test_only_run_items_is_required():
    assert ItemScheduler.__abstractmethods__ == {"run_items"}


def test_a_custom_scheduler_gives_the_local_schedulers_item_reports(ws):
    items = ["a", "bad1", "c", "down1", "e"]
    local, custom = _both(ws, items)
    assert _summary(custom) == _summary(local)
    assert local.status == "failed"
    assert [i.status for i in local.items] == ["succeeded", "failed", "succeeded", "failed",
                                               "succeeded"]
    assert [i.first_failure_stage for i in local.items] == [None, "build", None, "fetch", None]


def test_a_custom_scheduler_sees_the_systemic_abort(ws):
    items = ["down1", "down2", "down3", "ok1", "ok2"]
    options = ExecutionOptions(mode="sampling", systemic_min_items=2, systemic_threshold=0.5)
    local, custom = _both(ws, items, execution=options)
    assert _summary(custom) == _summary(local)
    assert local.status == "aborted" and local.systemic is not None
    assert [i.status for i in local.items] == ["failed", "failed", "not_processed",
                                               "not_processed", "not_processed"]


def test_a_scheduler_refuses_a_run_before_anything_is_written(ws):
    class NoRemote(SerialScheduler):
        def check(self, *, items: bool, remote: bool, push: bool) -> None:
            raise UsageError("this scheduler runs no item run")

    ws.pipeline(PIPELINE)
    store = Store.create(ws.root / "s")
    with pytest.raises(UsageError, match="runs no item run"):
        run(ws.load(), store, run_id="r", items=["a"], scheduler=NoRemote())
    assert not store.layout.run_record_path("r").exists()


def test_the_session_is_held_around_the_run(ws):
    import contextlib

    store = Store.create(ws.root / "s")
    record = store.layout.run_record_path("r")

    class Sessions(SerialScheduler):
        @contextlib.contextmanager
        def session(self, store_root, workdir, *, jobs, remote):  # noqa: ANN001, ANN202
            self.calls.append(("open", store_root, workdir, jobs, remote, record.exists()))
            try:
                yield
            finally:
                self.calls.append("close")

    ws.pipeline(PIPELINE)
    scheduler = Sessions()
    report = run(ws.load(), store, run_id="r", items=["a"], jobs=3, scheduler=scheduler)
    assert report.ok
    assert scheduler.calls == ["check", ("open", store.root, ws.root, 3, False, False),
                               "run_items", "close"]
    assert record.exists()
