"""`stagestore doctor` (stagestore.inspection.doctor) and `stagestore stats` (stagestore.inspection.stats)."""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import STEPS, Workspace
from stagestore.inspection import doctor as health
from stagestore.inspection.doctor import doctor
from stagestore.store.locking import OwnerLock
from stagestore.store.layout import FORMAT_VERSION
from stagestore.inspection.gc import gc
from stagestore.model.records import (ArtifactRef, Failure, PipelineRef, StageManifest,
                                      encode_record)
from stagestore.execution.runner import run
from stagestore.inspection.stats import _one, percentile, stage_stats
from stagestore.store.store import Store

CHECKS = ["format", "free_disk", "filesystem", "locks", "temps", "runs", "records"]
ORPHAN = "run-zzz~0123456789abcdef~x"

# `count` fails with exit code 75, classified retryable, and is retried twice.
RETRYABLE_COUNT = ('outputs = ["n"]\nretries = 2\nretry_delay = 0.01\n'
                   '[[stages.count.classify]]\nexit_code = 75\n'
                   'class = "DependencyResolutionFailure"\ncategory = "retryable"\n')


def _doctor_lines(out: str) -> dict[str, tuple[str, str]]:
    """`doctor` output as name -> (status, message); every line has the documented shape."""
    found = {}
    for line in out.splitlines():
        status, name, message = line[:8].strip(), line[9:20].strip(), line[21:]
        assert status in ("ok", "warning", "problem"), line
        assert line[8] == " " and line[20] == " " and message, line
        found[name] = (status, message)
    return found


def _checks(report) -> dict[str, tuple[str, str]]:
    return {c.name: (c.status, c.message) for c in report.checks}


def _clean_cli(res) -> None:
    assert "Traceback" not in res.stdout + res.stderr, res.stderr


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """One workspace with one succeeded run `a` of the linear pipeline, copied per test."""
    root = tmp_path_factory.mktemp("template") / "ws"
    root.mkdir()
    ws = Workspace(root)
    ws.linear()
    assert run(ws.load(), ws.open_store(), run_id="a").ok
    return root


@pytest.fixture
def ran(template: Path, tmp_path: Path) -> Workspace:
    root = tmp_path / "ran"
    shutil.copytree(template, root)
    return Workspace(root)


@pytest.fixture(scope="module")
def flaky(tmp_path_factory) -> Path:
    """Run `a`: count fails retryably 3 times.  Run `b`: count fixed, make reused."""
    root = tmp_path_factory.mktemp("flaky") / "ws"
    root.mkdir()
    ws = Workspace(root)
    ws.linear()
    ws.write("steps/count.py", "import sys\nsys.exit(75)\n")
    ws.pipeline_file.write_text(ws.pipeline_file.read_text().replace('outputs = ["n"]',
                                                                      RETRYABLE_COUNT))
    assert run(ws.load(), ws.open_store(), run_id="a").status == "failed"
    ws.write("steps/count.py", STEPS["steps/count.py"])
    assert run(ws.load(), ws.open_store(), run_id="b").ok
    return root


# --- doctor -------------------------------------------------------------------------------------


def test_doctor_on_a_healthy_store_is_all_ok_and_exits_0(ran):
    # idle work-*.lock files a run leaves behind are expected: still all ok
    res = ran.cli("doctor")
    assert res.returncode == 0, res.stderr
    _clean_cli(res)
    lines = _doctor_lines(res.stdout)
    assert list(lines) == CHECKS
    assert lines["format"] == ("ok", f"store format version {FORMAT_VERSION}")
    for name in ("locks", "temps", "runs"):
        assert lines[name][0] == "ok", lines[name]
    assert lines["free_disk"][0] != "problem"  # depends on this machine's disk
    assert "free" in lines["free_disk"][1]

    report = json.loads(ran.cli("doctor", "--json").stdout)
    assert report["ok"] is True
    assert [c["name"] for c in report["checks"]] == CHECKS
    assert set(report["checks"][0]) == {"name", "status", "message"}


