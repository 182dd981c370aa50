"""Running stages: reuse, failures, retries, timeouts, call stages, snapshots."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time

import pytest

from stagestore.execution.runner import run
from stagestore.inspection.verify import verify


def _run(ws, **kwargs):
    return run(ws.load(), ws.open_store(), **kwargs)


def _outcomes(report):
    return {s.stage: s.outcome for s in report.stages}


def test_rerun_with_identical_inputs_and_config_executes_nothing(ws):
    ws.linear()
    first = _run(ws, run_id="a")
    assert _outcomes(first) == {"make": "succeeded", "count": "succeeded", "report": "succeeded"}
    second = _run(ws, run_id="b")
    assert _outcomes(second) == {"make": "cached", "count": "cached", "report": "cached"}
    store = ws.open_store()
    for stage in ("make", "count", "report"):
        manifest = store.manifests.read("b", stage)
        assert manifest.cached_from == "a" and manifest.attempts == 0 and manifest.logs == []
        assert manifest.output_hash == store.manifests.read("a", stage).output_hash


def test_changed_params_reexecute_only_affected_stages(ws):
    ws.linear()
    _run(ws, run_id="a")
    ws.pipeline_file.write_text(ws.pipeline_file.read_text().replace('suffix = "!"', 'suffix = "?"'))
    report = _run(ws, run_id="b")
    # make's output changes, so count re-executes; count's output (a file count) does not, so
    # report is reused.
    assert _outcomes(report) == {"make": "succeeded", "count": "succeeded", "report": "cached"}


def test_a_changed_input_file_reexecutes_its_stage(ws):
    ws.linear()
    _run(ws, run_id="a")
    ws.write("data/f9.txt", "new\n")
    report = _run(ws, run_id="b")
    assert _outcomes(report) == {"make": "succeeded", "count": "succeeded", "report": "succeeded"}
    assert ws.open_store().objects.read_bytes(
        ws.open_store().manifests.read("b", "report").outputs["text"].hash) == b"files=4\n"


def test_keys_do_not_depend_on_where_the_workspace_or_store_lives(ws, tmp_path):
    ws.linear()
    _run(ws, run_id="a")
    other = tmp_path / "elsewhere" / "copy"
    shutil.copytree(ws.root, other, ignore=shutil.ignore_patterns(".stagestore"))
    from stagestore.pipeline.model import load_pipeline
    from stagestore.store.store import Store

    run(load_pipeline(other / "stagestore.toml"), Store.create(tmp_path / "other-store"), run_id="a")
    for stage in ("make", "count", "report"):
        m1 = ws.open_store().manifests.read("a", stage)
        m2 = Store.open(tmp_path / "other-store").manifests.read("a", stage)
        assert (m1.input_hash, m1.config_hash, m1.output_hash) == (m2.input_hash, m2.config_hash, m2.output_hash)


def test_a_failing_stage_records_its_failure_and_skips_downstream(ws):
    ws.linear()
    ws.write("steps/count.py", "import sys\nprint('first line', file=sys.stderr)\n"
                               "print('count: broken input', file=sys.stderr)\nsys.exit(3)\n")
    report = _run(ws, run_id="a")
    assert _outcomes(report) == {"make": "succeeded", "count": "failed", "report": "skipped"}
    assert not report.ok
    manifest = ws.open_store().manifests.read("a", "count")
    assert manifest.status == "failed" and manifest.output_hash is None
    assert manifest.failure.class_ == "BuildFailure" and manifest.failure.exit_code == 3
    assert manifest.failure.signal.splitlines()[-1] == "count: broken input"
    assert not (ws.store / "runs" / "a" / "report.json").exists()
    assert verify(ws.open_store()).ok


def test_a_silent_failure_gets_the_runners_reason(ws):
    ws.linear()
    ws.write("steps/count.py", "import sys\nsys.exit(5)\n")
    _run(ws, run_id="a")
    failure = ws.open_store().manifests.read("a", "count").failure
    assert failure.signal == "exited with code 5 and printed nothing to stderr"


def test_a_declared_output_not_created_fails_the_stage(ws):
    ws.linear()
    ws.write("steps/count.py", "pass\n")
    report = _run(ws, run_id="a")
    assert report.stages[1].failure.class_ == "OutputMissingFailure"
    assert "'n'" in report.stages[1].failure.signal


def test_an_empty_input_folder_fails_entry_criteria_unless_allowed(ws):
    ws.linear(files=0)
    (ws.root / "data").mkdir(exist_ok=True)
    report = _run(ws, run_id="a")
    failure = report.stages[0].failure
    assert failure.class_ == "InputEmptyFailure" and "data" in failure.signal
    text = ws.pipeline_file.read_text().replace('outputs = ["out"]', 'outputs = ["out"]\nallow_empty = ["src"]')
    ws.pipeline_file.write_text(text)
    assert _run(ws, run_id="b").ok


def test_a_symlink_output_is_refused(ws):
    ws.linear()
    ws.write("steps/count.py", "import os, sys\nos.symlink('/etc/hostname', sys.argv[2])\n")
    report = _run(ws, run_id="a")
    assert report.stages[1].failure.class_ == "OutputInvalidFailure"
    assert "symlink" in report.stages[1].failure.signal


def test_a_hard_linked_output_is_copied_and_the_outside_file_untouched(ws):
    ws.linear()
    outside = ws.write("outside.txt", "precious\n")
    os.chmod(outside, 0o600)
    ws.write("steps/count.py", f"import os, sys\nos.link({str(outside)!r}, sys.argv[2])\n")
    assert _run(ws, run_id="a").ok
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600 and outside.read_text() == "precious\n"
    assert outside.stat().st_nlink == 1


def test_timeout_kills_the_whole_process_group(ws):
    ws.linear()
    marker = ws.root / "grandchild-alive"
    ws.write("steps/count.py", f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c",
            "import time; time.sleep(1.5); open({str(marker)!r}, 'w').write('x')"])
        time.sleep(30)
    """)
    ws.pipeline_file.write_text(ws.pipeline_file.read_text().replace(
        'outputs = ["n"]', 'outputs = ["n"]\ntimeout = 0.5'))
    started = time.monotonic()
    report = _run(ws, run_id="a")
    assert time.monotonic() - started < 10
    assert report.stages[1].failure.class_ == "TimeoutFailure"
    time.sleep(2)
    assert not marker.exists(), "a process of the timed-out stage outlived it"


