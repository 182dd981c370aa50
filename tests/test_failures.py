"""The failure model: taxonomy denominators, systemic aborts, retries, timeouts, fallbacks, the
circuit breaker, the disk preflight and quality checks.

Stages are cheap `sh -c` commands; an item's behaviour is decided by its name (`case {item}`),
and executions are counted by appending to a counter file outside the store.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import msgspec
import pytest

from stagestore.execution.classify import classify
from stagestore.model import failures as F
from stagestore.model.records import (MANIFEST_SCHEMA_VERSION, ClassifyRule, ExecutionOptions,
                                      Failure, StageSpec)
from stagestore.execution.runner import run
from stagestore.inspection.report import failure_report


def _run(ws, **kwargs):
    return run(ws.load(), ws.open_store(), **kwargs)


def _items(ws, names, rel: str = "items.txt") -> list[str]:
    ws.write(rel, "".join(f"{name}\n" for name in names))
    return list(names)


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _rows(rows) -> list[dict]:
    return [msgspec.to_builtins(row) for row in rows]


def _sampling(**kwargs) -> ExecutionOptions:
    return ExecutionOptions(mode="sampling", **kwargs)


def _pipeline(ws, text: str, **paths: Path) -> None:
    """Write the pipeline, replacing each KEY in `text` by the absolute path `paths[KEY]`."""
    for key, path in paths.items():
        text = text.replace(key, str(path))
    ws.pipeline(text)


# --- 1. taxonomy denominators -------------------------------------------------------------------

TAXONOMY = """
[pipeline]
name = "taxonomy"

[stages.gate]
domain = "infrastructure"
cmd = ["sh", "-c", "case {item} in i02|i07) echo 'gate: runner pool exhausted' >&2; exit 1;; esac; echo ok > {outputs.o}"]
outputs = ["o"]

[stages.build]
upstream = ["gate"]
cmd = ["sh", "-c", "case {item} in i03|i05) echo 'error: schema check failed' >&2; exit 2;; i09) echo 'cc1: internal compiler error' >&2; exit 1;; esac; echo built > {outputs.o}"]
outputs = ["o"]