def test_orphaned_temp_is_a_warning_and_exits_0(ran):
    orphan = ran.store / "tmp" / ORPHAN
    orphan.mkdir()
    (orphan / "part").write_bytes(b"x" * 10)
    held = OwnerLock(ran.open_store().layout, "run-busy")
    (ran.store / "tmp" / "run-busy~0123456789abcdef~y").mkdir()  # its owner is live: not orphaned
    assert held.try_acquire()
    try:
        res = ran.cli("doctor")
    finally:
        held.release()
    assert res.returncode == 0, res.stderr
    status, message = _doctor_lines(res.stdout)["temps"]
    assert status == "warning"
    assert message.startswith("1 orphaned temp (10 B)") and "`stagestore recover` removes" in message
    assert orphan.is_dir()  # doctor is read-only


def test_unreadable_run_record_is_a_problem_and_exits_1(ran):
    (ran.store / "runs" / "a" / "_run.json").write_text("{not json")
    res = ran.cli("doctor")
    assert res.returncode == 1
    _clean_cli(res)
    status, message = _doctor_lines(res.stdout)["runs"]
    assert status == "problem"
    assert "(a)" in message and "`stagestore verify`" in message
    assert json.loads(ran.cli("doctor", "--json").stdout)["ok"] is False


def test_interrupted_run_is_a_warning(ran):
    store = ran.open_store()
    import msgspec

    record = store.manifests.read_run("a")
    path = store.layout.run_record_path("a")
    path.write_bytes(encode_record(msgspec.structs.replace(record, finished_at=None)))
    report = doctor(store)
    status, message = _checks(report)["runs"]
    assert report.ok and status == "warning"
    assert "1 incomplete run (a)" in message and "`stagestore recover` completes it" in message
    held = OwnerLock(store.layout, "run-a")
    assert held.try_acquire()  # a live run is running, not incomplete
    try:
        assert _checks(doctor(store))["runs"] == ("ok", "1 run, none incomplete (1 running)")
    finally:
        held.release()


def test_stale_lock_files_are_a_warning_and_left_alone(ran):
    store = ran.open_store()
    gc(store)
    locks = store.layout.locks
    for name in ("work-abc.lock", "run-gone.lock", "work-held.lock"):
        (locks / name).touch()
    held = OwnerLock(store.layout, "work-held")
    assert held.try_acquire()
    try:
        status, message = _checks(doctor(store))["locks"]
    finally:
        held.release()
    # run-a.lock belongs to an existing run; work-held.lock is held: neither is stale.
    assert status == "warning"
    assert message.startswith("1 stale run lock file") and "`stagestore gc` removes them" in message
    assert "1 idle work lock" in message
    assert {p.name for p in locks.iterdir()} >= {"work-abc.lock", "run-gone.lock", "run-a.lock"}


# --- doctor on a damaged store (issue 14, defect 8) ---------------------------------------------


