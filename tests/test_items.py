"""Item runs: first-failure capture, item order, item ids, reuse across runs, recover and
verify over items, and `--log-format json`.

Stages are cheap `sh -c` commands; an item's behaviour is decided by its name (`case {item}`),
and executions are counted by appending to a log file outside the store.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from datetime import datetime
from pathlib import Path

import msgspec
import pytest

from stagestore.pipeline.items import read_items
from stagestore.execution.runner import run
from stagestore.inspection.report import failure_report


def _run(ws, **kwargs):
    return run(ws.load(), ws.open_store(), **kwargs)


def _items(ws, names, rel: str = "items.txt") -> list[str]:
    ws.write(rel, "".join(f"{name}\n" for name in names))
    return list(names)


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _pipeline(ws, text: str, **paths: Path | str) -> None:
    """Write the pipeline, replacing each KEY in `text` by the absolute path `paths[KEY]`."""
    for key, path in paths.items():
        text = text.replace(key, str(path))
    ws.pipeline(text)


def _damage(ws, run_id: str, stage: str, item: str) -> str:
    """Append a record to the run's item log that is not a valid manifest (format 3 keeps item
    manifests there); returns where readers say it is."""
    store = ws.open_store()
    store.manifests.install(run_id, item, f"{stage}.json", b"{}", f"run-{run_id}")
    store.manifests.close_items(run_id)
    return store.manifests.location(run_id, stage, item)


def _record_reader(ws, run_id: str, item: str) -> str:  # noqa: ANN001
    """A command printing an item's record as the store holds it at that moment."""
    script = ws.root / f"read_record_{item}.py"
    script.write_text("import sys\nfrom stagestore.store.store import Store\n"
                      f"sys.stdout.buffer.write(Store.open({str(ws.store)!r}).manifests"
                      f".read_item_bytes({run_id!r}, {item!r}))\n")
    return f"{sys.executable} {script}"


def _errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


# --- 2. first-failure capture and item order ----------------------------------------------------

THREE_STAGES = """
[pipeline]
name = "items"

[stages.fetch]
cmd = ["sh", "-c", "echo {item} >> LOG; echo {item} > {outputs.o}"]
outputs = ["o"]

[stages.build]
upstream = ["fetch"]
cmd = ["sh", "-c", "echo {item} >> BUILT; SLEEP case {item} in FAILING) echo 'build: missing header foo.h' >&2; exit 1;; esac; cat {upstream.fetch.o} > {outputs.o}"]
outputs = ["o"]

[stages.test]
upstream = ["build"]
cmd = ["sh", "-c", "echo tested > {outputs.o}"]
outputs = ["o"]
"""


def _three(ws, failing: str = "none", sleep: str = "") -> tuple[Path, Path]:
    log, built = ws.root / "log", ws.root / "built"
    _pipeline(ws, THREE_STAGES.replace("FAILING", failing).replace("SLEEP", sleep),
              LOG=log, BUILT=built)
    return log, built


FILE_ORDER = ["c3", "a1", "b2", "e5", "d4"]


def test_an_item_stops_at_its_first_failure_and_the_others_go_on(ws):
    log, _ = _three(ws, failing="b2")
    items = read_items(ws.write("items.txt", "# order matters\nc3\na1\n\nb2\ne5\nd4\n"))
    assert items == FILE_ORDER
    events = []
    report = _run(ws, run_id="r", items=items, jobs=1, progress=events.append)
    assert report.status == "failed" and report.processed == 5
    assert _lines(log) == FILE_ORDER  # strictly in file order
    # With one job each item ends before the next starts.
    sequence = [(e.event, e.item) for e in events if e.event in ("item_start", "item_end")]
    assert sequence == [(kind, item) for item in FILE_ORDER for kind in ("item_start", "item_end")]
    by_item = {i.item: i for i in report.items}
    assert [i.item for i in report.items] == FILE_ORDER
    failed = by_item["b2"]
    assert (failed.status, failed.first_failure_stage, failed.failure.class_) == (
        "failed", "build", "BuildFailure")
    assert [(s.stage, s.outcome) for s in failed.stages] == [("fetch", "succeeded"),
                                                             ("build", "failed")]
    store = ws.open_store()
    assert store.manifests.read_optional("r", "test", "b2") is None
    assert store.manifests.stages("r", "b2") == ["build", "fetch"]
    for item in ("c3", "a1", "e5", "d4"):
        assert by_item[item].status == "succeeded"
        assert store.manifests.read("r", "test", item).status == "succeeded"
        assert store.manifests.read_item("r", item).first_failure is None
    record = store.manifests.read_item("r", "b2")
    assert record.status == "failed" and record.finished_at is not None
    first = record.first_failure
    assert (first.stage, first.failure.class_, first.failure.signal,
            first.failure.taxonomy_eligible) == (
        "build", "BuildFailure", "build: missing header foo.h", True)
    raw = json.loads(store.manifests.read_item_bytes("r", "b2"))
    assert raw["status"] == "failed" and raw["first_failure"]["stage"] == "build"
    assert (raw["first_failure"]["failure"]["class"],
            raw["first_failure"]["failure"]["taxonomy_eligible"]) == ("BuildFailure", True)


