"""Loading and validating `stagestore.toml` through `load_pipeline`.

Pinned contract: every invalid pipeline is refused before anything runs with ONE
`PipelineError` whose message names the file, the stage and the key, ending with
"- at `$.stages.<stage>.<key>`".
"""

from __future__ import annotations

import os
import re

import pytest

from stagestore.errors import EXIT_USAGE, PipelineError, StageNotFoundError, StagestoreError
from stagestore.pipeline.model import load_pipeline
from stagestore.pipeline.syntax import Placeholder, command_template, placeholders, render

HEAD = '[pipeline]\nname = "p"\nversion = "3"\n\n'


def _load_error(ws, body: str, *, head: str = HEAD) -> PipelineError:
    """Write `head + body` as stagestore.toml, load it, and return the PipelineError raised."""
    ws.write("stagestore.toml", head + body)
    with pytest.raises(PipelineError) as info:
        load_pipeline(ws.pipeline_file)
    return info.value


def _assert_points_at(exc: PipelineError, stage: str, key: str) -> None:
    message = exc.message
    assert "stagestore.toml" in message, message
    assert message.endswith(f"- at `$.stages.{stage}.{key}`"), message
    # ONE message: a single line, not a list of problems.
    assert "\n" not in message, message


# --- errors every stage-level check must report, with file, stage and key --------------------