[[stages.build.classify]]
match = "schema check failed"
class = "ValidationFailure"
category = "validation"
"""

TEN = [f"i{n:02d}" for n in range(1, 11)]

EXPECTED_FIRST_FAILURES = [
    {"item": "i02", "first_failure_stage": "gate", "stage_failure": "InfrastructureGateFailure",
     "failure_category": "fatal", "failure_signal": "gate: runner pool exhausted",
     "taxonomy_eligible": False},
    {"item": "i03", "first_failure_stage": "build", "stage_failure": "ValidationFailure",
     "failure_category": "validation", "failure_signal": "error: schema check failed",
     "taxonomy_eligible": True},
    {"item": "i05", "first_failure_stage": "build", "stage_failure": "ValidationFailure",
     "failure_category": "validation", "failure_signal": "error: schema check failed",
     "taxonomy_eligible": True},
    {"item": "i07", "first_failure_stage": "gate", "stage_failure": "InfrastructureGateFailure",
     "failure_category": "fatal", "failure_signal": "gate: runner pool exhausted",
     "taxonomy_eligible": False},
    {"item": "i09", "first_failure_stage": "build", "stage_failure": "BuildFailure",
     "failure_category": "fatal", "failure_signal": "cc1: internal compiler error",
     "taxonomy_eligible": True},
]


def test_build_failure_percentages_are_over_build_failures_only(ws):
    ws.pipeline(TAXONOMY)
    result = _run(ws, run_id="t", items=TEN)
    assert result.status == "failed" and result.processed == 10
    report = failure_report(ws.open_store(), "t")
    assert (report.processed, report.succeeded, report.degraded, report.failed) == (10, 5, 0, 5)
    assert _rows(report.stage_failures) == [
        {"stage": "build", "count": 3, "percent_of_processed": 30.0},
        {"stage": "gate", "count": 2, "percent_of_processed": 20.0}]
    # Over the 3 build failures, not the 5 failures nor the 10 processed items.
    assert _rows(report.build_failures) == [
        {"taxonomy_category": "ValidationFailure", "count": 2, "percent_of_build_failures": 66.67},
        {"taxonomy_category": "BuildFailure", "count": 1, "percent_of_build_failures": 33.33}]
    assert _rows(report.infrastructure) == [
        {"stage": "gate", "count": 2, "percent_of_processed": 20.0,
         "dominant_signals": ["gate: runner pool exhausted"]}]
    assert _rows(report.first_failures) == EXPECTED_FIRST_FAILURES
    assert report.systemic is None and report.valid_for_trends is True and report.complete is True


def test_report_json_and_csv_contract(ws):
    ws.pipeline(TAXONOMY)
    _items(ws, TEN)
    assert ws.cli("run", "--items", "items.txt", "--run-id", "t").returncode == 1
    proc = ws.cli("report", "t", "--json", "--csv", "tables")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) == {"run_id", "processed", "succeeded", "degraded", "failed",
                         "stage_failures", "build_failures", "infrastructure", "first_failures",
                         "systemic", "valid_for_trends", "complete"}
    assert data["first_failures"] == EXPECTED_FIRST_FAILURES
    assert data["build_failures"][0]["percent_of_build_failures"] == 66.67
    tables = ws.root / "tables"
    assert sorted(p.name for p in tables.iterdir()) == [
        "build_failures.csv", "first_failures.csv", "infrastructure.csv", "stage_failures.csv"]
    assert (tables / "build_failures.csv").read_text().splitlines() == [
        "taxonomy_category,count,percent_of_build_failures",
        "ValidationFailure,2,66.67", "BuildFailure,1,33.33"]
    assert (tables / "infrastructure.csv").read_text().splitlines() == [
        "stage,count,percent_of_processed,dominant_signals",
        "gate,2,20.0,gate: runner pool exhausted"]
    rows = (tables / "first_failures.csv").read_text().splitlines()
    assert rows[0] == ("item,first_failure_stage,stage_failure,failure_category,failure_signal,"
                       "taxonomy_eligible")
    assert rows[1:] == [
        "i02,gate,InfrastructureGateFailure,fatal,gate: runner pool exhausted,false",
        "i03,build,ValidationFailure,validation,error: schema check failed,true",
        "i05,build,ValidationFailure,validation,error: schema check failed,true",
        "i07,gate,InfrastructureGateFailure,fatal,gate: runner pool exhausted,false",
        "i09,build,BuildFailure,fatal,cc1: internal compiler error,true"]


def test_a_build_stage_failure_classified_as_an_infrastructure_class_is_not_eligible(ws):
    ws.pipeline("""
        [pipeline]
        name = "p"

        [stages.build]
        cmd = ["sh", "-c", "case {item} in i01) echo 'runner: no space left for workspace' >&2; exit 1;; i02) echo 'cc: error' >&2; exit 1;; esac; echo ok > {outputs.o}"]
        outputs = ["o"]

        [[stages.build.classify]]
        match = "no space left for workspace"
        class = "InfrastructureGateFailure"
        category = "fatal"
    """)
    _run(ws, run_id="r", items=["i01", "i02", "i03"])
    store = ws.open_store()
    failure = store.manifests.read("r", "build", "i01").failure
    assert (failure.class_, failure.category, failure.domain, failure.taxonomy_eligible,
            failure.rule) == ("InfrastructureGateFailure", "fatal", "infrastructure", False, 0)
    other = store.manifests.read("r", "build", "i02").failure
    assert (other.class_, other.domain, other.taxonomy_eligible, other.rule) == (
        "BuildFailure", "build", True, None)
    report = failure_report(store, "r")
    assert _rows(report.build_failures) == [
        {"taxonomy_category": "BuildFailure", "count": 1, "percent_of_build_failures": 100.0}]
    assert _rows(report.infrastructure) == [
        {"stage": "build", "count": 1, "percent_of_processed": 33.33,
         "dominant_signals": ["runner: no space left for workspace"]}]
    assert [(r.item, r.taxonomy_eligible) for r in report.first_failures] == [
        ("i01", False), ("i02", True)]


# --- 4. systemic abort --------------------------------------------------------------------------

SYSTEMIC = """
[pipeline]
name = "systemic"

[stages.gate]
domain = "infrastructure"
cmd = ["sh", "-c", "echo {item} >> COUNT; if grep -qx {item} FAILS; then echo 'gate: runner pool exhausted' >&2; exit 1; fi; echo ok > {outputs.o}"]
outputs = ["o"]

