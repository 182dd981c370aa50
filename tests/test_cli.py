"""The `stagestore` command line, run for real in a subprocess (`ws.cli`)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from conftest import Workspace

COMMANDS = ["run", "verify", "recover", "diff", "show", "runs", "status", "checkout", "logs",
            "forget", "gc", "schema", "contracts", "report", "doctor", "stats", "check", "plan",
            "remote", "push", "pull"]

# A run id is a plain name (it becomes a folder under runs/); the default one is time-based.
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

PY = json.dumps(sys.executable)  # a TOML basic string holding this interpreter's path

MANIFEST_FIELDS = {"schema_version", "stage", "run_id", "pipeline", "status", "input_hash",
                   "config_hash", "output_hash", "inputs", "outputs", "started_at", "finished_at",
                   "cached_from", "attempts", "logs", "failure"}


# --- helpers -------------------------------------------------------------------------------------

def no_traceback(res) -> None:
    assert "Traceback" not in res.stdout, res.stdout
    assert "Traceback" not in res.stderr, res.stderr
    assert "internal error" not in res.stderr, res.stderr


def ok(res) -> str:
    assert res.returncode == 0, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    no_traceback(res)
    return res.stdout


def as_json(res):
    return json.loads(ok(res))


def run_ok(ws: Workspace, *args: str) -> str:
    """`stagestore run`; returns the run id it printed."""
    out = ok(ws.cli("run", *args))
    run_id = out.strip()
    assert out == run_id + "\n" and RUN_ID_RE.match(run_id), out
    return run_id


def usage_error(res, *, code: int = 2) -> list[str]:
    """A clean usage error: the exit code, `error: ` first, no traceback; returns stderr lines."""
    assert res.returncode == code, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    no_traceback(res)
    assert res.stderr.startswith("error: "), res.stderr
    return res.stderr.splitlines()


def set_suffix(ws: Workspace, suffix: str) -> None:
    text = ws.pipeline_file.read_text()
    assert 'suffix = "!"' in text
    ws.pipeline_file.write_text(text.replace('suffix = "!"', f'suffix = "{suffix}"'))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def expected_make_out(files: int = 3, suffix: str = "!") -> dict[str, bytes]:
    return {f"f{i}.txt": f"file {i}\n{suffix}".encode() for i in range(files)}


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> tuple[Workspace, str]:
    """A linear workspace with one complete run; tests using it must not change its store."""
    root = tmp_path_factory.mktemp("done") / "ws"
    root.mkdir()
    ws = Workspace(root)
    ws.linear()
    return ws, run_ok(ws)


BRANCHES = f"""
[pipeline]
name = "branches"

[stages.bad]
cmd = [{PY}, "-c", "import sys; print('boom here', file=sys.stderr); sys.exit(3)"]
outputs = ["o"]

[stages.good]
cmd = [{PY}, "-c", "import sys; open(sys.argv[1], 'w').write('good')", "{{outputs.o}}"]
outputs = ["o"]

[stages.after_bad]
upstream = ["bad"]
cmd = [{PY}, "-c", "import sys; open(sys.argv[1], 'w').write(open(sys.argv[2]).read())",
       "{{outputs.o}}", "{{upstream.bad.o}}"]
outputs = ["o"]

[stages.after_good]
upstream = ["good"]
cmd = [{PY}, "-c", "import sys; open(sys.argv[1], 'w').write(open(sys.argv[2]).read() + '+')",
       "{{outputs.o}}", "{{upstream.good.o}}"]