# (id, pipeline body after [pipeline], stage, key, words the message must contain)
STAGE_ERRORS = [
    # dependency cycles
    ("cycle-two", '[stages.a]\ncmd = "true"\nupstream = ["b"]\n\n'
                  '[stages.b]\ncmd = "true"\nupstream = ["a"]\n',
     "a", "upstream", ["cycle", "a -> b -> a"]),
    ("cycle-three", '[stages.x]\ncmd = "true"\nupstream = ["z"]\n\n'
                    '[stages.y]\ncmd = "true"\nupstream = ["x"]\n\n'
                    '[stages.z]\ncmd = "true"\nupstream = ["y"]\n',
     None, "upstream", ["cycle"]),
    ("self-upstream", '[stages.a]\ncmd = "true"\nupstream = ["a"]\n', "a", "upstream", ["own upstream"]),
    # unknown upstream stages
    ("unknown-upstream", '[stages.a]\ncmd = "true"\n\n[stages.b]\ncmd = "true"\nupstream = ["zz"]\n',
     "b", "upstream", ["'zz'", "a, b"]),
    ("upstream-twice", '[stages.a]\ncmd = "true"\n\n[stages.b]\ncmd = "true"\nupstream = ["a", "a"]\n',
     "b", "upstream", ["twice"]),
    # placeholders naming anything undeclared
    ("ph-input", '[stages.a]\ncmd = "cat {inputs.x}"\n', "a", "cmd", ["{inputs.x}", "undeclared input"]),
    ("ph-input-list", '[stages.a]\ncmd = ["cat", "{inputs.x}"]\n', "a", "cmd", ["{inputs.x}"]),
    ("ph-input-shell", '[stages.a]\ncmd = "cat {inputs.x} | wc"\nshell = true\n', "a", "cmd",
     ["{inputs.x}"]),
    ("ph-output", '[stages.a]\ncmd = "touch {outputs.y}"\noutputs = ["o"]\n', "a", "cmd",
     ["{outputs.y}", "undeclared output", "o"]),
    ("ph-param", '[stages.a]\ncmd = "echo {params.k}"\nparams = { j = 1 }\n', "a", "cmd",
     ["{params.k}", "undeclared param", "j"]),
    ("ph-upstream-not-listed",
     '[stages.a]\ncmd = "true"\noutputs = ["o"]\n\n[stages.b]\ncmd = "cat {upstream.a.o}"\n',
     "b", "cmd", ["{upstream.a.o}", "upstream"]),
    ("ph-upstream-unknown-stage",
     '[stages.a]\ncmd = "true"\noutputs = ["o"]\n\n[stages.b]\ncmd = "cat {upstream.q.o}"\n'
     'upstream = ["a"]\n',
     "b", "cmd", ["{upstream.q.o}"]),
    ("ph-upstream-unknown-output",
     '[stages.a]\ncmd = "true"\noutputs = ["o"]\n\n[stages.b]\ncmd = "cat {upstream.a.nope}"\n'
     'upstream = ["a"]\n',
     "b", "cmd", ["{upstream.a.nope}", "does not declare", "o"]),
    ("ph-kind-unknown", '[stages.a]\ncmd = "echo {foo.x}"\n', "a", "cmd", ["unknown placeholder {foo.x}"]),
    ("ph-kind-bare", '[stages.a]\ncmd = "echo {nope}"\n', "a", "cmd", ["unknown placeholder {nope}"]),
    ("ph-kind-empty", '[stages.a]\ncmd = "echo {}"\n', "a", "cmd", ["unknown placeholder {}"]),
    ("ph-upstream-two-parts",
     '[stages.a]\ncmd = "true"\noutputs = ["o"]\n\n[stages.b]\ncmd = "cat {upstream.a}"\n'
     'upstream = ["a"]\n',
     "b", "cmd", ["unknown placeholder {upstream.a}"]),
    ("ph-inputs-no-name", '[stages.a]\ncmd = "cat {inputs.}"\n', "a", "cmd", ["unknown placeholder"]),
    ("ph-unbalanced-open", '[stages.a]\ncmd = "echo {"\n', "a", "cmd", ["unbalanced brace"]),
    ("ph-unbalanced-close", '[stages.a]\ncmd = "echo }"\n', "a", "cmd", ["unbalanced brace"]),
    ("ph-escaped-then-undeclared", '[stages.a]\ncmd = "echo {{{inputs.x}}}"\n', "a", "cmd",
     ["{inputs.x}"]),
    # output / input names that are not plain names
    ("output-empty", '[stages.a]\ncmd = "true"\noutputs = [""]\n', "a", "outputs", ["output name ''"]),
    ("output-slash", '[stages.a]\ncmd = "true"\noutputs = ["x/y"]\n', "a", "outputs", ["'x/y'"]),
    ("output-dotdot", '[stages.a]\ncmd = "true"\noutputs = [".."]\n', "a", "outputs", ["'..'"]),
    ("output-dotdot-path", '[stages.a]\ncmd = "true"\noutputs = ["../up"]\n', "a", "outputs", ["'../up'"]),
    ("output-dot", '[stages.a]\ncmd = "true"\noutputs = ["."]\n', "a", "outputs", ["'.'"]),
    ("output-twice", '[stages.a]\ncmd = "true"\noutputs = ["o", "o"]\n', "a", "outputs", ["twice"]),
    ("input-empty", '[stages.a]\ncmd = "true"\ninputs = { "" = "data" }\n', "a", "inputs",
     ["input name ''"]),
    ("input-slash", '[stages.a]\ncmd = "true"\ninputs = { "x/y" = "data" }\n', "a", "inputs", ["'x/y'"]),
    ("input-dotdot", '[stages.a]\ncmd = "true"\ninputs = { ".." = "data" }\n', "a", "inputs", ["'..'"]),
    ("input-empty-path", '[stages.a]\ncmd = "true"\ninputs = { x = "" }\n', "a", "inputs", ["empty path"]),
    # missing input paths
    ("input-missing-file", '[stages.a]\ncmd = "true"\ninputs = { x = "nope.txt" }\n', "a", "inputs",
     ["'x'", "nope.txt", "does not exist"]),
    ("input-missing-nested", '[stages.a]\ncmd = "true"\ninputs = { x = "data/missing/deep.txt" }\n',
     "a", "inputs", ["data/missing/deep.txt", "does not exist"]),
    # other keys with values out of range
    ("call-malformed", '[stages.a]\ncall = "not a call"\n', "a", "call", ["module:function"]),
    ("call-with-shell", '[stages.a]\ncall = "mod:fn"\nshell = true\n', "a", "shell", ["`shell`"]),
    ("shell-with-list", '[stages.a]\ncmd = ["echo", "x"]\nshell = true\n', "a", "shell", ["string"]),
    ("cmd-empty-string", '[stages.a]\ncmd = ""\n', "a", "cmd", ["empty"]),
    ("cmd-empty-list", '[stages.a]\ncmd = []\n', "a", "cmd", ["empty"]),
    ("cmd-unsplittable", '[stages.a]\ncmd = "echo \'unterminated"\n', "a", "cmd", ["split"]),
    ("env-bad-name", '[stages.a]\ncmd = "true"\nenv = { "1BAD" = "x" }\n', "a", "env", ["'1BAD'"]),
    ("timeout-zero", '[stages.a]\ncmd = "true"\ntimeout = 0\n', "a", "timeout", ["positive"]),
    ("retries-negative", '[stages.a]\ncmd = "true"\nretries = -1\n', "a", "retries", ["0 or more"]),
    ("retry-delay-negative", '[stages.a]\ncmd = "true"\nretry_delay = -0.5\n', "a", "retry_delay",
     ["0 or more"]),
    ("allow-empty-unknown", '[stages.a]\ncmd = "true"\nallow_empty = ["zz"]\n', "a", "allow_empty",
     ["'zz'"]),
]