def test_items_start_in_file_order_with_several_jobs(ws):
    # Uneven stage durations, so that items end out of order.
    _three(ws, sleep="case {item} in *a) sleep 0.3;; *b) sleep 0.1;; esac;")
    items = _items(ws, ["m1a", "c2b", "z3c", "a4a", "q5c", "b6b", "k7a", "e8c", "x9b", "d0c"])
    events = []
    report = _run(ws, run_id="r", items=read_items(ws.root / "items.txt"), jobs=4,
                  progress=events.append)
    assert report.status == "succeeded" and report.processed == 10
    assert [e.item for e in events if e.event == "item_start"] == items
    assert [i.item for i in report.items] == items
    assert sorted(e.item for e in events if e.event == "item_end") == sorted(items)


# --- 3. the first failure is persisted as soon as it happens ------------------------------------


def test_a_failed_item_is_recorded_before_the_next_item_starts(ws):
    record = _record_reader(ws, "r", "i02")
    _pipeline(ws, """
        [pipeline]
        name = "p"

        [stages.build]
        cmd = ["sh", "-c", "case {item} in i02) echo 'build: boom' >&2; exit 1;; i03) RECORD > {outputs.o};; *) echo ok > {outputs.o};; esac"]
        outputs = ["o"]
    """, RECORD=record)
    report = _run(ws, run_id="r", items=["i01", "i02", "i03"], jobs=1)
    assert [i.status for i in report.items] == ["succeeded", "failed", "succeeded"]
    store = ws.open_store()
    seen = json.loads(store.objects.read_bytes(store.manifests.read("r", "build", "i03")
                                               .outputs["o"].hash))
    assert seen["status"] == "failed"
    assert seen["first_failure"] is not None and seen["first_failure"]["stage"] == "build"
    assert seen["first_failure"]["failure"]["signal"] == "build: boom"


def test_a_covered_first_failure_is_recorded_while_the_item_goes_on(ws):
    record = _record_reader(ws, "r", "i01")
    _pipeline(ws, """
        [pipeline]
        name = "p"

        [stages.lint]
        cmd = ["sh", "-c", "case {item} in i01) echo 'lint: style errors' >&2; exit 1;; esac; echo ok > {outputs.o}"]
        outputs = ["o"]
        on_failure = "skip"

        [stages.report]
        upstream = ["lint"]
        cmd = ["sh", "-c", "cat {upstream.lint.o} > {outputs.o}"]
        outputs = ["o"]

        [stages.snapshot]
        cmd = ["sh", "-c", "case {item} in i01) RECORD > {outputs.o};; *) echo ok > {outputs.o};; esac"]
        outputs = ["o"]
    """, RECORD=record)
    result = _run(ws, run_id="r", items=["i01", "i02"], jobs=1)
    assert result.status == "degraded"
    item = result.items[0]
    # A failure a fallback covered is not the item's first failure (the item did not fail):
    # it is recorded among the item's fallbacks.
    assert (item.status, item.first_failure_stage) == ("degraded", None)
    assert [(s.stage, s.outcome) for s in item.stages] == [
        ("lint", "skipped"), ("snapshot", "succeeded"), ("report", "skipped")]
    store = ws.open_store()
    seen = json.loads(store.objects.read_bytes(
        store.manifests.read("r", "snapshot", "i01").outputs["o"].hash))
    # Read by a later stage of the same item: still running, first failure already there.
    assert seen["status"] == "running"
    assert seen["first_failure"] is None
    assert [f["stage"] for f in seen["fallbacks"]] == ["lint"]
    assert seen["fallbacks"][0]["failure"]["signal"] == "lint: style errors"
    final = store.manifests.read_item("r", "i01")
    assert final.status == "degraded" and final.first_failure is None
    assert [f.stage for f in final.fallbacks] == ["lint"]
    taxonomy = failure_report(store, "r")
    assert (taxonomy.processed, taxonomy.succeeded, taxonomy.degraded, taxonomy.failed) == (
        2, 1, 1, 0)
    assert taxonomy.first_failures == []