outputs = ["o"]
"""


# --- help ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(ws, command):
    out = ok(ws.cli(command, "--help"))
    assert out.startswith(f"Usage: stagestore {command} "), out
    assert not ws.store.exists()


def test_top_level_help_lists_all_commands(ws):
    out = ok(ws.cli("--help"))
    assert out.startswith("Usage: stagestore ")
    listed = set(re.findall(r"^  (\w+)\s", out.split("Commands:", 1)[1], re.M))
    assert listed == set(COMMANDS)


# --- validation through the CLI ------------------------------------------------------------------

HEAD = '[pipeline]\nname = "p"\n\n'

# (id, body, expected "- at `...`" suffix, words)
CLI_INVALID = [
    ("unknown-upstream", '[stages.a]\ncmd = "true"\nupstream = ["ghost"]\n',
     "$.stages.a.upstream", ["ghost"]),
    ("cycle", '[stages.a]\ncmd = "true"\nupstream = ["b"]\n[stages.b]\ncmd = "true"\nupstream = ["a"]\n',
     "$.stages.a.upstream", ["cycle"]),
    ("undeclared-input", '[stages.a]\ncmd = "cat {inputs.x}"\n', "$.stages.a.cmd", ["{inputs.x}"]),
    ("undeclared-upstream-output",
     '[stages.a]\ncmd = "true"\noutputs = ["o"]\n[stages.b]\nupstream = ["a"]\ncmd = "cat {upstream.a.p}"\n',
     "$.stages.b.cmd", ["{upstream.a.p}"]),
    ("unknown-placeholder-kind", '[stages.a]\ncmd = "echo {env.HOME}"\n', "$.stages.a.cmd",
     ["{env.HOME}"]),
    ("output-name-slash", '[stages.a]\ncmd = "true"\noutputs = ["a/b"]\n', "$.stages.a.outputs", ["a/b"]),
    ("output-name-dotdot", '[stages.a]\ncmd = "true"\noutputs = [".."]\n', "$.stages.a.outputs", [".."]),
    ("input-name-empty", '[stages.a]\ncmd = "true"\ninputs = { "" = "stagestore.toml" }\n',
     "$.stages.a.inputs", ["input name"]),
    ("missing-input", '[stages.a]\ncmd = "true"\ninputs = { x = "gone.csv" }\n', "$.stages.a.inputs",
     ["gone.csv"]),
    pytest.param("unknown-key", '[stages.a]\ncmd = "true"\nretrys = 2\n', "$.stages.a.retrys", ["retrys"]),
    pytest.param("wrong-type", '[stages.a]\ncmd = "true"\ntimeout = "10"\n', "$.stages.a.timeout",
                 ["timeout"]),
    pytest.param("cmd-and-call", '[stages.a]\ncmd = "true"\ncall = "m:f"\n', "$.stages.a.cmd", ["call"]),
]


def _case_args(case):
    if hasattr(case, "values"):
        return pytest.param(*case.values[1:], marks=case.marks, id=case.values[0])
    return pytest.param(*case[1:], id=case[0])


@pytest.mark.parametrize("body,at,words", [_case_args(c) for c in CLI_INVALID])
def test_run_refuses_invalid_pipeline(ws, body, at, words):
    ws.pipeline(HEAD + body)
    res = ws.cli("run")
    lines = usage_error(res)
    assert res.stdout == ""
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, res.stderr  # ONE message
    assert "stagestore.toml" in errors[0]
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert errors[0].endswith(f"- at `{at}`"), errors[0]
    assert not ws.store.exists(), "nothing may run (or be stored) for an invalid pipeline"


@pytest.mark.parametrize("body", [
    pytest.param('[stages.a]\ncmd = "true"\nretrys = 2\n', id="unknown-key"),
    pytest.param('[stages.a]\ncmd = "true"\ntimeout = "10"\n', id="wrong-type"),
    pytest.param('[stages.a]\ncmd = "true"\ncall = "m:f"\n', id="cmd-and-call"),
    pytest.param('[stages.a]\noutputs = ["o"]\n', id="neither-cmd-nor-call"),
    pytest.param('[stages.a]\ncmd = "true"\nretries = = 1\n', id="toml-syntax"),
    pytest.param('[stages.a\ncmd = "true"\n', id="toml-header"),
])
def test_run_refuses_undecodable_pipeline_cleanly(ws, body):
    ws.pipeline(HEAD + body)
    res = ws.cli("run")
    lines = usage_error(res)
    assert len([line for line in lines if line.startswith("error:")]) == 1
    assert "stagestore.toml" in lines[0]
    assert not ws.store.exists()


def test_invalid_pipeline_refused_by_status_and_contracts_too(ws):
    ws.pipeline(HEAD + '[stages.a]\ncmd = "cat {inputs.x}"\n')
    for command in ("status", "contracts"):
        lines = usage_error(ws.cli(command))
        assert lines[0].endswith("- at `$.stages.a.cmd`"), lines


def test_validation_happens_before_any_stage_runs(ws):
    # The first stage is valid and would leave a mark; the second is invalid.
    ws.pipeline(HEAD + f"""
