"""verify finds, recover acts: damaged stores, orphans, killed runs and injected crashes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import msgspec

from stagestore.store.layout import StoreLayout
from stagestore.store.locking import OwnerLock
from stagestore.model.records import MANIFEST_SCHEMA_VERSION
from stagestore.inspection.recover import recover
from stagestore.execution.runner import run
from stagestore.store.store import Store
from stagestore.inspection.verify import verify

STAGES = ("make", "count", "report")


def _outputs(store: Store, run_id: str) -> dict[str, str | None]:
    return {s: store.manifests.read(run_id, s).output_hash for s in STAGES}


def _assert_clean(store: Store) -> None:
    report = verify(store)
    assert report.ok, report.problems
    assert not report.warnings, report.warnings
    assert os.listdir(store.layout.tmp) == []


def test_verify_finds_a_deleted_manifest_and_recover_restores_it(ws):
    ws.linear()
    store = ws.open_store()
    run(ws.load(), store, run_id="a")
    before = _outputs(store, "a")
    (ws.store / "runs" / "a" / "report.json").unlink()
    report = verify(store)
    assert not report.ok
    assert [(f.kind, f.run_id, f.stage) for f in report.problems] == [("manifest_missing", "a", "report")]
    result = ws.cli("verify")
    assert result.returncode == 1 and "manifest_missing" in result.stdout
    assert recover(store).ok
    assert _outputs(store, "a") == before
    _assert_clean(store)


def test_verify_names_exactly_the_corrupted_object(ws):
    ws.linear()
    store = ws.open_store()
    run(ws.load(), store, run_id="a")
    digest = store.manifests.read("a", "count").outputs["n"].hash
    path = store.objects.path(digest)
    os.chmod(path, 0o644)
    path.write_bytes(b"999")
    os.chmod(path, 0o444)
    report = verify(store)
    assert not report.ok
    assert {(f.kind, f.object) for f in report.problems} == {("object_corrupt", digest)}
    assert "run a stage count" in report.problems[0].message
    only_a = verify(store, ["a"])
    assert [f.object for f in only_a.problems] == [digest]
    result = ws.cli("verify", "--json")
    assert result.returncode == 1
    assert msgspec.json.decode(result.stdout)["problems"][0]["object"] == digest


def test_verify_finds_a_missing_object_and_an_upstream_mismatch(ws):
    ws.linear()
    store = ws.open_store()
    run(ws.load(), store, run_id="a")
    digest = store.manifests.read("a", "report").outputs["text"].hash
    store.objects.path(digest).unlink()
    kinds = {(f.kind, f.stage) for f in verify(store).problems}
    assert ("object_missing", "report") in kinds
    assert recover(store).ok
    _assert_clean(store)


def test_orphaned_temps_are_warnings_and_recover_removes_only_dead_owners(ws):
    ws.linear()
    store = ws.open_store()
    run(ws.load(), store, run_id="a")
    dead = store.layout.tmp / "run-gone~0123~make.1"
    dead.mkdir()
    (dead / "partial").write_bytes(b"half")
    live_lock = OwnerLock(store.layout, "run-alive")
    assert live_lock.try_acquire()
    live = store.layout.tmp / "run-alive~4567~object"
    live.write_bytes(b"in flight")
    try:
        report = verify(store)
        assert report.ok
        assert [(f.kind, f.path) for f in report.warnings] == [("orphan_temp", str(dead))]
        dry = recover(store, dry_run=True)
        assert [a.action for a in dry.actions] == ["remove_temp"] and dead.exists()
        done = recover(store)
        assert [a.path for a in done.actions] == [str(dead)]
        assert not dead.exists() and live.exists()
    finally:
        live_lock.release()
    assert [a.path for a in recover(store).actions] == [str(live)]  # its owner is gone now


def test_recover_is_idempotent(ws):
    ws.linear()
    store = ws.open_store()
    run(ws.load(), store, run_id="a")
    (ws.store / "runs" / "a" / "count.json").unlink()
    (ws.store / "runs" / "a" / "report.json").unlink()
    first = recover(store)
    assert first.ok and first.actions
    second = recover(store)
    assert second.ok and second.actions == [] and second.runs == []
    assert ws.cli("recover").stdout.strip() == "nothing to recover"


def test_recover_reruns_a_failed_stage_and_reports_one_that_fails_again(ws):
    ws.linear()
    ws.write("steps/count.py", "import sys\nsys.exit('still broken')\n")
    store = ws.open_store()
    run(ws.load(), store, run_id="a")
    report = recover(store)
    assert not report.ok and "count" in report.unresolved[0] and "still broken" in report.unresolved[0]
    result = ws.cli("recover")
    assert result.returncode == 1 and "error: run a stage count" in result.stderr


def test_a_newer_manifest_schema_is_refused_with_both_versions(ws):
    ws.linear()
    store = ws.open_store()
    run(ws.load(), store, run_id="a")
    path = ws.store / "runs" / "a" / "count.json"
    raw = msgspec.json.decode(path.read_bytes())
    newer = MANIFEST_SCHEMA_VERSION + 1
    raw["schema_version"] = newer
    path.write_bytes(msgspec.json.encode(raw))
    result = ws.cli("show", "a", "count")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"schema_version {newer}" in result.stderr
    assert f"up to {MANIFEST_SCHEMA_VERSION}" in result.stderr
    kinds = [f.kind for f in verify(store).problems]
    assert "manifest_invalid" in kinds


# --- killed runs --------------------------------------------------------------------------


SLOW_COUNT = """
import os, sys, time
open({started!r}, "w").write(str(os.getpid()))
if float(os.environ.get("SLOW", "0")) > 0:
    time.sleep(float(os.environ["SLOW"]))
    open({late!r}, "w").write("I outlived the runner")