def _listing(root: Path) -> dict[str, tuple]:
    """Every entry under `root`, with what a write would change: type, mode, size, mtime."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            found[os.path.relpath(path, root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    st = os.lstat(root)
    found["."] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return found


def _records_line(ws: Workspace) -> tuple[int, str, str]:
    res = ws.cli("doctor")
    _clean_cli(res)
    status, message = _doctor_lines(res.stdout)["records"]
    return res.returncode, status, message


def test_doctor_reports_a_truncated_manifest_by_path_and_exits_1(ran):
    path = ran.store / "runs" / "a" / "count.json"
    path.write_bytes(path.read_bytes()[:40])
    code, status, message = _records_line(ran)
    assert code == 1 and status == "problem"
    assert f"{path} is damaged (not a valid StageManifest" in message
    assert "`stagestore recover`" in message
    report = json.loads(ran.cli("doctor", "--json").stdout)
    assert report["ok"] is False


def test_doctor_reports_a_deleted_manifest_the_run_record_names(ran):
    path = ran.store / "runs" / "a" / "report.json"
    path.unlink()
    code, status, message = _records_line(ran)
    assert code == 1 and status == "problem"
    assert str(path) in message and "missing" in message and "run a" in message


def test_doctor_reports_a_newer_format_manifest(ran):
    path = ran.store / "runs" / "a" / "make.json"
    data = json.loads(path.read_text())
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    code, status, message = _records_line(ran)
    assert code == 1 and status == "problem"
    assert str(path) in message and "upgrade stagestore" in message


def test_doctor_decodes_item_manifests_and_item_records(ws):
    ws.pipeline("""
        [pipeline]
        name = "doctor-items"

        [stages.gen]
        cmd = ["sh", "-c", "echo {item} > {outputs.o}"]
        outputs = ["o"]
    """)
    assert run(ws.load(), ws.open_store(), run_id="a", items=["x", "y"]).ok
    assert _records_line(ws)[:2] == (0, "ok")
    store = ws.open_store()  # format 3: item records are in the run's item log
    store.manifests.install("a", "x", "gen.json", b"{", "run-a")
    store.manifests.install("a", "y", "_item.json", b"[]", "run-a")
    store.manifests.close_items("a")
    manifest, record = store.manifests.location("a", "gen", "x"), store.manifests.item_location("a", "y")
    code, status, message = _records_line(ws)
    assert code == 1 and status == "problem"
    assert manifest in message and record in message


def test_doctor_does_not_vouch_for_object_contents(ran):
    """Doctor re-hashes nothing, so it must say so, and name the command that does."""
    manifest = json.loads((ran.store / "runs" / "a" / "report.json").read_text())
    digest = manifest["outputs"]["text"]["hash"].removeprefix("blake3:")
    obj = ran.store / "objects" / digest[:2] / digest[2:]
    obj.chmod(0o644)
    data = bytearray(obj.read_bytes())
    data[0] ^= 0xFF
    obj.write_bytes(bytes(data))
    code, status, message = _records_line(ran)
    assert code == 0 and status == "ok"  # cheap: the damage is not found here ...
    assert "object contents were not checked" in message and "`stagestore verify`" in message
    report = json.loads(ran.cli("doctor", "--json").stdout)
    assert report["objects_checked"] is False and report["deep_check"] == "stagestore verify"
    assert ran.cli("verify").returncode == 1  # ... but where doctor says it would be


def test_doctor_writes_nothing_and_creates_no_folders(ran):
    shutil.rmtree(ran.store / "tmp")
    shutil.rmtree(ran.store / "locks")
    (ran.store / "runs" / "a" / "count.json").write_text("{")  # a problem to report, too
    before = _listing(ran.store)
    for args in (("doctor",), ("doctor", "--json")):
        res = ran.cli(*args)
        _clean_cli(res)
        assert not (ran.store / "tmp").exists() and not (ran.store / "locks").exists()
        assert _listing(ran.store) == before
        assert res.returncode == 1, res.stdout + res.stderr


def test_doctor_leaves_existing_lock_files_and_a_format_1_store_alone(ran):
    store = ran.open_store()
    (store.layout.locks / "run-gone.lock").touch()
    fmt = ran.store / "stagestore.json"
    fmt.write_text('{"version": 1}\n')  # an older store: any store lock would upgrade it
    before = _listing(ran.store)
    res = ran.cli("doctor")
    _clean_cli(res)
    assert _listing(ran.store) == before
    assert _doctor_lines(res.stdout)["format"][0] == "ok"


@pytest.mark.parametrize("free, status, words", [
    (10, "problem", "less than the 28 B a run may need"),
    (40, "warning", "less than twice the 28 B"),
    (100 * 1024 ** 2, "warning", "less than 1.0 GiB"),
    (10 * 1024 ** 3, "ok", "10.0 GiB free; a run may need 28 B"),
])
def test_free_disk_against_the_largest_recent_output(ran, monkeypatch, free, status, words):
    # The largest output of run `a` is make's folder `out`: 3 files of 8 bytes = 24 B; x1.2 = 28.
    monkeypatch.setattr(health, "free_bytes", lambda path: free)
    report = doctor(ran.open_store())
    assert _checks(report)["free_disk"][0] == status
    assert words in _checks(report)["free_disk"][1]
    assert report.ok == (status != "problem")


def _mounts(tmp_path: Path, monkeypatch, lines: list[str]) -> None:
    table = tmp_path / "mounts"
    table.write_text("".join(line + "\n" for line in lines))
    monkeypatch.setattr(health, "MOUNTS_FILE", str(table))


def test_store_on_a_network_filesystem_is_a_warning(tmp_path, monkeypatch):
    store = Store.create(tmp_path / "shared dir" / "store")
    shared = os.path.realpath(tmp_path / "shared dir").replace(" ", "\\040")
    _mounts(tmp_path, monkeypatch, ["/dev/vda / ext4 rw 0 0",
                                    f"server:/export {shared} nfs4 rw,relatime 0 0",
                                    f"/dev/vdb {shared}x ext4 rw 0 0"])
    report = doctor(store)
    status, message = _checks(report)["filesystem"]
    assert status == "warning" and report.ok
    assert "nfs4" in message and "shared dir" in message and "weaker than a local disk" in message


@pytest.mark.parametrize("fstype, status", [
    ("ext4", "ok"), ("xfs", "ok"), ("tmpfs", "ok"), ("nfs", "warning"), ("cifs", "warning"),
    ("fuse.sshfs", "warning"), ("fuse.rclone", "warning"), ("fuseblk", "warning"),
    ("9p", "warning"), ("lustre", "warning")])
def test_filesystem_types(tmp_path, monkeypatch, fstype, status):
    store = Store.create(tmp_path / "store")
    _mounts(tmp_path, monkeypatch, ["/dev/vda / ext4 rw 0 0",
                                    f"x {os.path.realpath(tmp_path)} {fstype} rw 0 0"])
    assert _checks(doctor(store))["filesystem"][0] == status


def test_no_mount_table_means_unknown(tmp_path, monkeypatch):
    store = Store.create(tmp_path / "store")
    monkeypatch.setattr(health, "MOUNTS_FILE", str(tmp_path / "missing"))
    status, message = _checks(doctor(store))["filesystem"]
    assert status == "ok" and "unknown" in message


# --- stats --------------------------------------------------------------------------------------


def test_stats_after_a_failure_and_a_success(flaky, tmp_path):
    ws = Workspace(flaky)
    res = ws.cli("stats", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["runs"] == ["a", "b"] and report["unreadable"] == 0
    stages = {s["stage"]: s for s in report["stages"]}
    assert [s["stage"] for s in report["stages"]] == ["make", "count", "report"]
    count = stages["count"]
    assert (count["runs"], count["manifests"], count["executed"]) == (2, 2, 2)
    assert (count["succeeded"], count["failed"], count["degraded"]) == (1, 1, 0)
    assert count["success_rate"] == 50.0
    assert count["retries"] == 2  # run a: 3 attempts
    last = count["last_failure"]
    assert (last["run_id"], last["item"], last["class"], last["category"]) == (
        "a", None, "DependencyResolutionFailure", "retryable")
    assert last["signal"] and "\n" not in last["signal"] and last["at"].endswith("Z")
    make = stages["make"]  # executed in a, reused from the cache in b
    assert (make["manifests"], make["executed"], make["succeeded"], make["success_rate"]) == (
        2, 1, 2, 100.0)
    assert make["retries"] == 0 and make["last_failure"] is None and make["p50_s"] is not None
    assert stages["report"]["runs"] == 1  # never reached in run a

    text = ws.cli("stats").stdout.splitlines()
    assert text[0].split()[:3] == ["STAGE", "RUNS", "MANIFESTS"]
    assert text[2].split()[:8] == ["count", "2", "2", "2", "1", "1", "0", "50.0%"]
    end = text[0].index("SUCCESS") + len("SUCCESS") - 1  # numbers are right-aligned
    assert all(line[end] == "%" for line in text[1:4]), text
    assert any(line.startswith("last failure of count: run a") for line in text)


def test_stats_of_one_stage_and_the_last_run(flaky):
    store = Store.open(flaky / ".stagestore")
    report = stage_stats(store, stage="count", last=1)
    assert report.runs == ["b"] and [s.stage for s in report.stages] == ["count"]
    assert report.stages[0].success_rate == 100.0 and report.stages[0].last_failure is None


def test_stats_of_an_unknown_stage_exits_2_with_one_error_line(flaky):
    res = Workspace(flaky).cli("stats", "--stage", "nosuch")
    assert res.returncode == 2
    _clean_cli(res)
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: ")
    assert "'nosuch'" in lines[0] and "count, make, report" in lines[0]


def test_stats_skips_and_counts_unreadable_manifests(ran):
    (ran.store / "runs" / "a" / "count.json").write_text("{broken")
    report = stage_stats(ran.open_store())
    assert report.unreadable == 1
    assert [s.stage for s in report.stages] == ["make", "report"]


def test_stats_of_an_empty_store(ws):
    ws.open_store()
    res = ws.cli("stats", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"last": 20, "runs": [], "stages": [], "unreadable": 0}
    assert ws.cli("stats").stdout == "no runs\n"


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(10, 0, -1)]  # 10 .. 1, unsorted on purpose
    assert percentile(values, 50) == 5.0
    assert percentile(values, 95) == 10.0
    assert percentile(values, 90) == 9.0
    assert percentile([3.0], 50) == percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0], 50) == 1.0
    assert percentile([], 50) is None


def _manifest(run_id: str, seconds: float, *, attempts: int = 1, status: str = "succeeded",
              cached: bool = False) -> StageManifest:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    digest = "blake3:" + "0" * 64
    failure = Failure(class_="BuildFailure", signal="Traceback\n  ...\nValueError: bad\n") \
        if status != "succeeded" else None
    return StageManifest(
        stage="s", run_id=run_id, pipeline=PipelineRef(name="p", version="1"),
        status=status, input_hash=digest, config_hash=digest,  # type: ignore[arg-type]
        output_hash=None if status == "failed" else digest, inputs={},
        outputs={} if status == "failed" else {"o": ArtifactRef(hash=digest, size=1, kind="file")},
        started_at=start, finished_at=start + timedelta(seconds=seconds),
        cached_from="r0" if cached else None, attempts=0 if cached else attempts, failure=failure)


def test_durations_of_executed_manifests_only():
    manifests = [_manifest(f"r{i}", float(i)) for i in range(1, 21)]  # 1 s .. 20 s
    manifests.append(_manifest("c", 500.0, cached=True))  # reused: not a duration
    manifests.append(_manifest("f", 0.5, attempts=3, status="failed"))
    row = _one("s", manifests)
    assert (row.manifests, row.executed, row.succeeded, row.failed) == (22, 21, 21, 1)
    assert row.p50_s == 10.0 and row.p95_s == 19.0  # 0.5, 1..20: ranks 11 and 20
    assert row.retries == 2 and row.success_rate == 95.5
    assert row.last_failure is not None and row.last_failure.signal == "ValueError: bad"
    assert _one("s", [_manifest("c", 1.0, cached=True)]).p50_s is None


def test_doctor_does_not_wait_for_gc(ran, monkeypatch):
    from stagestore.store.locking import store_lock

    store = ran.open_store()
    monkeypatch.setattr(health, "LOCK_TIMEOUT", 0)
    with store_lock(store.layout, exclusive=True, timeout=0):  # as gc holds it
        report = doctor(store)
    checks = _checks(report)
    assert report.ok and list(checks) == CHECKS
    for name in ("locks", "temps", "runs"):
        assert checks[name][0] == "warning" and checks[name][1].startswith("not checked: ")


def test_run_warns_once_when_the_store_is_on_a_network_filesystem(tmp_path, monkeypatch, capsys):
    from stagestore.cli.commands import _warn_network_filesystem

    store = Store.create(tmp_path / "store")
    _mounts(tmp_path, monkeypatch, ["/dev/vda / ext4 rw 0 0",
                                    f"server:/export {os.path.realpath(tmp_path)} nfs4 rw 0 0"])
    _warn_network_filesystem(store)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "nfs4" in err and "reliability.md" in err
    _mounts(tmp_path, monkeypatch, ["/dev/vda / ext4 rw 0 0"])
    _warn_network_filesystem(store)
    assert capsys.readouterr().err == ""