@pytest.mark.parametrize("body,stage,key,words", [pytest.param(*case[1:], id=case[0])
                                                  for case in STAGE_ERRORS])
def test_stage_error_names_file_stage_and_key(ws, body, stage, key, words):
    ws.write("data/f.txt", "x\n")
    exc = _load_error(ws, body)
    if stage is None:  # a cycle may be reported from any of its stages
        match = re.search(r"- at `\$\.stages\.(\w+)\.upstream`$", exc.message)
        assert match and match.group(1) in ("x", "y", "z"), exc.message
        stage = match.group(1)
    _assert_points_at(exc, stage, key)
    for word in words:
        assert word in exc.message, (word, exc.message)
    assert exc.stage == stage
    assert exc.key == key
    assert exc.path is not None and exc.path.endswith("stagestore.toml")
    assert exc.exit_code == EXIT_USAGE == 2


def test_error_in_a_later_stage_names_that_stage(ws):
    exc = _load_error(ws, '[stages.first]\ncmd = "true"\noutputs = ["o"]\n\n'
                          '[stages.second]\nupstream = ["first"]\ncmd = "cat {upstream.first.x}"\n')
    _assert_points_at(exc, "second", "cmd")
    assert "first" in exc.message


def test_cycle_message_is_reported_once_with_file_name(ws):
    exc = _load_error(ws, '[stages.a]\ncmd = "true"\nupstream = ["b"]\n\n'
                          '[stages.b]\ncmd = "true"\nupstream = ["a"]\n')
    # the file name is named once, not repeated by a re-wrapped message
    assert exc.message.count("stagestore.toml") == 1, exc.message


def test_input_that_is_neither_file_nor_folder(ws):
    os.mkfifo(ws.root / "fifo")
    exc = _load_error(ws, '[stages.a]\ncmd = "true"\ninputs = { x = "fifo" }\n')
    _assert_points_at(exc, "a", "inputs")
    assert "neither a file nor a folder" in exc.message


def test_missing_inputs_not_checked_when_asked(ws):
    ws.write("stagestore.toml", HEAD + '[stages.a]\ncmd = "cat {inputs.x}"\ninputs = { x = "nope" }\n')
    pipeline = load_pipeline(ws.pipeline_file, check_inputs=False)
    assert pipeline.stages["a"].inputs == {"x": "nope"}
    with pytest.raises(PipelineError):
        load_pipeline(ws.pipeline_file)


