"""Exit codes and error messages of the real CLI (`ws.cli`): every user error exits 2 with one
`error:` line and one `hint:` line, or with `--json` one JSON object on stderr; no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import click
import pytest

from conftest import Workspace

HEAD = '[pipeline]\nname = "p"\n\n'


def user_error(res, *, code: int = 2) -> tuple[str, str]:
    """Exit `code`, stdout empty, stderr exactly an `error:` line then a `hint:` line (maybe
    with `  | ` detail lines between), no traceback; returns (error, hint) without labels."""
    where = f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.returncode == code, where
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr, where
    assert "Usage:" not in res.stderr, where
    lines = res.stderr.splitlines()
    assert lines and lines[0].startswith("error: "), where
    hints = [line for line in lines if line.startswith("hint: ")]
    assert len(hints) == 1 and lines[-1] == hints[0], where
    assert [line for line in lines if line.startswith("error: ")] == [lines[0]], where
    return lines[0][len("error: "):], hints[0][len("hint: "):]


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> tuple[Workspace, str]:
    """A linear workspace with one complete run; tests using it must not change its store."""
    root = tmp_path_factory.mktemp("done") / "ws"
    root.mkdir()
    ws = Workspace(root)
    ws.linear()
    res = ws.cli("run")
    assert res.returncode == 0, res.stderr
    return ws, res.stdout.strip()


# --- exit codes of user errors -------------------------------------------------------------------

def test_checkout_onto_an_existing_entry_is_a_usage_error(done, tmp_path):
    ws, run_id = done
    (tmp_path / "co").mkdir()
    (tmp_path / "co" / "out").write_text("keep me")
    error, hint = user_error(ws.cli("checkout", run_id, "make", "--to", str(tmp_path / "co")))
    assert "already exists" in error and str(tmp_path / "co" / "out") in error
    assert (tmp_path / "co" / "out").read_text() == "keep me"


@pytest.mark.parametrize("args", [
    ("runs",), ("verify",), ("recover",), ("gc",), ("show", "r"), ("doctor",), ("stats",),
    ("remote", "list"), ("push",),
], ids=" ".join)
def test_no_store_is_a_usage_error_naming_where_it_looked(ws, args):
    ws.linear()
    error, hint = user_error(ws.cli(*args))
    assert error == f"no stagestore store at {ws.store}"
    assert "--store DIR" in hint and "STAGESTORE_STORE" in hint and "run a pipeline" in hint
    assert not ws.store.exists()


def test_schema_out_onto_a_file_is_a_usage_error(ws):
    ws.write("taken", "x")
    error, hint = user_error(ws.cli("schema", "--out", "taken"))
    assert "taken" in error and "not a folder" in error
    assert "recover" not in hint and "--out" in hint


@pytest.mark.parametrize("args,command,words", [
    (("runs", "--bogus"), "runs", ["--bogus"]),
    (("show",), "show", ["RUN_ID"]),
    (("run", "--execution-mode", "fast"), "run", ["--execution-mode", "fast"]),
    (("remote", "add", "o"), "remote add", ["URL"]),
    (("nosuchcommand",), None, ["nosuchcommand"]),
], ids=["unknown-option", "missing-argument", "bad-choice", "subgroup", "unknown-command"])
def test_click_usage_errors_are_one_error_and_one_hint(ws, args, command, words):
    error, hint = user_error(ws.cli(*args))
    for word in words:
        assert word in error, error
    assert hint == (f"see `stagestore {command} --help`" if command else
                    "see `stagestore --help`")


@pytest.mark.parametrize("args", [(), ("remote",)], ids=["stagestore", "remote"])
def test_a_bare_group_prints_its_help_not_an_error(ws, args):
    res = ws.cli(*args)
    assert res.returncode in (0, 2), res.stderr  # click 8.2 exits 2, earlier versions 0
    out = res.stdout + res.stderr
    assert f"Usage: {' '.join(('stagestore', *args))} [OPTIONS] COMMAND" in out
    assert not any(line.startswith("error:") for line in out.splitlines()), out
    assert "Traceback" not in out


@pytest.mark.parametrize("args,option", [
    (("gc", "--timeout", "-5"), "--timeout"),
    (("gc", "--remote", "o", "--grace", "-1"), "--grace"),
    (("run", "--jobs", "0"), "--jobs"),
    (("run", "--systemic-min-items", "-1"), "--systemic-min-items"),
    (("run", "--systemic-threshold", "1.5"), "--systemic-threshold"),
    (("run", "--max-consecutive-failures", "0"), "--max-consecutive-failures"),
    (("recover", "--jobs", "0"), "--jobs"),
    (("verify", "--remote", "o", "--sample", "0"), "--sample"),
    (("verify", "--remote", "o", "--sample", "101"), "--sample"),
    (("push", "--jobs", "0"), "--jobs"),
    (("stats", "--last", "0"), "--last"),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_numeric_options_out_of_range_are_refused(ws, args, option):
    ws.linear()
    error, hint = user_error(ws.cli(*args))
    assert option in error, error
    assert not ws.store.exists()


# --- --json: one JSON object on stderr -----------------------------------------------------------

def _json_commands() -> list[tuple[str, ...]]:
    """Every command with `--json`, with a placeholder for each required argument."""
    from stagestore.cli import command_group

    cli = command_group()

    found = []

    def walk(group: click.Group, path: tuple[str, ...]) -> None:
        for name, command in sorted(group.commands.items()):
            if isinstance(command, click.Group):
                walk(command, (*path, name))
            elif any(p.name == "as_json" for p in command.params):
                args = [f"x{i}" for i, p in enumerate(command.params)
                        if isinstance(p, click.Argument) and p.required]
                found.append((*path, name, *args))

    walk(cli, ())
    return found


JSON_COMMANDS = _json_commands()


def json_error(res, *, code: int) -> dict:
    where = f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.returncode == code, where
    assert res.stdout == "", where
    obj = json.loads(res.stderr)  # exactly one JSON document, nothing else
    assert isinstance(obj, dict), where
    assert set(obj) == {"error", "hint", "exit_code"}, where
    assert obj["exit_code"] == code and obj["error"] and obj["hint"], where
    return obj


def test_json_commands_are_found():
    names = {" ".join(c[:2]) if c[0] == "remote" else c[0] for c in JSON_COMMANDS}
    assert {"run", "verify", "gc", "show", "runs", "check", "remote list", "push"} <= names


@pytest.mark.parametrize("args", JSON_COMMANDS, ids=" ".join)
def test_every_json_command_reports_an_error_as_one_json_object(ws, args):
    # No pipeline file and no store: each command fails before doing anything.
    obj = json_error(ws.cli(*args, "--json"), code=2)
    assert obj["error"].startswith(("no stagestore store at", "pipeline file")), obj


@pytest.mark.parametrize("args", [("runs", "--json", "--bogus"), ("gc", "--json", "--timeout", "-5")],
                         ids=["unknown-option", "negative-timeout"])
def test_json_usage_errors_are_json_too(ws, args):
    obj = json_error(ws.cli(*args), code=2)
    assert obj["hint"].startswith(f"see `stagestore {args[0]} --help`")


# --- remote add without credentials --------------------------------------------------------------

class _Forbidden(BaseHTTPRequestHandler):
    """A stand-in for the instance metadata service: counts requests, refuses each."""

    requests: list[str] = []

    def _refuse(self) -> None:
        type(self).requests.append(f"{self.command} {self.path}")
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_PUT = _refuse

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


@pytest.fixture
def metadata_service():
    _Forbidden.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, _Forbidden.requests
    finally:
        server.shutdown()
        server.server_close()


def _no_aws_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and k not in ("STAGESTORE_STORE",
                                                      "STAGESTORE_S3_INSTANCE_CREDENTIALS")}
    env["HOME"] = str(home)
    env.update(extra)
    return env


def _remote_add(ws: Workspace, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stagestore", "remote", "add", "o", "s3://bucket/p",
                           "--endpoint", "http://127.0.0.1:9"], cwd=ws.root, env=env,
                          capture_output=True, text=True, timeout=60)


def test_remote_add_without_credentials_says_so_and_never_asks_the_metadata_service(
        ws, tmp_path, metadata_service):
    server, requests = metadata_service
    home = tmp_path / "home"
    home.mkdir()
    env = _no_aws_env(home, AWS_METADATA_ENDPOINT=f"http://127.0.0.1:{server.server_port}")
    error, hint = user_error(_remote_add(ws, env))
    assert error.startswith("no AWS credentials found for s3://bucket/p"), error
    assert "AWS_ACCESS_KEY_ID" in error and str(home / ".aws" / "credentials") in error
    assert "169.254" not in error + hint
    assert "AWS_PROFILE" in hint and "STAGESTORE_S3_INSTANCE_CREDENTIALS" in hint
    assert requests == [], "the instance metadata service must not be contacted"


def test_instance_credentials_only_when_asked_for(ws, tmp_path, metadata_service):
    # The control of the test above: once opted in, the stand-in service is asked.
    server, requests = metadata_service
    home = tmp_path / "home"
    home.mkdir()
    env = _no_aws_env(home, AWS_METADATA_ENDPOINT=f"http://127.0.0.1:{server.server_port}",
                      STAGESTORE_S3_INSTANCE_CREDENTIALS="1")
    res = _remote_add(ws, env)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert requests, "opted in: the metadata service is where credentials come from"


def test_a_profile_without_keys_is_no_credentials(ws, tmp_path, metadata_service):
    server, requests = metadata_service
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text("[default]\nregion = eu-west-1\n")
    env = _no_aws_env(home, AWS_METADATA_ENDPOINT=f"http://127.0.0.1:{server.server_port}")
    error, hint = user_error(_remote_add(ws, env))
    assert "no AWS credentials" in error and "profile 'default'" in error
    assert requests == []


# --- durations and plurals -----------------------------------------------------------------------

def test_a_stage_failing_before_it_starts_shows_no_negative_duration(ws, tmp_path):
    """On a terminal, progress lines show durations; an item whose input is missing fails
    before its stage starts, and its line said `FAILED after -0.00s`."""
    import pty

    ws.write("data/a.txt", "a\n")
    ws.write("items.txt", "a\nb\n")
    ws.pipeline(HEAD + '[stages.s]\ncmd = "cp {inputs.src} {outputs.o}"\n'
                       'inputs = { src = "data/{item}.txt" }\noutputs = ["o"]\n')
    leader, follower = pty.openpty()
    try:
        res = subprocess.run([sys.executable, "-m", "stagestore", "run", "--items", "items.txt"],
                             cwd=ws.root, stdout=subprocess.PIPE, stderr=follower, text=True,
                             timeout=120)
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    shown = b"".join(chunks).decode()
    assert res.returncode == 1, shown
    assert "FAILED" in shown and "InputMissingFailure" in shown, shown
    assert "-0.00s" not in shown and "after -" not in shown, shown


def test_counts_of_one_are_singular(ws):
    ws.linear()
    res = ws.cli("run")
    assert res.returncode == 0, res.stderr
    ok = ws.cli("verify")
    assert ok.returncode == 0 and "in 1 run checked" in ok.stdout, ok.stdout
    manifest = json.loads(next((ws.store / "runs").glob("*/count.json")).read_text())
    digest = manifest["outputs"]["n"]["hash"].split(":", 1)[1]
    path = ws.store / "objects" / digest[:2] / digest[2:]
    os.chmod(path, 0o644)
    path.write_bytes(b"42")
    bad = ws.cli("verify")
    assert bad.returncode == 1
    assert "FAILED: 1 problem;" in bad.stdout and "in 1 run checked" in bad.stdout, bad.stdout


# --- pipeline errors: where, and what to do ------------------------------------------------------

def test_toml_syntax_error_is_reported_by_line_and_column_only(ws):
    ws.pipeline('[pipeline]\nname = "p"\n[stages.a]\noutputs = ["o",\ncmd = "true"\n')
    error, hint = user_error(ws.cli("check"))
    assert error.startswith("stagestore.toml:4:11: invalid TOML: "), error
    assert "$." not in error and "outputs" not in error, error
    assert "line 5" in error  # where the parser gave up, as detail


def test_toml_syntax_error_without_an_open_bracket(ws):
    ws.pipeline('[pipeline]\nname = "p"\n[stages.a]\ncmd = "true"\nretries = = 1\n')
    error, hint = user_error(ws.cli("check"))
    assert error.startswith("stagestore.toml:5:11: invalid TOML: "), error
    assert "$." not in error and "(at line" not in error, error


def test_dependency_cycle_names_the_cycle_and_how_to_break_it(ws):
    ws.pipeline(HEAD + '[stages.a]\ncmd = "true"\nupstream = ["b"]\n'
                       '[stages.b]\ncmd = "true"\nupstream = ["a"]\n')
    error, hint = user_error(ws.cli("check"))
    assert "dependency cycle: a -> b -> a" in error
    assert "upstream" in hint and "remove" in hint


def test_unknown_placeholder_lists_the_valid_ones(ws):
    ws.pipeline(HEAD + '[stages.a]\ncmd = "echo {env.HOME}"\n')
    error, hint = user_error(ws.cli("check"))
    assert "unknown placeholder {env.HOME}" in error
    for valid in ("{inputs.NAME}", "{upstream.STAGE.NAME}", "{outputs.NAME}", "{params.KEY}",
                  "{run_id}", "{item}"):
        assert valid in hint, hint


def test_missing_input_names_the_path_and_what_to_do(ws):
    ws.write("sub/stagestore.toml", HEAD + '[stages.a]\ncmd = "cat {inputs.x}"\n'
                                           'inputs = { x = "data/gone.csv" }\n')
    error, hint = user_error(ws.cli("check", "-p", "sub/stagestore.toml"))
    assert "data/gone.csv" in error and str(ws.root / "sub") in error
    assert "create" in hint and "inputs" in hint


# --- the exit codes, named once --------------------------------------------------------------------

def test_exit_codes_are_named_once():
    from stagestore import errors
    from stagestore.cli.commands import RUN_EXIT_CODES

    codes = {code.name: int(code) for code in errors.ExitCode}
    assert codes == {"OK": 0, "FAILED": 1, "USAGE": 2, "SYSTEMIC": 3, "DEGRADED": 4,
                     "INTERNAL": 70, "SIGHUP": 129, "SIGINT": 130, "SIGTERM": 143}
    assert errors.EXIT_USAGE is errors.ExitCode.USAGE  # the old names still work
    assert set(RUN_EXIT_CODES.values()) <= set(errors.ExitCode)
    for cls in _error_classes():
        assert isinstance(cls.exit_code, errors.ExitCode), cls
        assert cls.__doc__ and cls.__doc__.strip(), cls


def _error_classes() -> list[type]:
    from stagestore.cli.errordoc import error_classes

    return error_classes()