[stages.first]
cmd = [{PY}, "-c", "open('ran.txt', 'w').write('x'); open(__import__('sys').argv[1], 'w').write('')", "{{outputs.o}}"]
outputs = ["o"]

[stages.second]
upstream = ["first"]
cmd = "cat {{upstream.first.nope}}"
""")
    usage_error(ws.cli("run"))
    assert not (ws.root / "ran.txt").exists()
    assert not ws.store.exists()


def test_run_unknown_stage_lists_valid_stages(ws):
    ws.linear()
    lines = usage_error(ws.cli("run", "--stage", "nosuch"))
    assert "'nosuch'" in lines[0]
    assert "make, count, report" in lines[0]


def test_missing_pipeline_file(ws):
    lines = usage_error(ws.cli("run"))
    assert "stagestore.toml" in lines[0] and "not found" in lines[0]
    assert any(line.startswith("hint: ") for line in lines[1:])
    lines = usage_error(ws.cli("run", "-p", "other.toml"))
    assert "other.toml" in lines[0] and "not found" in lines[0]
    assert not ws.store.exists()


def test_literal_braces_run_end_to_end(ws, tmp_path):
    ws.pipeline(HEAD + f"""
[stages.a]
cmd = [{PY}, "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])", "{{outputs.o}}", "{{{{lit}}}} {{{{inputs.x}}}}"]
outputs = ["o"]
""")
    assert "{{lit}}" in ws.pipeline_file.read_text()
    run_id = run_ok(ws)
    ok(ws.cli("checkout", run_id, "a", "--to", str(tmp_path / "co")))
    assert (tmp_path / "co" / "o").read_text() == "{lit} {inputs.x}"


# --- run -----------------------------------------------------------------------------------------

def test_run_prints_run_id_and_reuses_work(ws):
    ws.linear()
    res = ws.cli("run")
    out = ok(res)
    assert out.count("\n") == 1
    first = out.strip()
    assert RUN_ID_RE.match(first), out
    assert (ws.store / "runs" / first / "_run.json").is_file()
    for stage in ("make", "count", "report"):
        assert (ws.store / "runs" / first / f"{stage}.json").is_file()

    report = as_json(ws.cli("run", "--json"))
    assert {"run_id", "ok", "stages"} <= set(report)
    assert report["ok"] is True
    assert report["run_id"] != first and RUN_ID_RE.match(report["run_id"])
    assert [s["stage"] for s in report["stages"]] == ["make", "count", "report"]
    assert all(s["outcome"] == "cached" and s["cached_from"] == first for s in report["stages"])


def test_run_with_explicit_run_id_and_stage(ws):
    ws.linear()
    assert run_ok(ws, "--run-id", "mine", "--stage", "count") == "mine"
    detail = as_json(ws.cli("show", "mine", "--json"))
    assert [row["stage"] for row in detail["stages"]] == ["make", "count"]
    assert not (ws.store / "runs" / "mine" / "report.json").exists()


def test_store_lives_beside_the_pipeline_file(ws):
    sub = Workspace(ws.root / "sub")
    sub.linear()
    run_id = run_ok(ws, "-p", "sub/stagestore.toml")
    assert (sub.store / "runs" / run_id).is_dir()
    assert not ws.store.exists()
    runs = as_json(ws.cli("runs", "-p", "sub/stagestore.toml", "--json"))
    assert [r["run_id"] for r in runs["runs"]] == [run_id]


def test_failed_stage_skips_downstream_but_independent_branch_finishes(ws, tmp_path):
    ws.pipeline(BRANCHES)
    res = ws.cli("run")
    assert res.returncode == 1, res.stderr
    no_traceback(res)
    run_id = res.stdout.strip()
    assert RUN_ID_RE.match(run_id), res.stdout
    assert "error: stage bad failed" in res.stderr
    assert "exit code 3" in res.stderr
    assert "boom here" in res.stderr
    assert "skipped: stage after_bad" in res.stderr
    assert f"stagestore logs {run_id} bad" in res.stderr
    assert "after_good" not in res.stderr and "stage good" not in res.stderr

    detail = as_json(ws.cli("show", run_id, "--json"))
    status = {row["stage"]: row["status"] for row in detail["stages"]}
    assert status == {"bad": "failed", "good": "succeeded", "after_bad": "skipped",
                      "after_good": "succeeded"}
    assert detail["state"] == "failed"
    # downstream of the failure did not run: no manifest
    assert not (ws.store / "runs" / run_id / "after_bad.json").exists()
    usage_error(ws.cli("show", run_id, "after_bad"))
    # the independent branch produced its output
    ok(ws.cli("checkout", run_id, "after_good", "--to", str(tmp_path / "co")))
    assert (tmp_path / "co" / "o").read_text() == "good+"
    # the failed stage's manifest records the failure; logs show its stderr
    manifest = as_json(ws.cli("show", run_id, "bad", "--json"))
    assert manifest["status"] == "failed"
    assert manifest["failure"]["class"] == "BuildFailure"
    assert manifest["failure"]["exit_code"] == 3
    assert manifest["output_hash"] is None and manifest["outputs"] == {}
    assert "boom here" in ok(ws.cli("logs", run_id, "bad"))
    # a failed stage has nothing to check out, and nothing is written
    res = ws.cli("checkout", run_id, "bad", "--to", str(tmp_path / "none"))
    assert res.returncode != 0 and res.stderr.startswith("error: ")
    assert not (tmp_path / "none").exists()


def test_failed_run_json(ws):
    ws.pipeline(BRANCHES)
    res = ws.cli("run", "--json")
    assert res.returncode == 1
    no_traceback(res)
    report = json.loads(res.stdout)
    assert report["ok"] is False
    outcomes = {s["stage"]: s["outcome"] for s in report["stages"]}
    assert outcomes == {"bad": "failed", "good": "succeeded", "after_bad": "skipped",
                        "after_good": "succeeded"}
    bad = next(s for s in report["stages"] if s["stage"] == "bad")
    assert bad["failure"]["exit_code"] == 3 and "boom here" in bad["failure"]["signal"]
    skipped = next(s for s in report["stages"] if s["stage"] == "after_bad")
    assert "bad" in skipped["reason"]
    runs = as_json(ws.cli("runs", "--json"))["runs"]
    assert [r["state"] for r in runs] == ["failed"]


# --- verify --------------------------------------------------------------------------------------

def test_verify_json_clean(done):
    ws, _ = done
    report = as_json(ws.cli("verify", "--json"))
    assert {"ok", "problems", "warnings"} <= set(report)
    assert report["ok"] is True
    assert report["problems"] == []
    assert report["runs_checked"] == 1 and report["manifests_checked"] == 3


def test_verify_finds_a_damaged_object(ws):
    ws.linear()
    run_id = run_ok(ws)
    manifest = json.loads((ws.store / "runs" / run_id / "count.json").read_text())
    digest = manifest["outputs"]["n"]["hash"].split(":", 1)[1]
    path = ws.store / "objects" / digest[:2] / digest[2:]
    os.chmod(path, 0o644)
    path.write_bytes(b"42")
    res = ws.cli("verify", "--json")
    assert res.returncode == 1
    no_traceback(res)
    report = json.loads(res.stdout)
    assert report["ok"] is False and report["problems"]
    assert any(digest in json.dumps(p) for p in report["problems"])


# --- diff ----------------------------------------------------------------------------------------

def _check_diff_shape(report: dict) -> None:
    assert set(report) == {"run_a", "run_b", "stages"}
    for stage in report["stages"]:
        assert {"stage", "change", "config_changed", "inputs_changed", "outputs_changed"} <= set(stage)
        assert stage["change"] in ("added", "removed", "unchanged", "changed")
        for flag in ("config_changed", "inputs_changed", "outputs_changed"):
            assert isinstance(stage[flag], bool)


def test_diff_params_changed_in_first_stage(ws):
    ws.linear()
    run_a = run_ok(ws)
    set_suffix(ws, "?")
    run_b = run_ok(ws)
    report = as_json(ws.cli("diff", run_a, run_b, "--json"))
    _check_diff_shape(report)
    assert (report["run_a"], report["run_b"]) == (run_a, run_b)
    stages = {s["stage"]: s for s in report["stages"]}
    assert [s["stage"] for s in report["stages"]] == ["make", "count", "report"]
    make, count, rep = stages["make"], stages["count"], stages["report"]
    assert make["change"] == "changed"
    assert make["config_changed"] is True
    assert make["inputs_changed"] is False
    assert make["outputs_changed"] is True
    assert count["config_changed"] is False
    assert count["inputs_changed"] is True
    assert count["changed_inputs"] == ["upstream.make.out"]
    assert count["outputs_changed"] is False  # still 3 files
    assert rep["config_changed"] is False and rep["inputs_changed"] is False
    assert rep["change"] == "unchanged"


def test_diff_folder_output_names_changed_files(ws):
    ws.linear()
    run_a = run_ok(ws)
    ws.write("data/f0.txt", "changed\n")
    ws.write("data/f9.txt", "new\n")
    (ws.root / "data" / "f2.txt").unlink()
    run_b = run_ok(ws)
    report = as_json(ws.cli("diff", run_a, run_b, "--json"))
    _check_diff_shape(report)
    make = next(s for s in report["stages"] if s["stage"] == "make")
    assert make["change"] == "changed"
    assert make["config_changed"] is False and make["inputs_changed"] is True
    assert make["changed_inputs"] == ["inputs.src"]
    (out,) = make["outputs"]
    assert out["output"] == "out" and out["change"] == "modified"
    assert out["files"] == [{"path": "f0.txt", "change": "modified"},
                            {"path": "f2.txt", "change": "removed"},
                            {"path": "f9.txt", "change": "added"}]
    text = ok(ws.cli("diff", run_a, run_b))
    assert "~ f0.txt" in text and "- f2.txt" in text and "+ f9.txt" in text


def test_diff_file_added_to_folder_output(ws):
    ws.linear()
    run_a = run_ok(ws)
    ws.write("data/f3.txt", "file 3\n")
    run_b = run_ok(ws)
    report = as_json(ws.cli("diff", run_a, run_b, "--json"))
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["make"]["outputs"][0]["files"] == [{"path": "f3.txt", "change": "added"}]
    # the count went from 3 to 4: every downstream stage changed its output
    assert stages["count"]["outputs_changed"] is True
    assert stages["report"]["outputs_changed"] is True
    assert stages["report"]["changed_inputs"] == ["upstream.count.n"]


def test_diff_of_identical_runs_is_unchanged(ws):
    ws.linear()
    run_a = run_ok(ws)
    run_b = run_ok(ws)
    report = as_json(ws.cli("diff", run_a, run_b, "--json"))
    _check_diff_shape(report)
    assert [s["change"] for s in report["stages"]] == ["unchanged"] * 3
    for stage in report["stages"]:
        assert not (stage["config_changed"] or stage["inputs_changed"] or stage["outputs_changed"])


def test_diff_with_added_stage(ws):
    ws.linear()
    run_a = run_ok(ws, "--stage", "count")
    run_b = run_ok(ws)
    report = as_json(ws.cli("diff", run_a, run_b, "--json"))
    _check_diff_shape(report)
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["report"]["change"] == "added"
    assert stages["make"]["change"] == "unchanged"
    reverse = as_json(ws.cli("diff", run_b, run_a, "--json"))
    assert {s["stage"]: s["change"] for s in reverse["stages"]}["report"] == "removed"


# --- show, runs, logs, contracts, schema ------------------------------------------------------

def test_show_stage_json_is_the_manifest(done):
    ws, run_id = done
    res = ws.cli("show", run_id, "make", "--json")
    manifest = as_json(res)
    on_disk = (ws.store / "runs" / run_id / "make.json").read_text()
    assert manifest == json.loads(on_disk)
    assert MANIFEST_FIELDS <= set(manifest)
    assert manifest["schema_version"] == 3
    assert manifest["stage"] == "make" and manifest["run_id"] == run_id
    assert manifest["pipeline"] == {"name": "linear", "version": "1"}
    assert manifest["status"] == "succeeded"
    for key in ("input_hash", "config_hash", "output_hash"):
        assert manifest[key].startswith("blake3:") and len(manifest[key]) == len("blake3:") + 64
    assert set(manifest["outputs"]) == {"out"}
    out = manifest["outputs"]["out"]
    assert set(out) == {"hash", "size", "kind"} and out["kind"] == "tree"
    assert set(manifest["inputs"]) == {"inputs.script", "inputs.src"}
    assert manifest["inputs"]["inputs.src"]["kind"] == "tree"
    assert manifest["cached_from"] is None
    assert manifest["attempts"] == 1 and len(manifest["logs"]) == 1
    assert manifest["logs"][0]["exit_code"] == 0
    assert manifest["failure"] is None
    assert manifest["started_at"] <= manifest["finished_at"]


def test_show_file_output_size_and_kind(done):
    ws, run_id = done
    manifest = as_json(ws.cli("show", run_id, "report", "--json"))
    text = manifest["outputs"]["text"]
    assert text["kind"] == "file" and text["size"] == len(b"files=3\n")
    assert set(manifest["inputs"]) == {"inputs.script", "upstream.count.n"}


def test_show_run_text_and_json(done):
    ws, run_id = done
    text = ok(ws.cli("show", run_id))
    assert run_id in text and "complete" in text
    for stage in ("make", "count", "report"):
        assert re.search(rf"^\s+{stage}\s+succeeded", text, re.M), text
    detail = as_json(ws.cli("show", run_id, "--json"))
    assert detail["run_id"] == run_id and detail["state"] == "complete"


def test_runs_json(done):
    ws, run_id = done
    runs = as_json(ws.cli("runs", "--json"))
    assert len(runs["runs"]) == 1
    (run,) = runs["runs"]
    assert run["run_id"] == run_id
    assert run["pipeline"] == "linear"
    assert run["state"] == "complete"
    assert run["stages"] == {"make": "succeeded", "count": "succeeded", "report": "succeeded"}
    assert run_id in ok(ws.cli("runs"))


def test_logs_show_the_stage_stdout(done):
    ws, run_id = done
    out = ok(ws.cli("logs", run_id, "make"))
    assert "made 3" in out
    attempts = as_json(ws.cli("logs", run_id, "make", "--json"))
    assert len(attempts) == 1
    assert attempts[0]["attempt"] == 1 and attempts[0]["exit_code"] == 0
    assert attempts[0]["stdout"] == "made 3\n"


def test_contracts_json(done):
    ws, _ = done
    report = as_json(ws.cli("contracts", "--json"))
    assert [c["stage"] for c in report["stages"]] == ["make", "count", "report"]
    for contract in report["stages"]:
        assert contract["manifest_path"] == f"runs/<run_id>/{contract['stage']}.json"
        assert isinstance(contract["entry_criteria"], list) and contract["entry_criteria"]
        assert isinstance(contract["exit_criteria"], list)
        assert any("exits with code 0" in line for line in contract["exit_criteria"])
    by_stage = {c["stage"]: c for c in report["stages"]}
    assert any("src" in line and "data" in line for line in by_stage["make"]["entry_criteria"])
    assert any("upstream stage make" in line for line in by_stage["count"]["entry_criteria"])
    assert any("output n" in line for line in by_stage["count"]["exit_criteria"])


def test_contracts_needs_no_store(ws):
    ws.linear()
    report = as_json(ws.cli("contracts", "--json"))
    assert len(report["stages"]) == 3
    assert not ws.store.exists()


def test_schema_out_writes_schema_files(ws, tmp_path):
    dest = tmp_path / "schemas"
    out = ok(ws.cli("schema", "--out", str(dest)))
    files = sorted(p.name for p in dest.iterdir())
    assert files and all(name.endswith(".schema.json") for name in files)
    assert "stage-manifest.schema.json" in files
    assert sorted(Path(line).name for line in out.splitlines()) == files
    for name in files:
        schema = json.loads((dest / name).read_text())
        assert "$schema" in schema and schema.get("title")
    manifest_schema = (dest / "stage-manifest.schema.json").read_text()
    for field in MANIFEST_FIELDS:
        assert f'"{field}"' in manifest_schema


def test_schema_prints_json(ws):
    merged = as_json(ws.cli("schema"))
    assert "stage-manifest.schema.json" in merged


# --- status --------------------------------------------------------------------------------------

def _status(ws: Workspace) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in ok(ws.cli("status")).splitlines():
        match = re.match(r"^\s+(\S+)\s+(up to date|would run)(.*)$", line)
        assert match, line
        rows[match.group(1)] = (match.group(2), match.group(3))
    return rows


def test_status_before_after_run_and_after_param_edit(ws):
    ws.linear()
    before = _status(ws)
    assert [verb for verb, _ in before.values()] == ["would run"] * 3
    assert "never run" in before["make"][1]
    assert not ws.store.exists(), "status stores nothing"

    run_id = run_ok(ws)
    after = _status(ws)
    assert list(after) == ["make", "count", "report"]
    assert all(verb == "up to date" for verb, _ in after.values()), after

    set_suffix(ws, "?")
    edited = _status(ws)
    assert all(verb == "would run" for verb, _ in edited.values()), edited
    assert "config" in edited["make"][1] and run_id in edited["make"][1]
    assert "make" in edited["count"][1]
    report = as_json(ws.cli("status", "--json"))
    assert [(s["stage"], s["would_execute"]) for s in report["stages"]] == [
        ("make", True), ("count", True), ("report", True)]
    assert "config" in report["stages"][0]["reason"]


def test_status_after_input_change_only_first_stage_reason_is_inputs(ws):
    ws.linear()
    run_ok(ws)
    ws.write("data/f0.txt", "other\n")
    rows = _status(ws)
    assert rows["make"][0] == "would run"
    assert "inputs" in rows["make"][1] and "inputs.src" in rows["make"][1]
    assert "config" not in rows["make"][1]


# --- checkout ------------------------------------------------------------------------------------

def test_checkout_writes_same_bytes(done, tmp_path):
    ws, run_id = done
    dest = tmp_path / "co"
    out = ok(ws.cli("checkout", run_id, "make", "--to", str(dest)))
    assert out.splitlines() == [str(dest / "out")]
    assert tree_bytes(dest / "out") == expected_make_out()
    assert sorted(p.name for p in dest.iterdir()) == ["out"]
    ok(ws.cli("checkout", run_id, "count", "--to", str(dest)))
    ok(ws.cli("checkout", run_id, "report", "--to", str(dest)))
    assert (dest / "n").read_bytes() == b"3"
    assert (dest / "text").read_bytes() == b"files=3\n"


@pytest.mark.parametrize("existing", ["folder", "file"])
def test_checkout_refuses_existing_target(done, tmp_path, existing):
    ws, run_id = done
    dest = tmp_path / "co"
    dest.mkdir()
    if existing == "folder":
        (dest / "out").mkdir()
        (dest / "out" / "mine.txt").write_text("keep me")
    else:
        (dest / "out").write_text("keep me")
    before = tree_bytes(dest)
    names_before = sorted(p.name for p in dest.rglob("*"))
    res = ws.cli("checkout", run_id, "make", "--to", str(dest))
    assert res.returncode != 0
    no_traceback(res)
    assert res.stderr.startswith("error: ") and "already exists" in res.stderr
    assert res.stdout == ""
    assert tree_bytes(dest) == before
    assert sorted(p.name for p in dest.rglob("*")) == names_before  # no temp left behind


def test_checkout_refusal_writes_nothing_for_multi_output_stage(ws, tmp_path):
    ws.pipeline(HEAD + f"""