def test_stage_name_that_is_not_a_plain_name(ws):
    exc = _load_error(ws, '[stages."a/b"]\ncmd = "true"\n')
    assert "stagestore.toml" in exc.message
    assert "'a/b'" in exc.message
    assert exc.message.endswith("- at `$.stages.a/b`")


# --- cmd/call: exactly one ------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    pytest.param('[stages.a]\ncmd = "true"\ncall = "mod:fn"\n', id="both"),
    pytest.param('[stages.a]\noutputs = ["o"]\n', id="neither"),
])
def test_cmd_and_call_exactly_one_names_the_key(ws, body):
    exc = _load_error(ws, body)
    assert "stagestore.toml" in exc.message
    assert re.search(r"- at `\$\.stages\.a\.(cmd|call)`$", exc.message), exc.message


@pytest.mark.parametrize("body", [
    pytest.param('[stages.a]\ncmd = "true"\ncall = "mod:fn"\n', id="both"),
    pytest.param('[stages.a]\noutputs = ["o"]\n', id="neither"),
])
def test_cmd_and_call_exactly_one_is_refused(ws, body):
    exc = _load_error(ws, body)
    assert "stagestore.toml" in exc.message
    assert "exactly one of `cmd`, `call` or `kind`" in exc.message
    assert "$.stages.a" in exc.message
    assert exc.stage == "a"


# --- decode errors: unknown keys, wrong types, TOML syntax ------------------------------------

DECODE_ERRORS = [
    ("unknown-key", '[stages.build]\ncmd = "true"\nbogus = 1\n', "build", "bogus"),
    ("unknown-key-typo", '[stages.build]\ncmd = "true"\ntimeot = 3\n', "build", "timeot"),
    ("unknown-key-second-stage", '[stages.a]\ncmd = "true"\n\n[stages.build]\ncmd = "true"\n'
                                 'outptus = ["o"]\n', "build", "outptus"),
    ("wrong-type-outputs", '[stages.build]\ncmd = "true"\noutputs = "o"\n', "build", "outputs"),
    ("wrong-type-retries", '[stages.build]\ncmd = "true"\nretries = "3"\n', "build", "retries"),
    ("wrong-type-params", '[stages.build]\ncmd = "true"\nparams = 3\n', "build", "params"),
    ("wrong-type-cmd", '[stages.build]\ncmd = 3\n', "build", "cmd"),
    ("wrong-type-upstream", '[stages.build]\ncmd = "true"\nupstream = "a"\n', "build", "upstream"),
    ("wrong-type-inputs", '[stages.build]\ncmd = "true"\ninputs = ["x"]\n', "build", "inputs"),
    ("wrong-type-shell", '[stages.build]\ncmd = "true"\nshell = "yes"\n', "build", "shell"),
]


@pytest.mark.parametrize("body,stage,key", [pytest.param(*c[1:], id=c[0]) for c in DECODE_ERRORS])
def test_decode_error_is_a_pipeline_error_naming_file_and_key(ws, body, stage, key):
    exc = _load_error(ws, body)
    assert "stagestore.toml" in exc.message
    assert key in exc.message
    assert "\n" not in exc.message
    assert exc.exit_code == 2


@pytest.mark.parametrize("body,stage,key", [pytest.param(*c[1:], id=c[0]) for c in DECODE_ERRORS])
def test_decode_error_names_the_stage(ws, body, stage, key):
    exc = _load_error(ws, body)
    _assert_points_at(exc, stage, key)


def test_toml_syntax_error_names_file_and_line(ws):
    exc = _load_error(ws, '[stages.build]\ncmd = "true"\nretries = \n')
    assert "stagestore.toml" in exc.message
    assert "invalid TOML" in exc.message
    assert "stagestore.toml:7:" in exc.message, exc.message  # 4 header lines, then line 3
    assert exc.exit_code == 2