# --- 12. item ids ---------------------------------------------------------------------------

IDS = """
[pipeline]
name = "ids"

[stages.build]
cmd = ["sh", "-c", "echo $STAGESTORE_ITEM >> COUNT; printf '%s' '{item}' > {outputs.o}"]
outputs = ["o"]

[stages.pack]
upstream = ["build"]
cmd = ["sh", "-c", "echo {item} >> COUNT; cat {upstream.build.o} > {outputs.o}"]
outputs = ["o"]
"""


def test_any_item_id_gets_a_reversible_folder_name(ws):
    count = ws.root / "count"
    _pipeline(ws, IDS, COUNT=count)
    _items(ws, ["gcc/12", ".hidden", "plain"])
    proc = ws.cli("run", "--items", "items.txt", "--run-id", "r")
    assert proc.returncode == 0, proc.stderr
    store = ws.open_store()
    assert store.manifests.items("r") == [".hidden", "gcc/12", "plain"]
    for item in ("gcc/12", ".hidden", "plain"):
        manifest = store.manifests.read("r", "pack", item)
        assert manifest.item == item
        assert store.objects.read_bytes(manifest.outputs["o"].hash) == item.encode()
        assert store.manifests.read_item("r", item).status == "succeeded"
    assert _lines(count) == ["gcc/12", "gcc/12", ".hidden", ".hidden", "plain", "plain"]
    shown = ws.cli("show", "r", "build", "--item", "gcc/12", "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["item"] == "gcc/12"
    assert ws.cli("verify").returncode == 0


@pytest.mark.parametrize("text, message", [
    ("a\nb\n\na\n", "error: items.txt:4: item 'a' is listed twice (first on line 1)"),
    ("# nothing here\n\n   \n", "error: items file items.txt lists no items"),
    ("ok\nbad\x00id\n", "error: items.txt:2: invalid item id"),
])
def test_a_bad_items_file_is_a_usage_error_naming_the_line(ws, text, message):
    _pipeline(ws, IDS, COUNT=ws.root / "count")
    (ws.root / "items.txt").write_text(text)
    proc = ws.cli("run", "--items", "items.txt")
    assert proc.returncode == 2
    errors = _errors(proc)
    assert len(errors) == 1 and errors[0].startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not ws.store.exists()  # refused before the store is created


def test_items_need_a_per_item_stage_and_a_per_item_stage_needs_items(ws):
    ws.pipeline("""
        [pipeline]
        name = "plain"

        [stages.once]
        cmd = ["sh", "-c", "echo once > {outputs.o}"]
        outputs = ["o"]
    """)
    _items(ws, ["i01"])
    proc = ws.cli("run", "--items", "items.txt")
    assert proc.returncode == 2
    assert _errors(proc) == ["error: items were given, but no selected stage runs per item"]
    _pipeline(ws, IDS, COUNT=ws.root / "count")
    proc = ws.cli("run")
    assert proc.returncode == 2
    errors = _errors(proc)
    assert len(errors) == 1 and errors[0].startswith("error: stage 'build' runs once per item")
    assert "hint: pass --items FILE" in proc.stderr
    assert not (ws.root / "count").exists()


def test_an_identical_item_in_a_later_run_is_reused(ws):
    count = ws.root / "count"
    _pipeline(ws, IDS, COUNT=count)
    _run(ws, run_id="a", items=["i01", "i02"])
    assert _lines(count) == ["i01", "i01", "i02", "i02"]
    report = _run(ws, run_id="b", items=["i02", "i03"])
    assert report.status == "succeeded"
    reused, new = report.items
    assert [(s.stage, s.outcome, s.cached_from, s.executed) for s in reused.stages] == [
        ("build", "cached", "a", False), ("pack", "cached", "a", False)]
    assert [(s.stage, s.outcome) for s in new.stages] == [("build", "succeeded"),
                                                          ("pack", "succeeded")]
    assert _lines(count) == ["i01", "i01", "i02", "i02", "i03", "i03"]
    manifest = ws.open_store().manifests.read("b", "build", "i02")
    assert manifest.cached_from == "a" and manifest.attempts == 0


# --- 13. recover and verify over items -----------------------------------------------------------

RECOVERABLE = """
[pipeline]
name = "rec"

[stages.fetch]
cmd = ["sh", "-c", "echo {item} > {outputs.o}"]
outputs = ["o"]

[stages.build]
upstream = ["fetch"]
cmd = ["sh", "-c", "echo {item} >> COUNT; case {item} in FAILING) echo 'build: broken {item}' >&2; exit 1;; esac; cat {upstream.fetch.o} > {outputs.o}"]
outputs = ["o"]
"""


def _recoverable(ws, failing: str) -> Path:
    count = ws.root / "count"
    _pipeline(ws, RECOVERABLE.replace("FAILING", failing), COUNT=count)
    return count


def _writable(path: Path) -> None:
    path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_verify_names_a_damaged_item_manifest_and_recover_redoes_it(ws):
    count = _recoverable(ws, "i03")
    items = _items(ws, ["i01", "i02", "i03", "i04"])
    _run(ws, run_id="r", items=items)
    store = ws.open_store()
    failed_before = store.manifests.read_item("r", "i03").first_failure
    damaged = _damage(ws, "r", "build", "i02")
    proc = ws.cli("verify", "--json")
    assert proc.returncode == 1
    problems = json.loads(proc.stdout)["problems"]
    assert [(p["kind"], p["run_id"], p["item"], p["stage"]) for p in problems] == [
        ("manifest_invalid", "r", "i02", "build")], proc.stdout
    assert problems[0]["path"] == damaged
    assert "(item 'i02' stage build)" in ws.cli("verify").stdout
    proc = ws.cli("recover")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ws.cli("verify").returncode == 0
    again = ws.cli("recover")
    assert again.returncode == 0 and again.stdout == "nothing to recover\n"
    store = ws.open_store()
    assert store.manifests.read("r", "build", "i02").status == "succeeded"
    assert store.manifests.read_item("r", "i02").status == "succeeded"
    assert store.manifests.read_item("r", "i03").first_failure == failed_before
    assert _lines(count) == ["i01", "i02", "i03", "i04", "i02"]  # only the damaged one again


def test_recover_completes_an_interrupted_item_run_and_keeps_ended_items(ws):
    count = _recoverable(ws, "i02|i05")
    items = _items(ws, [f"i0{n}" for n in range(1, 7)])
    _run(ws, run_id="r", items=items)
    store = ws.open_store()
    firsts = {i: store.manifests.read_item("r", i).first_failure for i in ("i02", "i05")}
    assert all(f is not None and f.stage == "build" for f in firsts.values())
    # As if the runner died while i04 and i06 were under way.
    for item in ("i04", "i06"):
        record = store.manifests.read_item("r", item)
        store.manifests.write_item(msgspec.structs.replace(
            record, status="running", first_failure=None, finished_at=None), "run-r")
        for stage in ("fetch", "build"):
            store.manifests.remove("r", stage, item, "run-r")
    store.manifests.close_items("r")
    record = store.manifests.read_run("r")
    store.manifests.write_run(msgspec.structs.replace(record, finished_at=None), "run-r")
    proc = ws.cli("verify")
    assert proc.returncode == 0  # an interrupted run is a warning, not a problem
    assert "warning: [run_incomplete] run r was interrupted: 2 item(s) not ended (i04, i06)" \
        in proc.stdout
    proc = ws.cli("recover")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    store = ws.open_store()
    assert store.manifests.read_run("r").finished_at is not None
    statuses = {i: store.manifests.read_item("r", i).status for i in items}
    assert statuses == {"i01": "succeeded", "i02": "failed", "i03": "succeeded",
                        "i04": "succeeded", "i05": "failed", "i06": "succeeded"}
    for item in ("i04", "i06"):
        assert store.manifests.read("r", "build", item).status == "succeeded"
    for item, first in firsts.items():
        assert store.manifests.read_item("r", item).first_failure == first
    assert _lines(count) == items + ["i04", "i06"]  # failed items are data, not retried
    assert ws.cli("verify").returncode == 0
    assert ws.cli("recover").stdout == "nothing to recover\n"
    taxonomy = failure_report(store, "r")
    assert (taxonomy.processed, taxonomy.failed) == (6, 2)
    assert [r.item for r in taxonomy.first_failures] == ["i02", "i05"]


def test_verify_text_names_the_item_id_of_a_damaged_manifest(ws):
    _recoverable(ws, "none")
    _run(ws, run_id="r", items=["gcc/12"])
    _damage(ws, "r", "build", "gcc/12")
    proc = ws.cli("verify")
    assert proc.returncode == 1
    problems = [line for line in proc.stdout.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1 and "item 'gcc/12'" in problems[0], proc.stdout


def test_recover_does_not_resume_a_systemically_aborted_run(ws):
    from stagestore.model.records import ExecutionOptions

    count = ws.root / "count"
    _pipeline(ws, """
        [pipeline]
        name = "abort"

        [stages.gate]
        domain = "infrastructure"
        cmd = ["sh", "-c", "echo {item} >> COUNT; echo 'gate: runner pool exhausted' >&2; exit 1"]
        outputs = ["o"]
    """, COUNT=count)
    items = [f"i{n:02d}" for n in range(1, 41)]
    report = _run(ws, run_id="a", items=items, jobs=1,
                  execution=ExecutionOptions(mode="sampling", systemic_min_items=20))
    assert report.status == "aborted" and _lines(count) == items[:20]
    _damage(ws, "a", "gate", "i05")
    ws.cli("recover")
    store = ws.open_store()
    assert store.manifests.items("a") == items[:20]
    assert "i21" not in _lines(count)
    record = store.manifests.read_run("a")
    assert record.systemic is not None and record.systemic.processed_items == 20


# --- 14. --log-format json ---------------------------------------------------------------------

LOGGED = """
[pipeline]
name = "logged"

[stages.prep]
cmd = ["sh", "-c", "echo prep > {outputs.o}"]
outputs = ["o"]

[stages.build]
upstream = ["prep"]
cmd = ["sh", "-c", "case {item} in i02) echo 'build: boom' >&2; exit 1;; esac; echo {item} > {outputs.o}"]
outputs = ["o"]
"""

EVENT_KEYS = {"ts", "run_id", "item", "stage", "event", "detail"}


def test_every_stderr_line_of_a_json_logged_run_is_a_json_event(ws):
    ws.pipeline(LOGGED)
    _items(ws, ["i01", "i02", "i03"])
    proc = ws.cli("run", "--items", "items.txt", "--run-id", "j", "--log-format", "json")
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines
    for line in lines:
        assert isinstance(json.loads(line), dict), line


def test_json_log_events_carry_the_run_and_the_item(ws):
    ws.pipeline(LOGGED)
    _items(ws, ["i01", "i02", "i03"])
    proc = ws.cli("run", "--items", "items.txt", "--run-id", "j", "--log-format", "json")
    assert proc.returncode == 1
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert events
    for event in events:
        assert set(event) == EVENT_KEYS and event["run_id"] == "j"
        datetime.fromisoformat(event["ts"])
    assert [(e["stage"], e["event"], e["item"]) for e in events if e["item"] is None] == [
        ("prep", "start", None), ("prep", "succeeded", None), (None, "run_end", None)]
    assert events[-1]["detail"] == "failed: 3 items processed, 1 failed"
    for item in ("i01", "i03"):
        assert [(e["stage"], e["event"], e["detail"]) for e in events if e["item"] == item] == [
            (None, "item_start", ""), ("build", "start", ""), ("build", "succeeded", ""),
            (None, "item_end", "succeeded")]
    assert [(e["stage"], e["event"], e["detail"]) for e in events if e["item"] == "i02"] == [
        (None, "item_start", ""), ("build", "start", ""),
        ("build", "failed", "BuildFailure (fatal)"), (None, "item_end", "failed")]


def test_a_json_logged_plain_run_prints_only_json_on_stderr(ws):
    ws.pipeline(LOGGED.replace("{item}", "x"))
    proc = ws.cli("run", "--run-id", "j", "--log-format", "json")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines()]
    assert [(e["stage"], e["event"]) for e in events] == [
        ("prep", "start"), ("prep", "succeeded"), ("build", "start"), ("build", "succeeded"),
        (None, "run_end")]
    assert all(set(e) == EVENT_KEYS and e["item"] is None for e in events)
    assert proc.stdout == "j\n"


# --- inspecting item runs: show, logs, checkout and diff take an item -------------------------

INSPECTED = """
[pipeline]
name = "inspected"

[stages.shared]
cmd = ["sh", "-c", "echo once > {outputs.o}"]
outputs = ["o"]

[stages.per]
upstream = ["shared"]
inputs = { src = "data/{item}.txt" }
cmd = ["sh", "-c", "echo {item} >&2; cat {inputs.src} {upstream.shared.o} > {outputs.o}"]
outputs = ["o"]
"""


def test_show_logs_checkout_and_diff_name_the_item(ws):
    ws.pipeline(INSPECTED)
    ws.write("data/a.txt", "alpha\n")
    ws.write("data/gcc/12.txt", "twelve\n")
    _items(ws, ["a", "gcc/12"])
    assert ws.cli("run", "--items", "items.txt", "--run-id", "r1").returncode == 0
    shown = json.loads(ws.cli("show", "r1", "per", "--item", "gcc/12", "--json").stdout)
    assert (shown["item"], shown["stage"], shown["status"]) == ("gcc/12", "per", "succeeded")
    logs = ws.cli("logs", "r1", "per", "--item", "gcc/12")
    assert logs.returncode == 0 and "gcc/12" in logs.stdout
    out = ws.root / "out"
    assert ws.cli("checkout", "r1", "per", "--item", "gcc/12", "--to", str(out)).returncode == 0
    assert (out / "o").read_text() == "twelve\nonce\n"
    # Without --item, a per-item stage is not found, and the error says what to add.
    missing = ws.cli("show", "r1", "per")
    assert missing.returncode == 2 and "--item" in missing.stderr and "Traceback" not in missing.stderr
    unknown = ws.cli("show", "r1", "per", "--item", "nosuch")
    assert unknown.returncode == 2 and "no item 'nosuch'" in unknown.stderr
    # A second run where one item's input changed: diff names that item and why.
    ws.write("data/a.txt", "ALPHA\n")
    assert ws.cli("run", "--items", "items.txt", "--run-id", "r2").returncode == 0
    diff = json.loads(ws.cli("diff", "r1", "r2", "--json").stdout)
    changes = {(s["item"], s["stage"]): (s["change"], s["changed_inputs"]) for s in diff["stages"]}
    assert changes == {
        (None, "shared"): ("unchanged", []),
        ("a", "per"): ("changed", ["inputs.src"]),
        ("gcc/12", "per"): ("unchanged", [])}
    only = json.loads(ws.cli("diff", "r1", "r2", "--item", "gcc/12", "--json").stdout)
    assert {(s["item"], s["stage"]) for s in only["stages"]} == {(None, "shared"), ("gcc/12", "per")}


def test_runs_and_show_tell_an_item_run_with_failed_items(ws):
    ws.pipeline(INSPECTED)
    ws.write("data/a.txt", "alpha\n")
    _items(ws, ["a", "b"])  # b has no data file: it fails with InputMissingFailure
    assert ws.cli("run", "--items", "items.txt", "--run-id", "r1").returncode == 1
    runs = json.loads(ws.cli("runs", "--json").stdout)["runs"]
    assert [(r["run_id"], r["state"]) for r in runs] == [("r1", "failed")]
    detail = json.loads(ws.cli("show", "r1", "--json").stdout)
    assert detail["items"] == {"failed": 1, "succeeded": 1}
    assert {row["stage"]: row["status"] for row in detail["stages"]} == {
        "shared": "succeeded", "per": "per item"}
    record = ws.open_store().manifests.read_item("r1", "b")
    assert record.first_failure.failure.class_ == "InputMissingFailure"
    assert "data/b.txt" in record.first_failure.failure.signal


def test_status_of_an_item_pipeline_names_the_per_item_stages_instead_of_failing(ws):
    """`status` used to hash the input path with `{item}` in it and fail with a missing file."""
    ws.pipeline(ITEM_STATUS_TOML)
    ws.write("data/a.txt", "a\n")
    ws.write("common.txt", "c\n")
    for _ in range(2):  # before any run, and after one
        proc = ws.cli("status")
        assert proc.returncode == 0, proc.stderr
        assert "per item" in proc.stdout and "Traceback" not in proc.stderr, proc.stdout
        ws.write("items.txt", "a\n")
        assert ws.cli("run", "--items", "items.txt", "-q").returncode == 0


ITEM_STATUS_TOML = """
[pipeline]
name = "items-status"

[stages.prep]
cmd = "cp {inputs.src} {outputs.o}"
shell = true
inputs = { src = "common.txt" }
outputs = ["o"]

[stages.each]
upstream = ["prep"]
cmd = "cat {inputs.src} {upstream.prep.o} > {outputs.o}"
shell = true
inputs = { src = "data/{item}.txt" }
outputs = ["o"]
"""