[stages.two]
cmd = [{PY}, "-c", "import sys; open(sys.argv[1], 'w').write('A'); open(sys.argv[2], 'w').write('B')", "{{outputs.a}}", "{{outputs.b}}"]
outputs = ["a", "b"]
""")
    run_id = run_ok(ws)
    dest = tmp_path / "co"
    dest.mkdir()
    (dest / "b").write_text("keep me")
    res = ws.cli("checkout", run_id, "two", "--to", str(dest))
    assert res.returncode != 0 and res.stderr.startswith("error: ")
    assert (dest / "b").read_text() == "keep me"
    assert sorted(p.name for p in dest.iterdir()) == ["b"]


def test_checkout_multi_output_into_empty_folder(ws, tmp_path):
    ws.pipeline(HEAD + f"""
[stages.two]
cmd = [{PY}, "-c", "import sys; open(sys.argv[1], 'w').write('A'); open(sys.argv[2], 'w').write('B')", "{{outputs.a}}", "{{outputs.b}}"]
outputs = ["a", "b"]
""")
    run_id = run_ok(ws)
    dest = tmp_path / "co"
    ok(ws.cli("checkout", run_id, "two", "--to", str(dest)))
    assert tree_bytes(dest) == {"a": b"A", "b": b"B"}


# --- forget and gc -------------------------------------------------------------------------------

def test_forget_then_gc_removes_objects_and_verify_stays_clean(ws, tmp_path):
    ws.linear()
    run_a = run_ok(ws)
    set_suffix(ws, "?")
    run_b = run_ok(ws)

    nothing = as_json(ws.cli("gc", "--json"))
    assert nothing["objects_removed"] == 0, "gc must not remove objects a manifest references"

    assert ok(ws.cli("forget", run_a)).splitlines() == [f"forgot run {run_a}"]
    assert not (ws.store / "runs" / run_a).exists()

    dry = as_json(ws.cli("gc", "--dry-run", "--json"))
    assert dry["dry_run"] is True and dry["objects_removed"] > 0
    report = as_json(ws.cli("gc", "--json"))
    assert report["dry_run"] is False
    assert report["objects_removed"] > 0
    assert report["objects_removed"] == dry["objects_removed"] == len(report["removed"])
    assert report["bytes_removed"] > 0
    for digest in report["removed"]:
        hexdigest = digest.split(":", 1)[1]
        assert not (ws.store / "objects" / hexdigest[:2] / hexdigest[2:]).exists()

    verify = as_json(ws.cli("verify", "--json"))
    assert verify["ok"] is True and verify["problems"] == []
    assert [r["run_id"] for r in as_json(ws.cli("runs", "--json"))["runs"]] == [run_b]
    usage_error(ws.cli("show", run_a))
    # what run B references is intact
    ok(ws.cli("checkout", run_b, "make", "--to", str(tmp_path / "co")))
    assert tree_bytes(tmp_path / "co" / "out") == expected_make_out(suffix="?")
    assert as_json(ws.cli("gc", "--json"))["objects_removed"] == 0


def test_forget_unknown_run(done):
    ws, _ = done
    lines = usage_error(ws.cli("forget", "nope"))
    assert "'nope'" in lines[0]


# --- errors: unknown runs, no store --------------------------------------------------------------

@pytest.mark.parametrize("args", [
    pytest.param(("show", "nope"), id="show-run"),
    pytest.param(("show", "nope", "make"), id="show-stage"),
    pytest.param(("diff", "nope", "RUN"), id="diff-a"),
    pytest.param(("diff", "RUN", "nope"), id="diff-b"),
    pytest.param(("logs", "nope", "make"), id="logs"),
    pytest.param(("checkout", "nope", "make", "--to", "DEST"), id="checkout"),
])
def test_unknown_run_id(done, tmp_path, args):
    ws, run_id = done
    dest = tmp_path / "dest"
    args = [run_id if a == "RUN" else str(dest) if a == "DEST" else a for a in args]
    res = ws.cli(*args)
    lines = usage_error(res)
    assert "'nope'" in lines[0] and "not found" in lines[0]
    assert any(line.startswith("hint: ") for line in lines[1:]), res.stderr
    assert res.stdout == ""
    assert not dest.exists()


@pytest.mark.parametrize("args", [
    ("runs",), ("verify",), ("recover",), ("gc",), ("show", "r"), ("diff", "r1", "r2"),
    ("logs", "r", "s"), ("checkout", "r", "s", "--to", "out"), ("forget", "r"),
], ids=lambda a: a[0])
def test_commands_without_a_store(ws, args):
    ws.linear()
    res = ws.cli(*args)
    assert res.returncode != 0
    no_traceback(res)
    assert res.stderr.startswith(f"error: no stagestore store at {ws.store}"), res.stderr
    assert not ws.store.exists()
    assert not (ws.root / "out").exists()