def test_toml_syntax_error_in_table_header(ws):
    exc = _load_error(ws, '[stages.build\ncmd = "true"\n')
    assert "stagestore.toml" in exc.message
    assert "invalid TOML" in exc.message
    assert "stagestore.toml:5:" in exc.message, exc.message


def test_toml_syntax_error_names_a_position_not_a_key(ws):
    # A key guessed from the lines around a syntax error is often the wrong one.
    exc = _load_error(ws, '[stages.build]\ncmd = "true"\nretries = \n')
    assert "$." not in exc.message and "retries" not in exc.message, exc.message


def test_unknown_key_in_pipeline_table(ws):
    exc = _load_error(ws, '[stages.a]\ncmd = "true"\n',
                      head='[pipeline]\nname = "p"\nbogus = 1\n\n')
    assert "stagestore.toml" in exc.message
    assert "bogus" in exc.message
    assert "$.pipeline" in exc.message


def test_unknown_top_level_table(ws):
    exc = _load_error(ws, '[stages.a]\ncmd = "true"\n', head='[pipeline]\nname = "p"\n[extra]\nx = 1\n')
    assert "stagestore.toml" in exc.message
    assert "extra" in exc.message


def test_missing_pipeline_table(ws):
    exc = _load_error(ws, '[stages.a]\ncmd = "true"\n', head="")
    assert "stagestore.toml" in exc.message
    assert "pipeline" in exc.message


def test_empty_pipeline_name(ws):
    exc = _load_error(ws, '[stages.a]\ncmd = "true"\n', head='[pipeline]\nname = "  "\n')
    assert exc.message.endswith("- at `$.pipeline.name`")


def test_pipeline_without_stages(ws):
    exc = _load_error(ws, "")
    assert "stagestore.toml" in exc.message
    assert "no stages" in exc.message


def test_missing_pipeline_file(ws):
    with pytest.raises(PipelineError) as info:
        load_pipeline(ws.root / "nothere.toml")
    exc = info.value
    assert "nothere.toml" in exc.message
    assert "not found" in exc.message
    assert exc.hint and "path" in exc.hint and "-p" not in exc.hint  # the CLI adds `-p FILE`
    assert exc.exit_code == 2


def test_pipeline_file_is_a_folder(ws):
    (ws.root / "dir.toml").mkdir()
    with pytest.raises(PipelineError) as info:
        load_pipeline(ws.root / "dir.toml")
    assert "dir.toml" in info.value.message


def test_every_validation_error_is_a_stagestore_error(ws):
    # The CLI prints StagestoreErrors as `error: ...`; anything else would be an internal error.
    exc = _load_error(ws, '[stages.a]\ncmd = 3\n')
    assert isinstance(exc, StagestoreError)


# --- valid pipelines ---------------------------------------------------------------------------

def test_linear_pipeline_loads(ws):
    ws.linear()
    pipeline = load_pipeline(ws.pipeline_file)
    assert pipeline.name == "linear"
    assert pipeline.version == "1"
    assert pipeline.order() == ["make", "count", "report"]
    assert pipeline.stages["make"].params == {"suffix": "!"}
    assert pipeline.stages["make"].inputs == {"script": "steps/make.py", "src": "data"}
    assert pipeline.path == ws.pipeline_file
    assert pipeline.workdir == ws.root


def test_default_pipeline_file_is_in_cwd(ws, monkeypatch):
    ws.linear()
    monkeypatch.chdir(ws.root)
    assert load_pipeline().name == "linear"


@pytest.mark.parametrize("cmd", [
    pytest.param('"echo {{literal}}"', id="string"),
    pytest.param('["echo", "{{", "}}", "{{inputs.undeclared}}"]', id="list-escaped-placeholder"),
    pytest.param('"echo {{x}} | tr -d x"\nshell = true', id="shell"),
    pytest.param('"echo {{{{double}}}}"', id="doubled"),
])
def test_escaped_braces_are_literal_and_valid(ws, cmd):
    ws.write("stagestore.toml", HEAD + f"[stages.a]\ncmd = {cmd}\n")
    pipeline = load_pipeline(ws.pipeline_file)
    assert "a" in pipeline.stages