[stages.build]
upstream = ["gate"]
cmd = ["sh", "-c", "echo built {item} > {outputs.o}"]
outputs = ["o"]
"""


def _systemic(ws, items: list[str], failing: list[str]) -> Path:
    count = ws.root / "count"
    fails = ws.write("fails.txt", "".join(f"{i}\n" for i in failing))
    _pipeline(ws, SYSTEMIC, COUNT=count, FAILS=fails)
    _items(ws, items)
    return count


TWENTY = [f"i{n:02d}" for n in range(1, 21)]
SAMPLING_ARGS = ("--execution-mode", "sampling", "--systemic-min-items", "20",
                 "--systemic-threshold", "0.8", "-j", "1")


def test_exactly_the_threshold_does_not_abort(ws):
    count = _systemic(ws, TWENTY, TWENTY[4:])  # 16 of 20 = 0.8, not over it
    proc = ws.cli("run", "--items", "items.txt", "--run-id", "s", *SAMPLING_ARGS)
    assert proc.returncode == 1, proc.stderr
    assert _lines(count) == TWENTY
    data = json.loads(ws.cli("report", "s", "--json").stdout)
    assert data["systemic"] is None and data["valid_for_trends"] is True
    assert (data["processed"], data["failed"], data["succeeded"]) == (20, 16, 4)


def test_crossing_the_threshold_aborts_with_the_evidence(ws):
    count = _systemic(ws, TWENTY, TWENTY[3:])  # 17 of 20 = 0.85; crossed only at the 20th item
    proc = ws.cli("run", "--items", "items.txt", "--run-id", "s", *SAMPLING_ARGS)
    assert proc.returncode == 3, proc.stderr
    assert _lines(count) == TWENTY
    data = json.loads(ws.cli("report", "s", "--json").stdout)
    assert data["systemic"] == {
        "trigger_stage": "gate", "processed_items": 20, "stage_failures": 17,
        "failure_ratio": 0.85, "threshold_ratio": 0.8,
        "item_samples": ["i04", "i05", "i06", "i07", "i08"],
        "dominant_failure_signals": ["gate: runner pool exhausted"]}
    assert data["valid_for_trends"] is False
    assert (data["processed"], data["failed"]) == (20, 17)
    record = ws.open_store().manifests.read_run("s")
    assert record.systemic is not None and record.systemic.stage_failures == 17


FORTY = [f"i{n:02d}" for n in range(1, 41)]


def test_the_abort_comes_as_soon_as_min_items_are_processed(ws):
    count = _systemic(ws, FORTY, FORTY)
    events = []
    report = _run(ws, run_id="s", items=FORTY, jobs=1, progress=events.append,
                  execution=_sampling(systemic_min_items=20, systemic_threshold=0.8))
    assert report.status == "aborted" and report.processed == 20
    assert [i.status for i in report.items] == ["failed"] * 20 + ["not_processed"] * 20
    assert (report.systemic.processed_items, report.systemic.stage_failures,
            report.systemic.failure_ratio) == (20, 20, 1.0)
    assert _lines(count) == FORTY[:20]
    store = ws.open_store()
    assert store.manifests.items("s") == FORTY[:20]
    assert [e.item for e in events if e.event == "systemic_abort"] == ["i20"]
    assert failure_report(store, "s").processed == 20


def test_production_mode_never_aborts(ws):
    count = _systemic(ws, FORTY, FORTY)
    report = _run(ws, run_id="p", items=FORTY, jobs=1,
                  execution=ExecutionOptions(mode="production", systemic_min_items=20,
                                             systemic_threshold=0.8))
    assert report.status == "failed" and report.systemic is None and report.processed == 40
    assert _lines(count) == FORTY


# --- 5. retries only for retryable failures ------------------------------------------------------

FETCH = """
[pipeline]
name = "retries"