def test_retries_with_attempts_recorded(ws):
    ws.linear()
    counter = ws.root / "tries"
    ws.write("steps/count.py", f"""
        import os, sys
        n = int(open({str(counter)!r}).read()) if os.path.exists({str(counter)!r}) else 0
        open({str(counter)!r}, "w").write(str(n + 1))
        if n == 0:
            sys.exit("transient")
        open(sys.argv[2], "w").write("ok")
    """)
    ws.pipeline_file.write_text(ws.pipeline_file.read_text().replace(
        'outputs = ["n"]', 'outputs = ["n"]\nretries = 2\nretry_delay = 0.05\n'
        '[[stages.count.classify]]\nmatch = "transient"\nclass = "InfrastructureGateFailure"\n'
        'category = "retryable"\n'))
    report = _run(ws, run_id="a")
    assert report.ok
    manifest = ws.open_store().manifests.read("a", "count")
    assert manifest.attempts == 2 and len(manifest.logs) == 2
    first = manifest.logs[0].failure
    assert (first.class_, first.category, first.rule) == ("InfrastructureGateFailure", "retryable", 0)
    assert manifest.logs[1].failure is None
    assert [e.kind for e in manifest.events] == ["retry"]
    assert "InfrastructureGateFailure" in manifest.events[0].message


def test_persistent_failure_spends_all_retries(ws):
    ws.linear()
    ws.write("steps/count.py", "import sys\nsys.exit(75)\n")
    ws.pipeline_file.write_text(ws.pipeline_file.read_text().replace(
        'outputs = ["n"]', 'outputs = ["n"]\nretries = 2\nretry_delay = 0.01\n'
        '[[stages.count.classify]]\nexit_code = 75\nclass = "DependencyResolutionFailure"\n'
        'category = "retryable"\n'))
    _run(ws, run_id="a")
    manifest = ws.open_store().manifests.read("a", "count")
    assert manifest.attempts == 3 and [e.kind for e in manifest.events] == ["retry", "retry"]
    assert manifest.failure.class_ == "DependencyResolutionFailure"
    assert manifest.failure.domain == "infrastructure" and not manifest.failure.taxonomy_eligible