with open(sys.argv[2], "w") as f:
    f.write(str(len(os.listdir(sys.argv[1]))))
"""


def _wait_for(path, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.02)


def test_a_run_sigkilled_mid_stage_is_recovered_with_its_recorded_definition(ws, tmp_path):
    ws.linear()
    started, late = ws.root / "started", tmp_path / "late"
    ws.write("steps/count.py", SLOW_COUNT.format(started=str(started), late=str(late)))
    reference_ws = tmp_path / "reference"
    shutil.copytree(ws.root, reference_ws)
    ref_store = Store.create(tmp_path / "ref-store")
    from stagestore.pipeline.model import load_pipeline

    run(load_pipeline(reference_ws / "stagestore.toml"), ref_store, run_id="a")
    started.unlink()

    env = {k: v for k, v in os.environ.items() if k != "STAGESTORE_STORE"}
    env["SLOW"] = "3"
    proc = subprocess.Popen([sys.executable, "-m", "stagestore", "run", "--run-id", "a"], cwd=ws.root,
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for(started)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The workspace changes after the crash; recover must still use the run's own snapshot.
    ws.pipeline_file.write_text(ws.pipeline_file.read_text().replace('suffix = "!"', 'suffix = "?"'))
    ws.write("data/f0.txt", "edited after the crash\n")

    store = Store.open(ws.store)
    report = verify(store)
    assert report.ok, report.problems  # nothing visible is partial
    assert {f.kind for f in report.warnings} == {"orphan_temp", "run_incomplete"}
    assert not (ws.store / "runs" / "a" / "count.json").exists()

    assert recover(store).ok
    _assert_clean(store)
    assert _outputs(store, "a") == _outputs(ref_store, "a")
    time.sleep(3.5)
    assert not late.exists(), "the stage process outlived its SIGKILLed runner"


def test_killed_runner_cli_exit_and_recover_cli(ws, tmp_path):
    ws.linear()
    started, late = ws.root / "started", tmp_path / "late"
    ws.write("steps/count.py", SLOW_COUNT.format(started=str(started), late=str(late)))
    proc = subprocess.Popen([sys.executable, "-m", "stagestore", "run", "--run-id", "k"], cwd=ws.root,
                            env={**os.environ, "SLOW": "2"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(started)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    result = ws.cli("recover", env={"SLOW": "0"})
    assert result.returncode == 0, result.stderr
    assert "completed run k: count, report" in result.stdout
    assert ws.cli("verify").returncode == 0
    assert ws.cli("recover").stdout.strip() == "nothing to recover"


# Crash points and I/O errors at every durable operation: test_crashpoints.py, test_ioerrors.py.


def test_orphan_detection_uses_the_owner_lock(tmp_path):
    layout = StoreLayout(tmp_path)
    layout.locks.mkdir()
    from stagestore.store.locking import owner_is_live

    assert not owner_is_live(layout, "run-x")
    lock = OwnerLock(layout, "run-x")
    assert lock.try_acquire()
    assert owner_is_live(layout, "run-x")
    lock.release()
    assert not owner_is_live(layout, "run-x")


def test_recover_repairs_a_corrupted_output_by_running_its_stage_again(ws):
    ws.linear()
    store = ws.open_store()
    run(ws.load(), store, run_id="a")
    run(ws.load(), store, run_id="b")  # reuses a's outputs: both runs name the same objects
    before = _outputs(store, "a")
    listing = __import__("stagestore.store.trees", fromlist=["read_tree"]).read_tree(
        store.objects, store.manifests.read("a", "make").outputs["out"].hash)
    victim = store.objects.path(listing.entries[0].hash)
    os.chmod(victim, 0o644)
    victim.write_bytes(b"bit rot")
    assert not verify(store).ok
    dry = recover(store, dry_run=True)
    assert "remove_object" in [a.action for a in dry.actions] and victim.exists()
    report = recover(store)
    assert report.ok, report.unresolved
    _assert_clean(store)
    assert _outputs(store, "a") == before and _outputs(store, "b") == before
    assert recover(store).actions == []


def test_recover_restores_a_lost_input_snapshot_from_an_unchanged_workspace(ws):
    ws.linear()
    store = ws.open_store()
    run(ws.load(), store, run_id="a")
    script = store.manifests.read_run("a").inputs["count"]["script"].hash
    store.objects.path(script).unlink()
    report = recover(store)
    assert report.ok and "restore_snapshot" in [a.action for a in report.actions]
    _assert_clean(store)
    store.objects.path(script).unlink()
    ws.write("steps/count.py", "# edited since\n")
    report = recover(store)
    assert not report.ok and "no longer holds that content" in report.unresolved[0]


def test_ctrl_c_stops_the_run_records_no_false_failure_and_recover_completes(ws, tmp_path):
    ws.linear()
    started, late = ws.root / "started", tmp_path / "late"
    ws.write("steps/count.py", SLOW_COUNT.format(started=str(started), late=str(late)))
    ws.pipeline_file.write_text(ws.pipeline_file.read_text().replace(
        'outputs = ["n"]', 'outputs = ["n"]\nretries = 3\nretry_delay = 0.01'))
    proc = subprocess.Popen([sys.executable, "-m", "stagestore", "run", "--run-id", "i"],
                            cwd=ws.root, env={**os.environ, "SLOW": "5"}, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for(started)
    began = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert time.monotonic() - began < 3  # no retry was started after the interrupt
    assert not (ws.store / "runs" / "i" / "count.json").exists()  # not recorded as a failure
    store = Store.open(ws.store)
    assert recover(store).ok
    _assert_clean(store)




def test_a_stage_failing_after_its_downstream_succeeded_leaves_a_consistent_run(ws, tmp_path):
    ws.write("up.sh", "echo up > \"$1\"\n")
    ws.pipeline("""
        [pipeline]
        name = "chain"
        [stages.up]
        cmd = "sh {inputs.s} {outputs.o} && test ! -e FAIL"
        shell = true
        inputs = { s = "up.sh" }
        outputs = ["o"]
        [stages.down]
        upstream = ["up"]
        cmd = "cp {upstream.up.o} {outputs.o}"
        shell = true
        outputs = ["o"]
    """)
    store = ws.open_store()
    assert run(ws.load(), store, run_id="r").ok
    (ws.root / "FAIL").write_text("")
    report = run(ws.load(), store, run_id="r", force=True)
    assert [s.outcome for s in report.stages] == ["failed", "skipped"]
    assert not store.layout.manifest_path("r", "down").exists()
    assert verify(store).ok


def test_recover_completes_a_call_stage_whose_module_was_deleted_since(ws):
    ws.write("mod.py", "import os\ndef f(ctx):\n    if os.environ.get('CRASH'):\n        os._exit(1)\n"
                       "    ctx.outputs['o'].write_text('from the snapshot')\n")
    ws.pipeline('[pipeline]\nname = "c"\n[stages.s]\ncall = "mod:f"\noutputs = ["o"]\n')
    store = ws.open_store()
    os.environ["CRASH"] = "1"
    try:
        assert not run(ws.load(), store, run_id="a").ok
    finally:
        del os.environ["CRASH"]
    (ws.root / "mod.py").unlink()
    assert recover(store).ok
    manifest = store.manifests.read("a", "s")
    assert store.objects.read_bytes(manifest.outputs["o"].hash) == b"from the snapshot"


def test_recover_removes_a_folder_squatting_on_an_object_name(ws):
    ws.linear()
    store = ws.open_store()
    run(ws.load(), store, run_id="a")
    digest = store.manifests.read("a", "report").outputs["text"].hash
    path = store.objects.path(digest)
    path.unlink()
    path.mkdir()
    assert "object_corrupt" in {f.kind for f in verify(store).problems}
    assert recover(store).ok
    _assert_clean(store)


def test_recover_forgets_the_stat_cache_when_it_removes_a_damaged_input_object(ws, monkeypatch):
    # A folder input's files are remembered by stat (stat-cache/).  When recover removes one of
    # their objects as damaged, the stat cache still maps the unchanged workspace file to that
    # digest: recover's own snapshot restore, and every later run, took the digest without
    # storing the file again, and the run failed with a missing object (found in issue 15).
    import stagestore.store.statcache as statcache

    monkeypatch.setattr(statcache, "RACY_NS", 0)  # remember files however recent they are
    ws.write("data/a.txt", "alpha\n")
    ws.write("data/b.txt", "beta\n")
    ws.pipeline('[pipeline]\nname = "sc"\n\n[stages.cat]\ncmd = "cat {inputs.d}/* > {outputs.o}"\n'
                'shell = true\ninputs = { d = "data" }\noutputs = ["o"]\n')
    store = ws.open_store()
    run(ws.load(), store, run_id="a")
    run(ws.load(), store, run_id="b")  # the stat cache now holds data/
    path = store.objects.path(_digest(b"beta\n"))
    os.chmod(path, 0o644)
    path.write_bytes(b"damaged\n")
    assert recover(store).ok
    _assert_clean(store)
    report = run(ws.load(), Store.open(ws.store), run_id="c", force=True)
    assert report.ok
    _assert_clean(Store.open(ws.store))


def _digest(data: bytes) -> str:
    from stagestore.store.hashing import digest_bytes

    return digest_bytes(data)