[stages.fetch]
cmd = ["sh", "-c", "echo x >> COUNT; SCRIPT"]
outputs = ["o"]
RETRY
[[stages.fetch.classify]]
match = "connection reset"
class = "DependencyResolutionFailure"
category = "retryable"
"""


def _fetch(ws, script: str, retry: str) -> Path:
    count = ws.root / "count"
    _pipeline(ws, FETCH.replace("SCRIPT", script).replace("RETRY", retry), COUNT=count)
    return count


def test_a_retryable_failure_is_retried_until_it_succeeds(ws):
    count = _fetch(ws, "if [ $STAGESTORE_ATTEMPT = 1 ]; then echo 'fetch: connection reset by "
                       "peer' >&2; exit 1; fi; echo data > {outputs.o}",
                   "retries = 2\nretry_delay = 0.01")
    report = _run(ws, run_id="r")
    assert report.status == "succeeded"
    manifest = ws.open_store().manifests.read("r", "fetch")
    assert manifest.status == "succeeded" and manifest.attempts == 2
    assert [e.kind for e in manifest.events] == ["retry"]
    first = manifest.logs[0].failure
    assert (first.class_, first.category) == ("DependencyResolutionFailure", "retryable")
    assert manifest.logs[1].failure is None and len(_lines(count)) == 2


def test_an_unmatched_failure_is_not_retried(ws):
    count = _fetch(ws, "echo 'fetch: 404 not found' >&2; exit 1",
                   "retries = 3\nretry_delay = 0.01")
    report = _run(ws, run_id="r")
    assert report.status == "failed"
    manifest = ws.open_store().manifests.read("r", "fetch")
    assert manifest.attempts == 1 and manifest.events == [] and len(_lines(count)) == 1
    assert (manifest.failure.class_, manifest.failure.category) == ("BuildFailure", "fatal")


def test_a_timeout_is_retryable(ws):
    count = _fetch(ws, "sleep 5; echo late > {outputs.o}",
                   "retries = 1\nretry_delay = 0.01\ntimeout = 0.5")
    started = time.monotonic()
    report = _run(ws, run_id="r")
    assert time.monotonic() - started < 4
    assert report.status == "failed"
    manifest = ws.open_store().manifests.read("r", "fetch")
    assert manifest.attempts == 2 and [e.kind for e in manifest.events] == ["retry"]
    assert (manifest.failure.class_, manifest.failure.category) == ("TimeoutFailure", "retryable")
    assert [log.failure.class_ for log in manifest.logs] == ["TimeoutFailure"] * 2
    assert len(_lines(count)) == 2


# --- 6. a timeout kills the whole process group ---------------------------------------------------


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def test_a_timeout_kills_the_background_grandchild(ws):
    pidfile = ws.root / "grandchild.pid"
    _pipeline(ws, """
        [pipeline]
        name = "tmo"

        [stages.hang]
        cmd = ["sh", "-c", "sleep 30 & echo $! > PIDFILE; sleep 30"]
        outputs = ["o"]
        timeout = 0.5
    """, PIDFILE=pidfile)
    started = time.monotonic()
    report = _run(ws, run_id="r")
    assert time.monotonic() - started < 5
    assert report.stages[0].failure.class_ == "TimeoutFailure"
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 2
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), f"grandchild {pid} outlived the timed-out stage"


# --- 7. degraded fallbacks -----------------------------------------------------------------------

FALLBACK = """
[pipeline]
name = "fallback"