def test_a_fatal_failure_is_not_retried(ws):
    ws.linear()
    ws.write("steps/count.py", "import sys\nsys.exit('compile error')\n")
    ws.pipeline_file.write_text(ws.pipeline_file.read_text().replace(
        'outputs = ["n"]', 'outputs = ["n"]\nretries = 3\nretry_delay = 0.01'))
    _run(ws, run_id="a")
    manifest = ws.open_store().manifests.read("a", "count")
    assert manifest.attempts == 1 and manifest.events == []
    failure = manifest.failure
    assert (failure.class_, failure.category, failure.domain, failure.taxonomy_eligible) == (
        "BuildFailure", "fatal", "build", True)


CALL_PIPELINE = """
[pipeline]
name = "calls"

[stages.produce]
call = "mod:produce"
inputs = { mod = "mod.py" }
outputs = ["value"]
params = { n = 7 }

[stages.consume]
upstream = ["produce"]
call = "mod:{fn}"
outputs = ["double"]
"""


@pytest.mark.parametrize("fn, ok", [("consume", True), ("explode", False), ("hard_exit", False)])
def test_call_stages_run_in_a_child_process(ws, fn, ok):
    ws.write("mod.py", """
        import os
        def produce(ctx):
            ctx.outputs["value"].write_text(str(ctx.params["n"]))
        def consume(ctx):
            n = int(ctx.upstream["produce"]["value"].read_text())
            ctx.outputs["double"].write_text(str(2 * n))
        def explode(ctx):
            raise ValueError("bad data in " + ctx.stage)
        def hard_exit(ctx):
            os._exit(9)
    """)
    ws.pipeline(CALL_PIPELINE.replace("{fn}", fn))
    report = _run(ws, run_id="a")
    assert report.ok is ok
    if ok:
        store = ws.open_store()
        assert store.objects.read_bytes(store.manifests.read("a", "consume").outputs["double"].hash) == b"14"
    elif fn == "explode":
        assert "ValueError: bad data in consume" in report.stages[1].failure.signal
    else:
        assert report.stages[1].failure.exit_code == 9


def test_force_reexecutes_and_flags_nondeterminism(ws):
    ws.write("gen.py", "import os, sys\nopen(sys.argv[1], 'wb').write(os.urandom(8))\n")
    ws.pipeline("""
        [pipeline]
        name = "rng"
        [stages.gen]
        cmd = ["python", "{inputs.gen}", "{outputs.r}"]
        inputs = { gen = "gen.py" }
        outputs = ["r"]
    """)
    _run(ws, run_id="a")
    assert _outcomes(_run(ws, run_id="b")) == {"gen": "cached"}
    forced = _run(ws, run_id="c", force=True)
    assert forced.stages[0].outcome == "succeeded" and forced.stages[0].nondeterministic


def test_stage_environment_and_shell_mode(ws):
    ws.write("in.txt", "x")
    ws.pipeline("""
        [pipeline]
        name = "env"
        [stages.show]
        cmd = "echo $STAGESTORE_RUN_ID $STAGESTORE_STAGE $GREETING {params.k} > {outputs.o}; test -d $STAGESTORE_OUT"
        shell = true
        inputs = { i = "in.txt" }
        outputs = ["o"]
        params = { k = "v w" }
        env = { GREETING = "hi" }
    """)
    assert _run(ws, run_id="r1").ok
    store = ws.open_store()
    text = store.objects.read_bytes(store.manifests.read("r1", "show").outputs["o"].hash).decode()
    assert text == "r1 show hi v w\n"


def test_inputs_are_read_only_snapshots(ws):
    ws.linear()
    ws.write("steps/count.py", """
        import os, sys
        path = os.path.join(sys.argv[1], "f0.txt")
        try:
            open(path, "a").write("tamper")
        except PermissionError:
            pass
        open(sys.argv[2], "w").write("1")
    """)
    report = _run(ws, run_id="a")
    if os.geteuid() == 0:
        # root ignores 0444: the write lands in the object, and the runner must notice.
        assert report.stages[1].failure.class_ == "InputModifiedFailure"
        assert not verify(ws.open_store()).ok
    else:
        assert report.ok and verify(ws.open_store()).ok


