"""Every change stagestore makes inside a store goes through `stagestore.durable`."""

from __future__ import annotations

import os
import sys
import traceback

from stagestore import durable
from stagestore.reclaim import forget, gc
from stagestore.recovery import recover
from stagestore.runner import run
from stagestore.verification import verify

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_EVENTS = {"os.rename", "os.remove", "os.mkdir", "os.link", "os.chmod", "os.rmdir",
           "os.symlink", "os.truncate", "shutil.rmtree", "os.utime"}
_watch: dict = {"root": None, "violations": []}


def _audit(event: str, args: tuple) -> None:
    root = _watch["root"]
    if root is None:
        return
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(flags, int) and flags & _WRITE_FLAGS) or (
            isinstance(mode, str) and any(c in mode for c in "wax+"))
        if not writes:
            return
    elif event not in _EVENTS:
        return
    else:
        path = args[0]
    if not isinstance(path, (str, bytes, os.PathLike)):
        return
    path = os.path.abspath(os.fsdecode(path))
    if not path.startswith(root + os.sep) or path.startswith(os.path.join(root, "locks") + os.sep):
        return
    stack = traceback.extract_stack()
    if not any(frame.filename == durable.__file__ for frame in stack):
        caller = next((f for f in reversed(stack) if "stagestore" in f.filename
                       and "tests" not in f.filename), stack[-2])
        _watch["violations"].append(f"{event} {path} from {caller.filename}:{caller.lineno}")


sys.addaudithook(_audit)


def test_no_module_but_durable_writes_into_the_store(ws):
    ws.linear()
    store = ws.open_store()
    _watch["root"] = str(store.root)
    try:
        run(ws.load(), store, run_id="a")
        ws.write("steps/count.py", "import sys\nsys.exit(1)\n")
        run(ws.load(), store, run_id="b", force=True)
        (store.root / "runs" / "a" / "report.json").unlink()  # the test's own damage
        _watch["violations"].clear()
        recover(store)
        verify(store)
        forget(store, ["b"])
        gc(store)
    finally:
        _watch["root"] = None
    assert _watch["violations"] == []


def test_the_audit_catches_a_write_outside_the_seam(ws):
    store = ws.open_store()
    _watch["root"] = str(store.root)
    try:
        with open(store.root / "tmp" / "sneaky", "w") as f:
            f.write("x")
    finally:
        _watch["root"] = None
    assert len(_watch["violations"]) == 1 and "sneaky" in _watch["violations"][0]
    _watch["violations"].clear()


def test_item_runs_fallbacks_and_reports_write_only_through_durable(ws):
    """The failure model's writes too: item records, degraded manifests, the systemic abort."""
    from stagestore.health import doctor
    from stagestore.records import ExecutionOptions
    from stagestore.stats import stage_stats
    from stagestore.taxonomy import failure_report

    ws.pipeline("""
        [pipeline]
        name = "seam-items"

        [stages.gate]
        domain = "infrastructure"
        cmd = ["sh", "-c", "case {item} in bad*) echo 'gate: down' >&2; exit 1;; esac; echo {item} > {outputs.o}"]
        outputs = ["o"]

        [stages.build]
        upstream = ["gate"]
        cmd = ["sh", "-c", "cat {upstream.gate.o} > {outputs.o}"]
        outputs = ["o"]
        on_failure = "use_last_good"
    """)
    store = ws.open_store()
    _watch["root"] = str(store.root)
    try:
        run(ws.load(), store, run_id="a", items=["x", "y", "bad1"])
        ws.pipeline_file.write_text(ws.pipeline_file.read_text().replace(
            'cat {upstream.gate.o} > {outputs.o}', 'exit 1'))
        degraded = run(ws.load(), store, run_id="b", items=["x", "y", "bad1"])
        aborted = run(ws.load(), store, run_id="c", items=["bad1", "bad2", "bad3"],
                      execution=ExecutionOptions(mode="sampling", systemic_min_items=2))
        assert [i.status for i in degraded.items] == ["degraded", "degraded", "failed"]
        assert aborted.status == "aborted"
        failure_report(store, "c")
        doctor(store)
        stage_stats(store)
        recover(store)
        verify(store)
        forget(store, ["a"])
        gc(store)
    finally:
        _watch["root"] = None
    assert _watch["violations"] == []