[stages.build]
cmd = ["sh", "{inputs.script}", "{outputs.o}"]
inputs = { script = "build.sh" }
outputs = ["o"]
on_failure = "use_last_good"
CLASSIFY
[stages.pack]
upstream = ["build"]
cmd = ["sh", "-c", "cat {upstream.build.o} > {outputs.p}"]
outputs = ["p"]
"""


def _fallback(ws, classify: str = "") -> Path:
    count = ws.root / "count"
    ws.write("build.sh", f'echo x >> {count}\necho v1 > "$1"\n')
    ws.pipeline(FALLBACK.replace("CLASSIFY", classify))
    return count


def test_use_last_good_degrades_and_tries_again_next_run(ws):
    count = _fallback(ws)
    assert _run(ws, run_id="A").status == "succeeded"
    ws.write("build.sh", f"echo x >> {count}\necho 'build: toolchain crashed' >&2\nexit 1\n")
    proc = ws.cli("run", "--run-id", "B", "--json")
    assert proc.returncode == 4, proc.stderr
    assert json.loads(proc.stdout)["status"] == "degraded"
    store = ws.open_store()
    a, b = store.manifests.read("A", "build"), store.manifests.read("B", "build")
    assert b.status == "degraded" and b.degraded_from == "A"
    assert b.outputs == a.outputs and b.output_hash == a.output_hash
    assert b.failure.class_ == "BuildFailure" and b.attempts == 1
    assert [e.kind for e in b.events] == ["fallback"]
    pack = store.manifests.read("B", "pack")
    assert pack.status == "succeeded"
    assert store.objects.read_bytes(pack.outputs["p"].hash) == b"v1\n"
    taxonomy = failure_report(store, "B")
    assert (taxonomy.processed, taxonomy.degraded, taxonomy.failed) == (1, 1, 0)
    assert len(_lines(count)) == 2
    # Same failing inputs again: a degraded result is not reused, the stage runs again.
    report = _run(ws, run_id="C")
    assert len(_lines(count)) == 3
    assert report.status == "degraded"
    assert [(s.stage, s.outcome) for s in report.stages] == [("build", "degraded"),
                                                             ("pack", "cached")]
    assert report.stages[0].executed and report.stages[0].degraded_from == "A"


def test_use_last_good_never_covers_a_validation_failure(ws):
    count = _fallback(ws, '[[stages.build.classify]]\nmatch = "schema"\n'
                          'class = "ValidationFailure"\ncategory = "validation"\n')
    assert _run(ws, run_id="A").status == "succeeded"
    ws.write("build.sh", f"echo x >> {count}\necho 'build: schema violation' >&2\nexit 1\n")
    report = _run(ws, run_id="B")
    assert report.status == "failed"
    assert [(s.stage, s.outcome) for s in report.stages] == [("build", "failed"),
                                                             ("pack", "skipped")]
    manifest = ws.open_store().manifests.read("B", "build")
    assert manifest.status == "failed" and manifest.degraded_from is None
    assert manifest.outputs == {} and manifest.events == []
    assert (manifest.failure.class_, manifest.failure.category) == ("ValidationFailure",
                                                                    "validation")


def test_on_failure_skip_skips_dependents_and_runs_the_rest(ws):
    ws.pipeline("""
        [pipeline]
        name = "skip"

        [stages.a]
        cmd = ["sh", "-c", "echo 'a: broken' >&2; exit 1"]
        outputs = ["o"]
        on_failure = "skip"

        [stages.b]
        upstream = ["a"]
        cmd = ["sh", "-c", "cat {upstream.a.o} > {outputs.o}"]
        outputs = ["o"]

        [stages.c]
        cmd = ["sh", "-c", "echo c > {outputs.o}"]
        outputs = ["o"]
    """)
    report = _run(ws, run_id="r")
    assert report.status == "degraded" and not report.ok
    assert {s.stage: s.outcome for s in report.stages} == {
        "a": "skipped", "b": "skipped", "c": "succeeded"}
    store = ws.open_store()
    a = store.manifests.read("r", "a")
    assert a.status == "failed" and [e.kind for e in a.events] == ["skip"]
    assert store.manifests.read_optional("r", "b") is None
    assert store.manifests.read("r", "c").status == "succeeded"
    proc = ws.cli("run", "--run-id", "r2")
    assert proc.returncode == 4, proc.stderr


# --- 8. circuit breaker ------------------------------------------------------------------------

BREAKER = """
[pipeline]
name = "breaker"