def test_run_record_keeps_the_definition_and_input_snapshots(ws):
    ws.linear()
    _run(ws, run_id="a")
    record = ws.open_store().manifests.read_run("a")
    assert record.selected == ["make", "count", "report"]
    assert set(record.inputs) == {"make", "count", "report"}
    assert record.inputs["make"]["src"].kind == "tree"
    assert record.finished_at is not None and record.outcomes["report"] == "succeeded"
    assert json.loads((ws.store / "runs" / "a" / "_run.json").read_text())["definition"]["stages"]["make"]["params"] == {"suffix": "!"}


def test_stage_selection_runs_what_is_needed_upstream(ws):
    ws.linear()
    report = _run(ws, run_id="a", stages=["count"])
    assert [s.stage for s in report.stages] == ["make", "count"]
    report = _run(ws, run_id="a", stages=["report"])
    assert _outcomes(report) == {"make": "succeeded", "count": "succeeded", "report": "succeeded"}
    assert report.stages[0].attempts == 1  # reused from the run's own manifest, not re-executed


def test_a_changed_definition_under_an_existing_run_id_is_refused(ws):
    from stagestore.errors import UsageError

    ws.linear()
    _run(ws, run_id="a")
    ws.pipeline_file.write_text(ws.pipeline_file.read_text().replace('suffix = "!"', 'suffix = "?"'))
    with pytest.raises(UsageError, match="different pipeline definition"):
        _run(ws, run_id="a")


def test_jobs_run_independent_stages_side_by_side(ws):
    ws.write("w.py", "import sys, time\ntime.sleep(1)\nopen(sys.argv[1], 'w').write(sys.argv[2])\n")
    stages = "\n".join(f"""
[stages.s{i}]
cmd = ["python", "{{inputs.w}}", "{{outputs.o}}", "{i}"]
inputs = {{ w = "w.py" }}
outputs = ["o"]
""" for i in range(4))
    ws.pipeline('[pipeline]\nname = "fan"\n' + stages)
    report = _run(ws, run_id="a", jobs=4)
    assert report.ok
    store = ws.open_store()
    manifests = [store.manifests.read("a", f"s{i}") for i in range(4)]
    # All four were running at one moment: the last to start started before the first ended.
    assert max(m.started_at for m in manifests) < min(m.finished_at for m in manifests)
    serial = _run(ws, run_id="b", jobs=1, force=True)
    assert serial.ok
    manifests = sorted((store.manifests.read("b", f"s{i}") for i in range(4)), key=lambda m: m.started_at)
    assert all(a.finished_at <= b.started_at for a, b in zip(manifests, manifests[1:]))


def test_editing_a_called_module_reexecutes_its_stage_with_the_new_code(ws):
    ws.write("mod.py", "def f(ctx):\n    ctx.outputs['o'].write_text('v1')\n")
    ws.pipeline('[pipeline]\nname = "c"\n[stages.s]\ncall = "mod:f"\noutputs = ["o"]\n')
    assert _run(ws, run_id="a").ok
    assert _outcomes(_run(ws, run_id="b")) == {"s": "cached"}
    ws.write("mod.py", "def f(ctx):\n    ctx.outputs['o'].write_text('v2')\n")
    report = _run(ws, run_id="c")
    assert _outcomes(report) == {"s": "succeeded"}
    store = ws.open_store()
    assert store.objects.read_bytes(store.manifests.read("c", "s").outputs["o"].hash) == b"v2"
    assert "inputs._code" in store.manifests.read("c", "s").inputs


def test_a_stage_removing_files_from_its_input_view_is_detected_and_harms_no_object(ws):
    # The view is shared with later attempts (store/views.py), so removing from it is a change
    # to an input: the attempt fails, the view is discarded, and no object is touched.
    ws.linear()
    ws.write("steps/count.py", """
        import os, shutil, sys
        for name in os.listdir(sys.argv[1]):
            os.unlink(os.path.join(sys.argv[1], name))
        open(sys.argv[2], "w").write("0")
    """)
    report = _run(ws, run_id="a")
    assert report.stages[1].failure.class_ == "InputModifiedFailure"
    assert "objects are intact" in report.stages[1].failure.signal
    assert verify(ws.open_store()).ok
