"""Several stagestore processes on one store: runs side by side, gc during a run, one run id."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import msgspec

from stagestore.inspection.gc import gc
from stagestore.store.store import Store
from stagestore.store.layout import FORMAT_VERSION
from stagestore.inspection.verify import verify

SLOW = """
[pipeline]
name = "slow-{tag}"

[stages.first]
cmd = "sleep 0.4; echo {tag}-$STAGESTORE_RUN_ID > {{outputs.o}}"
shell = true
outputs = ["o"]

[stages.second]
upstream = ["first"]
cmd = "sleep 0.4; cat {{upstream.first.o}} {{upstream.first.o}} > {{outputs.o}}"
shell = true
outputs = ["o"]
"""


def _spawn(ws, *args, pipeline="stagestore.toml"):
    env = {k: v for k, v in os.environ.items() if k != "STAGESTORE_STORE"}
    return subprocess.Popen([sys.executable, "-m", "stagestore", "run", "-p", pipeline,
                             "--store", str(ws.store), *args], cwd=ws.root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_concurrent_runs_of_two_pipelines_on_one_store_both_succeed(ws):
    ws.write("a.toml", SLOW.format(tag="a"))
    ws.write("b.toml", SLOW.format(tag="b"))
    procs = [_spawn(ws, "--run-id", f"{tag}{i}", pipeline=f"{tag}.toml")
             for i in range(2) for tag in ("a", "b")]
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    store = Store.open(ws.store)
    report = verify(store)
    assert report.ok and not report.warnings, (report.problems, report.warnings)
    assert sorted(store.manifests.runs()) == ["a0", "a1", "b0", "b1"]


def test_the_same_run_id_is_never_run_by_two_processes(ws):
    # Slow enough that the second process surely starts while the first holds the run.
    ws.write("stagestore.toml", SLOW.format(tag="x").replace("sleep 0.4", "sleep 2"))
    first = _spawn(ws, "--run-id", "shared")
    time.sleep(0.2)
    deadline = time.monotonic() + 10
    while not (ws.store / "locks" / "run-shared.lock").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    second = _spawn(ws, "--run-id", "shared")
    out2, err2 = second.communicate(timeout=60)
    out1, err1 = first.communicate(timeout=60)
    assert first.returncode == 0, err1
    assert second.returncode == 1 and "run 'shared' is in use by another live stagestore process" in err2
    assert "Traceback" not in err2
    assert verify(Store.open(ws.store)).ok


def test_gc_during_a_run_loses_nothing(ws):
    ws.write("stagestore.toml", SLOW.format(tag="g"))
    ws.write("garbage.toml", SLOW.format(tag="junk"))
    assert _spawn(ws, "--run-id", "junk", pipeline="garbage.toml").wait(timeout=60) == 0
    env = {k: v for k, v in os.environ.items() if k != "STAGESTORE_STORE"}
    subprocess.run([sys.executable, "-m", "stagestore", "forget", "junk", "--store", str(ws.store)],
                   check=True, env=env, capture_output=True)
    runner = _spawn(ws, "--run-id", "live")
    deadline = time.monotonic() + 10
    while not (ws.store / "runs" / "live" / "_run.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    collector = subprocess.run([sys.executable, "-m", "stagestore", "gc", "--json", "--store",
                                str(ws.store)], env=env, capture_output=True, text=True, timeout=60)
    assert collector.returncode == 0, collector.stderr
    _, err = runner.communicate(timeout=60)
    assert runner.returncode == 0, err
    removed = msgspec.json.decode(collector.stdout)["objects_removed"]
    assert removed >= 2  # the forgotten run's outputs went
    report = verify(Store.open(ws.store))
    assert report.ok and not report.warnings, (report.problems, report.warnings)


def test_gc_removes_only_unreferenced_objects(ws):
    ws.linear()
    from stagestore.inspection.gc import forget
    from stagestore.execution.runner import run

    store = ws.open_store()
    run(ws.load(), store, run_id="a")
    ws.write("data/f0.txt", "changed\n")
    run(ws.load(), store, run_id="b")
    kept = {ref.hash for s in ("make", "count", "report")
            for ref in store.manifests.read("b", s).outputs.values()}
    dry = gc(store, dry_run=True)
    assert dry.objects_removed == 0  # both runs still reference everything
    forget(store, ["a"])
    report = gc(store)
    assert report.objects_removed > 0 and not kept & set(report.removed)
    assert all(store.objects.exists(h) for h in kept)
    assert verify(store).ok
    assert gc(store).objects_removed == 0


COUNTED = """
[pipeline]
name = "counted"