[stages.build]
cmd = ["sh", "-c", "echo {item} >> COUNT; SLEEP case {item} in FAILING) echo 'build: toolchain missing' >&2; exit 1;; esac; echo ok > {outputs.o}"]
outputs = ["o"]
"""


def _breaker(ws, failing: str, sleep: str = "") -> Path:
    count = ws.root / "count"
    _pipeline(ws, BREAKER.replace("FAILING", failing).replace("SLEEP", sleep), COUNT=count)
    return count


EIGHT = [f"i{n:02d}" for n in range(1, 9)]


def test_an_open_circuit_fails_later_items_fast(ws):
    count = _breaker(ws, "*")
    report = _run(ws, run_id="r", items=EIGHT, jobs=1,
                  execution=ExecutionOptions(max_consecutive_failures=3))
    classes = {i.item: i.failure.class_ for i in report.items}
    executed = _lines(count)
    assert executed[:3] == EIGHT[:3]
    assert [classes[i] for i in EIGHT[:3]] == ["BuildFailure"] * 3
    # Executed exactly: the first 3, then only probes; every other item failed fast.
    assert executed == [i for i in EIGHT if classes[i] != "CircuitOpenFailure"]
    fast = [i for i in EIGHT if classes[i] == "CircuitOpenFailure"]
    probes = executed[3:]
    assert len(fast) >= 3 and len(executed) == 3 + len(probes) and len(probes) <= 2


def test_circuit_open_failures_are_fast_infrastructure_failures(ws):
    # Parallel items: while one probe runs, the other worker's items fail fast.
    count = _breaker(ws, "*", "sleep 0.5;")
    report = _run(ws, run_id="r", items=EIGHT, jobs=2,
                  execution=ExecutionOptions(max_consecutive_failures=3))
    classes = {i.item: i.failure.class_ for i in report.items}
    executed = _lines(count)
    assert sorted(executed) == [i for i in EIGHT if classes[i] != "CircuitOpenFailure"]
    assert set(EIGHT[:3]) <= set(executed)
    fast = [i for i in EIGHT if classes[i] == "CircuitOpenFailure"]
    assert fast, "no item failed fast while the circuit was open"
    store = ws.open_store()
    for item in fast:
        manifest = store.manifests.read("r", "build", item)
        assert manifest.attempts == 0 and manifest.logs == []
        assert [e.kind for e in manifest.events] == ["circuit_open"]
        f = manifest.failure
        assert (f.category, f.domain, f.taxonomy_eligible) == ("fatal", "infrastructure", False)
        assert f.signal.startswith("circuit open: stage 'build' failed")
    report = failure_report(store, "r")
    assert _rows(report.build_failures) == [
        {"taxonomy_category": "BuildFailure", "count": len(executed),
         "percent_of_build_failures": 100.0}]
    assert _rows(report.infrastructure)[0]["count"] == len(fast)


def test_a_successful_probe_closes_the_circuit(ws):
    ten = [f"i{n:02d}" for n in range(1, 11)]
    count = _breaker(ws, "i01|i02|i03|i04")
    report = _run(ws, run_id="r", items=ten, jobs=1,
                  execution=ExecutionOptions(max_consecutive_failures=3))
    status = {i.item: i.status for i in report.items}
    classes = {i.item: i.failure.class_ if i.failure else None for i in report.items}
    executed = _lines(count)
    assert [classes[i] for i in ten[:3]] == ["BuildFailure"] * 3
    first_ok = next(i for i in ten if status[i] == "succeeded")
    assert first_ok in executed
    later = ten[ten.index(first_ok):]
    assert all(status[i] == "succeeded" for i in later)
    assert executed[-len(later):] == later  # closed: every later item executes again
    assert "i10" in later


# --- 9. disk preflight -------------------------------------------------------------------------


def test_a_disk_preflight_refusal_never_runs_the_command(ws):
    count = ws.root / "count"
    _pipeline(ws, """
        [pipeline]
        name = "disk"

        [stages.big]
        cmd = ["sh", "-c", "echo x >> COUNT; echo ok > {outputs.o}"]
        outputs = ["o"]
        disk = "1000TB"
    """, COUNT=count)
    report = _run(ws, run_id="r")
    assert report.status == "failed"
    manifest = ws.open_store().manifests.read("r", "big")
    f = manifest.failure
    assert (f.class_, f.category, f.domain, f.taxonomy_eligible) == (
        "InfrastructureGateFailure", "fatal", "infrastructure", False)
    assert "needs" in f.signal and "free" in f.signal
    assert manifest.attempts == 0 and manifest.logs == []
    assert [e.kind for e in manifest.events] == ["preflight"]
    assert not count.exists()


# --- 10. a large sampling run -------------------------------------------------------------------


def test_a_hundred_item_sampling_run_keeps_the_denominators_apart(ws):
    items = [f"i{n:03d}" for n in range(1, 101)]
    gate_fails = [i for n, i in enumerate(items, 1) if n % 10 == 0]  # 10: under the threshold
    validation = [i for n, i in enumerate(items, 1) if n % 10 == 3]  # 10
    build = [i for n, i in enumerate(items, 1) if n % 20 == 7]  # 5
    ws.pipeline(f"""
        [pipeline]
        name = "hundred"

        [stages.gate]
        domain = "infrastructure"
        cmd = ["sh", "-c", "case {{item}} in {'|'.join(gate_fails)}) echo 'gate: quota exceeded' >&2; exit 1;; esac; echo ok > {{outputs.o}}"]
        outputs = ["o"]

        [stages.build]
        upstream = ["gate"]
        cmd = ["sh", "-c", "case {{item}} in {'|'.join(validation)}) echo 'bad schema' >&2; exit 1;; {'|'.join(build)}) echo 'ld: undefined reference' >&2; exit 1;; esac; echo ok > {{outputs.o}}"]
        outputs = ["o"]

        [[stages.build.classify]]
        match = "bad schema"
        class = "ValidationFailure"
        category = "validation"
    """)
    report = _run(ws, run_id="h", items=items, jobs=4,
                  execution=_sampling(systemic_min_items=20, systemic_threshold=0.8))
    assert (report.status, report.systemic, report.processed) == ("failed", None, 100), [
        (i.item, i.status, i.failure) for i in report.items if i.status != "succeeded"]
    failed = {i.item for i in report.items if i.status == "failed"}
    assert failed == set(gate_fails) | set(validation) | set(build), [
        (i.item, i.first_failure_stage, i.failure) for i in report.items
        if i.status == "failed" and i.item not in set(gate_fails) | set(validation) | set(build)]
    taxonomy = failure_report(ws.open_store(), "h")
    assert (taxonomy.processed, taxonomy.failed, taxonomy.succeeded) == (100, 25, 75)
    eligible = [r for r in taxonomy.first_failures if r.taxonomy_eligible]
    assert len(eligible) == 15
    assert sum(r.count for r in taxonomy.build_failures) == len(eligible)
    assert _rows(taxonomy.build_failures) == [
        {"taxonomy_category": "ValidationFailure", "count": 10, "percent_of_build_failures": 66.67},
        {"taxonomy_category": "BuildFailure", "count": 5, "percent_of_build_failures": 33.33}]
    assert abs(sum(r.percent_of_build_failures for r in taxonomy.build_failures) - 100) <= 0.1
    assert _rows(taxonomy.infrastructure) == [
        {"stage": "gate", "count": 10, "percent_of_processed": 10.0,
         "dominant_signals": ["gate: quota exceeded"]}]
    assert [r.item for r in taxonomy.first_failures] == [
        i for i in items if i in failed]  # in list order, whatever order the workers ended in
    assert taxonomy.valid_for_trends is True


# --- 11. quality checks ------------------------------------------------------------------------

CHECKED = """
[pipeline]
name = "checks"

