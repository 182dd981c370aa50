"""Item runs on Dask (`run --items FILE --executor dask`): the same results as the local
executor, a worker killed midway, failures and the systemic abort, the circuit breaker kept on
the driver, and the usage errors.

One `LocalCluster` (two worker processes) is shared by the module; tests that need their own
cluster let `stagestore run` start one.  Stages are cheap `sh -c` commands.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import Workspace

pytest.importorskip("distributed")

ITEMS = [f"it{n:02d}" for n in range(40)]

# `derive` writes a file made from the item id and an input file; `summarize` is downstream.
FAN = """
[pipeline]
name = "fan"

[stages.derive]
cmd = ["sh", "-c", "echo {item} >> LOG; sleep 0.1; case {item} in FAILING) echo 'derive: no recipe for {item}' >&2; exit 1;; esac; cat {inputs.base} > {outputs.o}; echo {item} >> {outputs.o}"]
inputs = { base = "base.txt" }
outputs = ["o"]

[stages.summarize]
upstream = ["derive"]
cmd = ["sh", "-c", "wc -l < {upstream.derive.o} > {outputs.o}; tr a-z A-Z < {upstream.derive.o} >> {outputs.o}"]
outputs = ["o"]
"""


def _fan(ws: Workspace, failing: str = "none", items: int = len(ITEMS)) -> Path:
    log = ws.root / "log"
    ws.pipeline(FAN.replace("FAILING", failing).replace("LOG", str(log)))
    ws.write("base.txt", "base line\n")
    ws.write("items.txt", "".join(f"{item}\n" for item in ITEMS[:items]))
    return log


def _hashes(store: Path, run_id: str) -> dict[tuple[str, str], str | None]:
    from stagestore.store.store import Store

    manifests = Store.open(store).manifests
    found = {}
    for item in manifests.items(run_id):
        for stage in ("derive", "summarize"):
            manifest = manifests.read_optional(run_id, stage, item)
            found[item, stage] = None if manifest is None else manifest.output_hash
    return found


def _item_records(store: Path, run_id: str) -> dict:
    from stagestore.store.store import Store

    manifests = Store.open(store).manifests
    return {item: manifests.read_item(run_id, item) for item in manifests.items(run_id)}


def _run(ws: Workspace, store: Path, *args: str):  # noqa: ANN202
    return ws.cli("run", "--items", "items.txt", "--store", str(store), *args)


def _only_stagestore_lines(proc) -> None:  # noqa: ANN001
    """Neither a traceback nor Dask's log lines (`... - distributed.nanny - WARNING - ...`)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "distributed." not in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def cluster():  # noqa: ANN201
    """A LocalCluster of two worker processes, for the module; a client on it."""
    from distributed import Client, LocalCluster

    local = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                         dashboard_address=None, silence_logs=logging.ERROR)
    client = Client(local)
    try:
        yield local, client
    finally:
        client.close()
        local.close()