[stages.first]
cmd = "echo first >> {log}; sleep 0.5; echo one > {{outputs.o}}"
shell = true
outputs = ["o"]

[stages.second]
upstream = ["first"]
cmd = "echo second >> {log}; sleep 0.5; cat {{upstream.first.o}} > {{outputs.o}}"
shell = true
outputs = ["o"]
"""


def test_identical_work_in_concurrent_runs_is_done_once(ws, tmp_path):
    log = tmp_path / "executions"
    ws.write("stagestore.toml", COUNTED.format(log=log))
    procs = [_spawn(ws, "--run-id", f"r{i}", "--json") for i in range(3)]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        reports.append(msgspec.json.decode(out))
    assert sorted(log.read_text().split()) == ["first", "second"]
    executed = [s["stage"] for r in reports for s in r["stages"] if s["executed"]]
    assert sorted(executed) == ["first", "second"]
    assert verify(Store.open(ws.store)).ok


def test_a_waiting_gc_holds_off_shared_holders_that_come_after_it(tmp_path):
    """The store lock prefers a waiting exclusive holder: a stream of runs cannot starve gc."""
    import threading

    import pytest

    from stagestore.errors import RunBusyError
    from stagestore.store.locking import store_lock

    layout = Store.create(tmp_path / "store").layout
    events: list[str] = []
    with store_lock(layout, exclusive=False):  # a run in progress
        waiting = threading.Thread(target=_hold_exclusive, args=(layout, events))
        waiting.start()
        deadline = time.monotonic() + 10
        while True:  # until gc holds the gate, a later shared hold still gets in
            try:
                with store_lock(layout, exclusive=False, timeout=0):
                    pass
            except RunBusyError:
                break
            assert time.monotonic() < deadline, "gc never started waiting"
            time.sleep(0.01)
        with pytest.raises(RunBusyError, match=r"locked by another stagestore process \(gc\)"):
            with store_lock(layout, exclusive=False, timeout=0.2):
                pass
        assert events == []  # gc still waits for the first run
    waiting.join(10)
    assert events == ["gc"]
    with store_lock(layout, exclusive=False, timeout=0):  # and lets go when it is done
        pass


def _hold_exclusive(layout, events: list[str]) -> None:
    from stagestore.store.locking import store_lock

    with store_lock(layout, exclusive=True):
        events.append("gc")


def _as_format_1(root):
    """Make the store at `root` look as a format-1 stagestore left it."""
    (root / "stagestore.json").write_text('{"format":"stagestore","version":1}\n')
    return Store.open(root)


def test_a_format_1_store_is_upgraded_by_the_first_store_lock(tmp_path):
    from stagestore.store.locking import store_lock

    Store.create(tmp_path / "store")
    store = _as_format_1(tmp_path / "store")
    with store_lock(store.layout, exclusive=False):
        pass
    assert msgspec.json.decode((tmp_path / "store" / "stagestore.json").read_bytes()) == {
        "format": "stagestore", "version": FORMAT_VERSION}  # and on to the current format
    assert store.layout.format_version == FORMAT_VERSION
    assert sorted(os.listdir(tmp_path / "store" / "tmp")) == []
    assert Store.open(tmp_path / "store").layout.format_version == FORMAT_VERSION


def test_a_format_1_store_in_use_by_an_older_stagestore_is_not_upgraded(tmp_path, monkeypatch):
    """The older process holds format 1's SQLite lock; the upgrade waits, then says so."""
    import pytest
    from filelock import ReadWriteLock

    from stagestore.store import locking
    from stagestore.errors import RunBusyError

    Store.create(tmp_path / "store")
    store = _as_format_1(tmp_path / "store")
    monkeypatch.setattr(locking, "LEGACY_LOCK_WAIT", 0.1)
    older = ReadWriteLock(os.fspath(store.layout.legacy_store_lock), is_singleton=False)
    with older.read_lock():  # a format-1 run in progress
        with pytest.raises(RunBusyError, match="in use by an older stagestore"):
            with locking.store_lock(store.layout, exclusive=False):
                pass
    assert b'"version":1' in (tmp_path / "store" / "stagestore.json").read_bytes()
    with locking.store_lock(store.layout, exclusive=False):  # it has finished
        pass
    assert store.layout.format_version == FORMAT_VERSION