[stages.gen]
cmd = ["sh", "-c", "echo x >> COUNT; PRODUCE"]
outputs = ["o"]

[[stages.gen.checks]]
CHECK
"""


def _checked(ws, produce: str, check: str) -> Path:
    count = ws.root / "count"
    _pipeline(ws, CHECKED.replace("PRODUCE", produce).replace("CHECK", check), COUNT=count)
    return count


def test_nonempty_fails_an_empty_output_in_production(ws):
    _checked(ws, ": > {outputs.o}", 'check = "nonempty"')
    report = _run(ws, run_id="p")
    assert report.status == "failed"
    f = ws.open_store().manifests.read("p", "gen").failure
    assert (f.class_, f.category, f.domain, f.taxonomy_eligible) == (
        "ValidationFailure", "validation", "build", True)
    assert f.signal == "check 'nonempty' on output 'o': the file is empty"


def test_a_non_critical_check_warns_in_sampling_and_is_not_reused_in_production(ws):
    count = _checked(ws, ": > {outputs.o}", 'check = "nonempty"')
    sampled = _run(ws, run_id="s1", execution=_sampling())
    assert sampled.status == "succeeded"
    manifest = ws.open_store().manifests.read("s1", "gen")
    assert manifest.status == "succeeded"
    assert manifest.warnings == ["check 'nonempty' on output 'o': the file is empty"]
    assert [e.kind for e in manifest.events] == ["warning"]
    assert sampled.stages[0].warnings == manifest.warnings
    # Another sampling run may reuse it...
    assert _run(ws, run_id="s2", execution=_sampling()).stages[0].outcome == "cached"
    assert len(_lines(count)) == 1
    # ...a production run may not: it executes, and the check fails there.
    production = _run(ws, run_id="p")
    assert len(_lines(count)) == 2
    assert production.stages[0].outcome == "failed" and production.stages[0].executed
    assert production.stages[0].failure.class_ == "ValidationFailure"


def test_a_critical_check_fails_in_sampling_mode_too(ws):
    _checked(ws, ": > {outputs.o}", 'check = "nonempty"\ncritical = true')
    report = _run(ws, run_id="s", execution=_sampling())
    assert report.status == "failed"
    manifest = ws.open_store().manifests.read("s", "gen")
    assert manifest.status == "failed" and manifest.warnings == []
    assert manifest.failure.class_ == "ValidationFailure"


def test_a_check_command_failure_carries_its_stderr(ws):
    _checked(ws, "echo hello > {outputs.o}",
             'cmd = ["sh", "-c", "echo \'header missing in output\' >&2; exit 1"]')
    report = _run(ws, run_id="p")
    f = report.stages[0].failure
    assert (f.class_, f.category) == ("ValidationFailure", "validation")
    assert "exited with code 1" in f.signal
    assert f.signal.endswith(": header missing in output")


@pytest.mark.parametrize("size, ok", [(2048, False), (1024, True)])
def test_max_bytes_limit(ws, size, ok):
    _checked(ws, f"head -c {size} /dev/zero > {{outputs.o}}",
             'check = "max_bytes"\nlimit = "1KiB"')
    report = _run(ws, run_id="p")
    assert report.ok is ok
    if not ok:
        assert report.stages[0].failure.class_ == "ValidationFailure"
        assert report.stages[0].failure.signal == (
            "check 'max_bytes' on output 'o': 2048 bytes, over the limit of 1024")


@pytest.mark.parametrize("text, ok", [("not json", False), ("[1, 2]", True)])
def test_json_check(ws, text, ok):
    _checked(ws, f"echo '{text}' > {{outputs.o}}", 'check = "json"')
    report = _run(ws, run_id="p")
    assert report.ok is ok
    if not ok:
        assert report.stages[0].failure.class_ == "ValidationFailure"
        assert report.stages[0].failure.signal.startswith(
            "check 'json' on output 'o': o is not valid JSON")


# --- the classification table and the upgrade of version-1 records -------------------------------



@pytest.mark.parametrize("class_, exit_code, category, domain", [
    (F.TIMEOUT, None, "retryable", "build"),
    (F.DISK_FULL, None, "retryable", "infrastructure"),
    (F.OUTPUT_MISSING, None, "fatal", "build"),
    (F.INPUT_EMPTY, None, "validation", "build"),
    (F.LAUNCH, None, "fatal", "infrastructure"),
    (F.CIRCUIT_OPEN, None, "fatal", "infrastructure"),
    (F.KILLED, -9, "retryable", "build"),   # killed from outside: may well pass next time
    (F.KILLED, -11, "fatal", "build"),      # crashed on its own: will crash again
    (F.BUILD_FAILURE, 1, "fatal", "build"),  # an unknown failure is fatal
])
def test_runner_classes_have_the_categories_that_fit_them(class_, exit_code, category, domain):
    failure = classify(StageSpec(cmd="x"), Failure(class_=class_, signal="s", exit_code=exit_code))
    assert (failure.class_, failure.category, failure.domain) == (class_, category, domain)
    assert failure.taxonomy_eligible is (domain == "build")


def test_rules_match_in_order_and_an_infrastructure_stage_changes_the_default_class():
    rules = [ClassifyRule(exit_code=2, match="quota", class_="InfrastructureGateFailure",
                          category="retryable"),
             ClassifyRule(match="quota", class_="DependencyResolutionFailure", category="fatal")]
    spec = StageSpec(cmd="x", classify=rules)
    raw = Failure(class_=F.BUILD_FAILURE, signal="s", exit_code=1)
    second = classify(spec, raw, "disk quota exceeded")
    assert (second.class_, second.rule) == ("DependencyResolutionFailure", 1)  # exit 1 != 2
    first = classify(spec, Failure(class_=F.BUILD_FAILURE, signal="s", exit_code=2), "quota")
    assert (first.class_, first.category, first.rule) == ("InfrastructureGateFailure", "retryable", 0)
    infra = classify(StageSpec(cmd="x", domain="infrastructure"), raw, "other")
    assert (infra.class_, infra.category, infra.domain, infra.taxonomy_eligible) == (
        "InfrastructureGateFailure", "fatal", "infrastructure", False)
    # Rules never reclassify the runner's own failures.
    timeout = classify(spec, Failure(class_=F.TIMEOUT, signal="s"), "quota")
    assert (timeout.class_, timeout.rule) == (F.TIMEOUT, None)


def test_a_version_1_manifest_is_upgraded_when_read(ws):
    ws.linear()
    store = ws.open_store()
    run(ws.load(), store, run_id="a")
    path = ws.store / "runs" / "a" / "count.json"
    raw = msgspec.json.decode(path.read_bytes())
    for key in ("item", "degraded_from", "events", "warnings"):
        raw.pop(key, None)
    raw["schema_version"] = 1
    raw["status"] = "failed"
    raw["outputs"], raw["output_hash"] = {}, None
    raw["failure"] = {"class": "SignalFailure", "signal": "killed by signal SIGKILL", "exit_code": -9}
    os.chmod(path, 0o644)
    path.write_bytes(msgspec.json.encode(raw))
    manifest = store.manifests.read("a", "count")
    assert manifest.schema_version == MANIFEST_SCHEMA_VERSION and manifest.item is None and manifest.events == []
    assert (manifest.failure.category, manifest.failure.domain) == ("retryable", "build")
    assert manifest.failure.taxonomy_eligible is True