@pytest.fixture(scope="module")
def fan(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A workspace with the fan pipeline and 40 items, and the local executor's hashes."""
    root = tmp_path_factory.mktemp("fan")
    ws = Workspace(root)
    _fan(ws)
    proc = _run(ws, root / "local", "--run-id", "r", "--jobs", "2")
    assert proc.returncode == 0, proc.stderr
    hashes = _hashes(root / "local", "r")
    assert len(hashes) == 80 and all(hashes.values())
    return ws, hashes


def test_a_dask_run_gives_the_local_runs_hashes(fan):
    ws, local = fan
    store = ws.root / "dask"
    proc = _run(ws, store, "--run-id", "r", "--executor", "dask", "--jobs", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    _only_stagestore_lines(proc)
    report = json.loads(proc.stdout)
    assert report["status"] == "succeeded" and report["processed"] == 40
    assert [i["item"] for i in report["items"]] == ITEMS
    assert {(i["item"], s["stage"]) for i in report["items"] for s in i["stages"]} == set(local)
    assert _hashes(store, "r") == local
    assert all(r.status == "succeeded" for r in _item_records(store, "r").values())
    again = _run(ws, store, "--run-id", "r2", "--executor", "dask", "--jobs", "2", "--json")
    assert again.returncode == 0, again.stderr
    assert {s["outcome"] for i in json.loads(again.stdout)["items"] for s in i["stages"]} == {
        "cached"}


def test_a_worker_killed_midway_loses_no_item(fan, cluster):
    ws, local = fan
    local_cluster, client = cluster
    store = ws.root / "killed"
    killed: list[int] = []
    done = threading.Event()

    def ended() -> int:
        from stagestore.errors import StagestoreError
        from stagestore.store.store import Store

        count = 0
        try:
            manifests = Store.open(store, readonly=True).manifests
            for item in manifests.items("k"):
                record = manifests.read_item_optional("k", item)
                count += record is not None and record.status != "running"
        except (OSError, StagestoreError):
            pass
        return count

    def kill_one_busy_worker() -> None:
        while not done.is_set():
            if ended() >= 10:
                busy = [w for w, keys in client.processing().items() if keys]
                if busy:
                    pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_busy_worker, daemon=True)
    killer.start()
    try:
        proc = _run(ws, store, "--run-id", "k", "--executor", "dask",
                    "--scheduler", local_cluster.scheduler_address)
    finally:
        done.set()
        killer.join()
    client.wait_for_workers(2, timeout=60)  # the nanny restarts it, for the next tests
    assert killed, "no worker was killed: the run ended first"
    assert proc.returncode == 0, proc.stderr
    assert _hashes(store, "k") == local
    assert all(r.status == "succeeded" for r in _item_records(store, "k").values())
    verify = ws.cli("verify", "--store", str(store))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_failed_item_has_the_same_first_failure_as_locally(ws, cluster):
    local_cluster, _ = cluster
    _fan(ws, failing="it07", items=12)
    assert _run(ws, ws.root / "local", "--run-id", "f", "--jobs", "2").returncode == 1
    proc = _run(ws, ws.root / "dask", "--run-id", "f", "--executor", "dask",
                "--scheduler", local_cluster.scheduler_address)
    assert proc.returncode == 1, proc.stderr
    _only_stagestore_lines(proc)
    assert "failed: item it07 at stage derive (BuildFailure): derive: no recipe for it07" in (
        proc.stderr)
    here, there = _item_records(ws.root / "local", "f"), _item_records(ws.root / "dask", "f")
    assert {i: r.status for i, r in there.items()} == {i: r.status for i, r in here.items()}
    first = [(r.first_failure.stage, r.first_failure.failure.class_,
              r.first_failure.failure.category, r.first_failure.failure.signal)
             for r in (here["it07"], there["it07"])]
    assert first[0] == first[1] == ("derive", "BuildFailure", "fatal",
                                    "derive: no recipe for it07")
    report = ws.cli("report", "f", "--json", "--store", str(ws.root / "dask"))
    assert json.loads(report.stdout)["first_failures"] == json.loads(
        ws.cli("report", "f", "--json", "--store", str(ws.root / "local")).stdout)["first_failures"]


def test_an_item_whose_workers_keep_dying_fails_as_infrastructure(ws):
    # `kill -9 $PPID` kills the worker running the stage, each time Dask runs the task again
    # (on a cluster of the run's own: its nannies restart the workers).  It waits for the other
    # items to end first (Dask also counts a death against the tasks waiting on that worker),
    # and a little after its worker started (one killed while its nanny starts it is not
    # restarted).
    waiter = ws.root / "others_ended.py"  # format 3: item records are in the run's item log
    waiter.write_text(
        "import sys\nfrom stagestore.store.store import Store\n"
        f"m = Store.open({str(ws.store)!r}, readonly=True).manifests\n"
        "ok = [m.read_item_optional('w', i) for i in ('ok1', 'ok2')]\n"
        "sys.exit(0 if all(r is not None and r.status == 'succeeded' for r in ok) else 1)\n")
    ws.pipeline("""
        [pipeline]
        name = "dying"

        [stages.build]
        cmd = ["sh", "-c", "case {item} in boom) while ! PYTHON WAITER 2>/dev/null; do sleep 0.05; done; sleep 0.5; kill -9 $PPID;; esac; echo {item} > {outputs.o}"]
        outputs = ["o"]
        per_item = true
    """.replace("PYTHON", sys.executable).replace("WAITER", str(waiter)))
    ws.write("items.txt", "ok1\nok2\nboom\n")
    proc = ws.cli("run", "--items", "items.txt", "--run-id", "w", "--executor", "dask",
                  "--jobs", "2")
    assert proc.returncode == 1, proc.stderr
    _only_stagestore_lines(proc)
    records = _item_records(ws.store, "w")
    assert [records[i].status for i in ("ok1", "boom", "ok2")] == [
        "succeeded", "failed", "succeeded"]
    first = records["boom"].first_failure
    assert (first.stage, first.failure.class_, first.failure.category, first.failure.domain) == (
        "build", "InfrastructureGateFailure", "fatal", "infrastructure")
    assert "KilledWorker" in first.failure.signal
    assert ws.cli("verify").returncode == 0  # the dead attempts' folders are warnings


SYSTEMIC = """
[pipeline]
name = "systemic"

[stages.gate]
domain = "infrastructure"
cmd = ["sh", "-c", "sleep 0.05; echo 'gate: runner pool exhausted' >&2; exit 1"]
outputs = ["o"]

[stages.build]
upstream = ["gate"]
cmd = ["sh", "-c", "echo {item} > {outputs.o}"]
outputs = ["o"]
"""


def test_a_systemic_failure_aborts_a_dask_run(ws, cluster):
    local_cluster, _ = cluster
    ws.pipeline(SYSTEMIC)
    items = [f"s{n:02d}" for n in range(30)]
    ws.write("items.txt", "".join(f"{item}\n" for item in items))
    proc = ws.cli("run", "--items", "items.txt", "--run-id", "s", "--executor", "dask",
                  "--scheduler", local_cluster.scheduler_address, "--execution-mode", "sampling",
                  "--systemic-min-items", "5", "--json")
    assert proc.returncode == 3, proc.stderr
    _only_stagestore_lines(proc)
    report = json.loads(proc.stdout)
    assert report["status"] == "aborted" and report["systemic"]["trigger_stage"] == "gate"
    assert report["systemic"]["processed_items"] == 5
    assert 5 <= report["processed"] < 30
    records = _item_records(ws.store, "s")
    for item in report["items"]:  # the report and the item records agree
        record = records.get(item["item"])
        if item["status"] == "not_processed":
            assert record is None or record.status == "running", item
        else:
            assert record.status == item["status"] == "failed"
            assert record.first_failure.stage == "gate"
            assert record.first_failure.failure.domain == "infrastructure"
    run_record = json.loads((ws.store / "runs" / "s" / "_run.json").read_text())
    assert run_record["status"] == "aborted" and run_record["systemic"]["trigger_stage"] == "gate"


BREAKER = """
[pipeline]
name = "breaker"

[stages.build]
cmd = ["sh", "-c", "echo 'build: toolchain broken' >&2; exit 1"]
outputs = ["o"]
per_item = true
"""


def test_the_circuit_breaker_stays_on_the_driver(ws, cluster):
    local_cluster, _ = cluster
    ws.pipeline(BREAKER)
    items = [f"b{n:02d}" for n in range(12)]
    ws.write("items.txt", "".join(f"{item}\n" for item in items))
    proc = ws.cli("run", "--items", "items.txt", "--run-id", "b", "--executor", "dask",
                  "--scheduler", local_cluster.scheduler_address,
                  "--max-consecutive-failures", "2", "--log-format", "json")
    assert proc.returncode == 1, proc.stderr
    records = _item_records(ws.store, "b")
    classes = [records[item].first_failure.failure.class_ for item in items]
    assert set(classes) == {"BuildFailure", "CircuitOpenFailure"}, classes
    assert classes[:2] == ["BuildFailure", "BuildFailure"]
    assert classes.count("CircuitOpenFailure") >= 4  # two fast failures before each probe
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert any(e["event"] == "circuit_open" for e in events)


def test_probe_decisions_are_taken_and_handed_back_on_the_driver():
    from stagestore.execution.dask import BreakerCall, _gates, _settle
    from stagestore.execution.resilience import CircuitBreaker

    breaker = CircuitBreaker(2)
    assert _gates(breaker, ["s"]) == {}
    fail = [BreakerCall(stage="s", admit=True, ok=True, probe=False),
            BreakerCall(stage="s", admit=False, ok=False, probe=False, failure_class="XFailure")]
    assert _settle(breaker, {}, fail) == []
    assert _settle(breaker, _gates(breaker, ["s"]), fail) == ["s"]  # the second opens it
    for _ in range(2):  # fast failures until the next probe
        gate = _gates(breaker, ["s"])["s"]
        assert (gate.admit, gate.probe) == (False, False) and "circuit open" in gate.why
        _settle(breaker, {"s": gate}, [BreakerCall(stage="s", admit=True, ok=False, probe=False)])
    probe = _gates(breaker, ["s"])
    assert probe["s"].probe and not _gates(breaker, ["s"])["s"].admit  # one probe at a time
    _settle(breaker, probe, [])  # an item that never reached the stage hands it back
    again = _gates(breaker, ["s"])
    assert again["s"].probe
    _settle(breaker, again, [BreakerCall(stage="s", admit=True, ok=True, probe=True),
                             BreakerCall(stage="s", admit=False, ok=True, probe=True)])
    assert _gates(breaker, ["s"])["s"].admit and not _gates(breaker, ["s"])["s"].open


def test_the_pool_scheduler_takes_any_executor(ws):
    """A process pool runs `worker.run_item` as Dask does: the same results as local threads."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from stagestore.execution.dask import PoolScheduler
    from stagestore.execution.runner import run
    from stagestore.store.store import Store

    _fan(ws, failing="it03")
    items = ITEMS[:6]
    local = run(ws.load(), Store.create(ws.root / "a"), run_id="p", items=items, jobs=2)
    spawn = multiprocessing.get_context("spawn")
    elsewhere = run(ws.load(), Store.create(ws.root / "b"), run_id="p", items=items, jobs=2,
                    scheduler=PoolScheduler(
                        lambda jobs: ProcessPoolExecutor(jobs, mp_context=spawn)))
    assert elsewhere.status == local.status == "failed"
    def summary(report):  # noqa: ANN001, ANN202
        return [(i.item, i.status, i.first_failure_stage, i.failure) for i in report.items]

    assert summary(elsewhere) == summary(local)
    assert summary(local)[3][:3] == ("it03", "failed", "derive")
    assert _hashes(ws.root / "a", "p") == _hashes(ws.root / "b", "p")


def test_the_library_runs_items_on_dask(fan, cluster):
    """`run(scheduler=DaskScheduler(address))`: what `--executor dask --scheduler` does."""
    from stagestore.execution.dask import DaskScheduler
    from stagestore.execution.runner import run
    from stagestore.store.store import Store

    ws, local = fan
    local_cluster, _ = cluster
    report = run(ws.load(), Store.create(ws.root / "lib"), run_id="r", items=ITEMS[:8],
                 scheduler=DaskScheduler(local_cluster.scheduler_address))
    assert report.status == "succeeded" and report.processed == 8
    hashes = _hashes(ws.root / "lib", "r")
    assert hashes == {key: value for key, value in local.items() if key[0] in ITEMS[:8]}


# --- usage errors ----------------------------------------------------------------------------


def test_the_library_checks_a_dask_run_before_it_starts(ws, tmp_path):
    """The checks of `--executor dask`, in `run()`, in words that name no flag."""
    from stagestore.errors import UsageError
    from stagestore.execution.dask import DaskScheduler
    from stagestore.execution.runner import run
    from stagestore.store.store import Store

    _fan(ws)
    store = Store.create(ws.root / "s")
    added = ws.cli("remote", "add", "origin", f"file://{tmp_path / 'r'}")
    assert added.returncode == 0, added.stderr
    for kwargs, message in [({}, "this run has no items"),
                            ({"items": ITEMS, "remote": "origin"},
                             "the run must push to the remote")]:
        with pytest.raises(UsageError, match=message) as raised:
            run(ws.load(), store, run_id="x", scheduler=DaskScheduler("tcp://127.0.0.1:1"),
                **kwargs)
        assert "--" not in f"{raised.value.message} {raised.value.hint}"
    assert not store.layout.run_record_path("x").exists()


def _one_error(proc) -> str:  # noqa: ANN001
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    _only_stagestore_lines(proc)
    return errors[0]


def test_executor_usage_errors(ws):
    _fan(ws)
    proc = ws.cli("run", "--executor", "dask")
    assert proc.returncode == 2
    assert _one_error(proc) == ("error: the Dask scheduler runs the items of an item run, and "
                                "this run has no items")
    assert "hint: pass --items FILE, or leave out --executor dask" in proc.stderr
    proc = ws.cli("run", "--items", "items.txt", "--scheduler", "tcp://127.0.0.1:1")
    assert proc.returncode == 2
    assert _one_error(proc) == "error: --scheduler needs --executor dask"
    assert not ws.store.exists()


def test_without_dask_installed_the_dask_executor_is_a_usage_error(ws):
    _fan(ws)
    shadow = ws.root / "shadow" / "distributed"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named distributed')\n")
    proc = ws.cli("run", "--items", "items.txt", "--executor", "dask",
                  env={"PYTHONPATH": str(shadow.parent)})
    assert proc.returncode == 2
    assert _one_error(proc) == "error: items on Dask need dask.distributed, which is not installed"
    assert "hint: pip install 'stagestore[dask]'" in proc.stderr


def test_dask_logging_is_silenced_while_the_executor_lasts_and_restored_after():
    from stagestore.execution.dask import DaskExecutor

    names = ("distributed", "distributed.client", "distributed.scheduler", "dask")
    before = {name: logging.getLogger(name).level for name in names}
    pool = DaskExecutor(workers=1)
    try:
        assert all(logging.getLogger(name).getEffectiveLevel() == logging.CRITICAL
                   for name in names)
        assert pool.submit(logging.getLogger("distributed.worker").getEffectiveLevel
                           ).result() == logging.CRITICAL  # in the worker process too
    finally:
        pool.shutdown()
    assert {name: logging.getLogger(name).level for name in names} == before
