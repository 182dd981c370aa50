"""Every change stagestore makes inside a store goes through `stagestore.store.durable`."""

from __future__ import annotations

import os
import sys
import traceback

from stagestore.store import durable
from stagestore.inspection.gc import forget, gc
from stagestore.inspection.recover import recover
from stagestore.execution.runner import run
from stagestore.inspection.verify import verify

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
    from stagestore.inspection.doctor import doctor
    from stagestore.model.records import ExecutionOptions
    from stagestore.inspection.stats import stage_stats
    from stagestore.inspection.report import failure_report

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


def _push_and_pull_through_a_folder_remote(ws, tmp_path) -> list[str]:  # noqa: ANN001
    """Push a run to a folder remote, auditing the remote's folder, and pull it into a new
    store, auditing that store; the violations seen."""
    from stagestore.remote.remotes import add_remote
    from stagestore.remote.storage import PART_SIZE
    from stagestore.store.store import Store
    from stagestore.remote.transfer import pull, push

    ws.linear()
    ws.write("data/big.txt", "x" * (PART_SIZE + 1))  # sent from its file, not from bytes
    store = ws.open_store()
    run(ws.load(), store, run_id="a")
    remote = tmp_path / "remote"
    other = Store.create(tmp_path / "other")
    _watch["violations"].clear()
    try:
        _watch["root"] = str(remote)
        add_remote(store.layout, "origin", f"file://{remote}")  # the probe: create, delete
        push(store, ["a"])
        _watch["root"] = str(other.root)
        add_remote(other.layout, "origin", f"file://{remote}")
        pull(other, ["a"])
    finally:
        _watch["root"] = None
    violations = list(_watch["violations"])
    _watch["violations"].clear()
    return violations


def test_a_folder_remote_is_written_only_through_durable(ws, tmp_path):
    """The folder remote (`FileStorage`) shares the store's seam: its temps, copies, fsyncs,
    links, renames, folders and removals all go through `durable`."""
    assert _push_and_pull_through_a_folder_remote(ws, tmp_path) == []


def test_the_audit_catches_a_folder_remote_write_outside_the_seam(ws, tmp_path, monkeypatch):
    from stagestore.remote.storage import FileStorage

    def sneaky(self, key, data):  # noqa: ANN001, ANN202
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    monkeypatch.setattr(FileStorage, "write", sneaky)
    violations = _push_and_pull_through_a_folder_remote(ws, tmp_path)
    assert any(v.startswith("open ") for v in violations)
    assert all(v.split()[1].startswith(f"{tmp_path / 'remote'}/") for v in violations)


# --- checks, remote hits and pull (issue 14, defect 7) ------------------------------------------


def _stage_write_order(store_root, action) -> list[str]:
    """Run `action()` with the seam's recorder on, and return what breaks docs/format.md's
    "Manifest last" for the stage results it wrote: a cache entry renamed into place without
    a rename of the manifest it names coming after it."""
    from stagestore.model.records import CacheEntry, decode_record
    from stagestore.store.store import Store

    layout = Store(store_root).layout
    cache_dir = str(layout.cache) + os.sep
    log: list[tuple[str, str, str | None]] = []

    def record(op: str, path: str, src: str | None) -> None:
        named = None
        if op == "rename" and path.startswith(cache_dir) and src is not None:
            # Read the temp before the rename: which manifest this entry makes findable.
            with open(src, "rb") as f:
                entry: CacheEntry = decode_record(f.read(), CacheEntry, src)
            named = str(layout.manifest_path(entry.run_id, entry.stage, entry.item))
        log.append((op, path, named))

    previous = durable.set_recorder(record)
    try:
        action()
    finally:
        durable.set_recorder(previous)
    problems = []
    for index, (op, path, named) in enumerate(log):
        if named is None:
            continue
        if not any(o == "rename" and p == named for o, p, _ in log[index + 1:]):
            problems.append(f"cache entry {path} written after (or without) its manifest {named}")
    assert any(named for _, _, named in log), "the action wrote no cache entry: nothing checked"
    return problems


def test_check_commands_write_their_stderr_only_through_durable(ws):
    ws.pipeline("""
        [pipeline]
        name = "seam-checks"

        [stages.gen]
        cmd = ["sh", "-c", "echo '{{}}' > {outputs.o}"]
        outputs = ["o"]
        checks = [{ cmd = ["sh", "-c", "echo checking {outputs.o} >&2; test -s {outputs.o}"] }]
    """)
    store = ws.open_store()
    _watch["root"] = str(store.root)
    try:
        report = run(ws.load(), store, run_id="a")
    finally:
        _watch["root"] = None
    violations, _watch["violations"] = list(_watch["violations"]), []
    assert report.ok, report
    assert violations == []


def test_remote_hits_and_pull_write_through_durable_cache_entry_before_manifest(ws, tmp_path):
    """`run --remote` reusing every stage from a folder remote, and `pull` into a fresh store:
    every write through the seam, and each cache entry before the manifest it names."""
    from stagestore.remote.remotes import add_remote
    from stagestore.store.store import Store
    from stagestore.remote.transfer import pull, push

    url = f"file://{tmp_path / 'remote'}"
    ws.linear()
    origin = ws.open_store()
    add_remote(origin.layout, "origin", url)
    assert run(ws.load(), origin, run_id="a").ok
    assert push(origin, ["a"], remote="origin").ok

    hits = Store.create(tmp_path / "hits")
    add_remote(hits.layout, "origin", url)
    reports: list = []
    _watch["root"] = str(hits.root)
    try:
        order = _stage_write_order(hits.root, lambda: reports.append(
            run(ws.load(), hits, run_id="b", remote="origin")))
    finally:
        _watch["root"] = None
    violations, _watch["violations"] = list(_watch["violations"]), []
    assert [s.outcome for s in reports[0].stages] == ["cached"] * 3  # all remote hits
    assert violations == []
    assert order == []

    pulled = Store.create(tmp_path / "pulled")
    add_remote(pulled.layout, "origin", url)
    _watch["root"] = str(pulled.root)
    try:
        order = _stage_write_order(pulled.root, lambda: reports.append(
            pull(pulled, ["a"], remote="origin")))
    finally:
        _watch["root"] = None
    violations, _watch["violations"] = list(_watch["violations"]), []
    assert reports[1].ok and reports[1].manifests_pulled == 3
    assert violations == []
    assert order == []