def test_every_placeholder_kind_is_accepted_when_declared(ws):
    ws.write("in.txt", "x")
    ws.write("stagestore.toml", HEAD + """
[stages.up]
cmd = "touch {outputs.o}"
outputs = ["o"]

[stages.down]
upstream = ["up"]
cmd = ["tool", "{inputs.x}", "{upstream.up.o}", "{outputs.r}", "{params.k}", "{run_id}"]
inputs = { x = "in.txt" }
outputs = ["r"]
params = { k = 1 }
""")
    pipeline = load_pipeline(ws.pipeline_file)
    assert pipeline.order() == ["up", "down"]
    refs = [p for arg in command_template(pipeline.stages["down"]) for p in placeholders(arg)]
    assert refs == [Placeholder("inputs", "x"), Placeholder("upstream", "o", "up"),
                    Placeholder("outputs", "r"), Placeholder("params", "k"), Placeholder("run_id")]


def test_call_stage_is_valid(ws):
    ws.write("stagestore.toml", HEAD + '[stages.a]\ncall = "pkg.mod:func"\noutputs = ["o"]\n')
    assert load_pipeline(ws.pipeline_file).stages["a"].call == "pkg.mod:func"


def test_folder_input_is_valid(ws):
    ws.write("data/one.txt", "1")
    ws.write("stagestore.toml", HEAD + '[stages.a]\ncmd = "ls {inputs.d}"\ninputs = { d = "data" }\n')
    assert load_pipeline(ws.pipeline_file).stages["a"].inputs == {"d": "data"}


def test_order_keeps_file_order_for_ties(ws):
    ws.write("stagestore.toml", HEAD + """
[stages.zeta]
cmd = "true"
[stages.alpha]
cmd = "true"
upstream = ["zeta"]
[stages.mid]
cmd = "true"
""")
    assert load_pipeline(ws.pipeline_file).order() == ["zeta", "mid", "alpha"]


# --- placeholder parsing and rendering ---------------------------------------------------------

def test_render_turns_doubled_braces_into_literal_braces():
    out = render("{{x}} {inputs.a} }}{{", lambda p: f"<{p.kind}:{p.name}>")
    assert out == "{x} <inputs:a> }{"


def test_render_escaped_placeholder_is_not_substituted():
    calls = []
    out = render("{{inputs.a}}", lambda p: calls.append(p) or "X")
    assert out == "{inputs.a}"
    assert calls == []


def test_placeholders_skips_escaped_braces():
    assert placeholders("{{outputs.x}}") == []
    assert placeholders("{{{outputs.x}}}") == [Placeholder("outputs", "x")]


def test_placeholder_text_round_trips():
    for text in ("{inputs.a}", "{outputs.b}", "{params.c}", "{upstream.s.n}", "{run_id}"):
        (ref,) = placeholders(text)
        assert ref.text == text


# --- stage selection ----------------------------------------------------------------------------

def test_closure_adds_upstream_stages(ws):
    ws.linear()
    pipeline = load_pipeline(ws.pipeline_file)
    assert pipeline.closure(["count"]) == ["make", "count"]
    assert pipeline.closure(["make"]) == ["make"]
    assert pipeline.closure(["report", "make"]) == ["make", "count", "report"]


def test_unknown_stage_lists_valid_stages(ws):
    ws.linear()
    pipeline = load_pipeline(ws.pipeline_file)
    with pytest.raises(StageNotFoundError) as info:
        pipeline.closure(["nosuch"])
    assert "nosuch" in info.value.message
    assert "make, count, report" in info.value.message
    assert info.value.exit_code == 2
