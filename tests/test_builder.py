"""Building a pipeline in Python (`Pipeline("docs").stage(...)`), and its TOML round trip.

Pinned contract: the builder makes the same model as a `stagestore.toml` file, checked the same
way, and `Pipeline.from_toml(p.to_toml()) == p` for every stage key.
"""

from __future__ import annotations

import datetime as dt
import math
import sys
import tomllib
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import stagestore
from stagestore import Pipeline, load_pipeline
from stagestore.errors import PipelineError
from stagestore.pipeline.model import _decode
from stagestore.model.records import ClassifyRule, StageSpec
from stagestore.store.store import Store
from stagestore.pipeline.tomlwrite import TomlValueError, section, value

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "docs-pipeline" / "stagestore.toml"

# Text with quotes, backslashes, every control character, non-ASCII and astral characters.
AWKWARD = ('say "hi" \\ C:\\path\\ \n\t\r\b\f' + "".join(map(chr, range(0x20)))
           + "\x7f é 日本 🎉")

# A stage setting every key of `[stages.NAME]` to something other than its default.
EVERY_KEY = {
    "cmd": ["tool", "--in", "{inputs.src}", AWKWARD],
    "call": "pkg.mod:go",
    "shell": True,
    "inputs": {"src": "data/src", "other.file": "a b/c.txt"},
    "upstream": ["first"],
    "outputs": ["out", "log"],
    "params": {"n": -7, "big": 2**63 - 1, "ratio": 0.1, "tiny": 5e-324, "huge": 1e300,
               "inf": math.inf, "flag": False, "text": AWKWARD, "empty": {}, "none": [],
               "nested": {"a b": [1, [2.5, "x"], {"deep": {"er": True}}], "": "empty key"},
               "day": dt.date(2024, 2, 29), "at": dt.time(7, 32, 0, 999),
               "local": dt.datetime(1979, 5, 27, 7, 32),
               "utc": dt.datetime(1979, 5, 27, 7, 32, tzinfo=dt.timezone.utc),
               "east": dt.datetime(1979, 5, 27,
                                   tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30)))},
    "env": {"LANG": "C.UTF-8", "QUOTED": '"x"'},
    "timeout": 2.5,
    "retries": 3,
    "retry_delay": 0.0,
    "allow_empty": ["src"],
    "description": AWKWARD,
    "domain": "infrastructure",
    "classify": [{"match": r'^E\d+ "x"$', "exit_code": 3, "class": "FlakyFailure",
                  "category": "retryable"},
                 ClassifyRule(exit_code=137, class_="KilledFailure", category="recoverable")],
    "checks": [{"check": "max_bytes", "cmd": "check {outputs.out}", "output": "out",
                "limit": "1 MiB", "critical": True},
               {"check": "nonempty"}],
    "on_failure": "use_last_good",
    "disk": "2 GB",
    "per_item": True,
    "enabled": False,
    "kind": "compress",
    "input": "{upstream.first.out}",
    "algorithm": "zstd",
    "chunk_size": "4MiB",
    "parallel": True,
    "workers": 4,
    "expect": "blake3:00",
    "key_env": "KEY",
    "key_file": "key.bin",
}


def _docs(workdir: Path | None = None) -> Pipeline:
    """The first two stages of the example pipeline, built in Python."""
    return (Pipeline("docs", workdir=workdir)
            .stage("ingest", cmd=["python", "{inputs.script}", "{inputs.src}", "{outputs.raw}",
                                  "{params.limit}"],
                   inputs={"script": "steps/ingest.py", "src": "corpus"}, outputs=["raw"],
                   params={"limit": 100})
            .stage("normalize", upstream=["ingest"],
                   cmd="python {inputs.script} {upstream.ingest.raw} {outputs.clean}",
                   inputs={"script": "steps/normalize.py"}, outputs=["clean"],
                   params={"lowercase": True}))


# --- the model ----------------------------------------------------------------------------------


def test_the_builder_makes_the_model_the_file_makes():
    built = _docs(EXAMPLE.parent).validate()
    loaded = load_pipeline(EXAMPLE)
    assert built.stages == {name: loaded.stages[name] for name in ("ingest", "normalize")}
    assert (built.name, built.version, built.order()) == ("docs", "1", ["ingest", "normalize"])


def test_a_new_pipeline_lives_in_its_workdir_or_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = Pipeline("p", version="2")
    assert (here.workdir, here.path, here.version) == (tmp_path, tmp_path / "stagestore.toml", "2")
    there = Pipeline("p", workdir="sub")
    assert (there.workdir, there.path) == (tmp_path / "sub", tmp_path / "sub" / "stagestore.toml")
    assert here.stages == {} and "pipeline 'p'" in here.display


def test_pipelines_are_equal_when_their_definitions_are(tmp_path):
    assert _docs(tmp_path) == _docs() and _docs() != _docs().stage("x", cmd="true")
    assert _docs() != _docs().definition
    with pytest.raises(TypeError):
        hash(_docs())


def test_an_every_key_stage_round_trips_through_toml():
    built = Pipeline("every key").stage("first", cmd="make").stage("odd.name-1_x", **EVERY_KEY)
    text = built.to_toml()
    written = tomllib.loads(text)["stages"]["odd.name-1_x"]
    # Every key is set, so a key added to StageSpec fails here until it is covered.
    assert set(written) == {field.encode_name for field in msgspec.structs.fields(StageSpec)}
    assert _decode(text.encode(), "every.toml") == built.definition
    assert written["classify"][1] == {"exit_code": 137, "class": "KilledFailure",
                                      "category": "recoverable"}


def test_only_keys_that_differ_from_their_defaults_are_written():
    text = Pipeline("p").stage("a", cmd="true", retries=0, checks=[{"check": "json"}]).to_toml()
    assert text == ('[pipeline]\nname = "p"\nversion = "1"\n\n'
                    '[stages.a]\ncmd = "true"\n\n'
                    '[[stages.a.checks]]\ncheck = "json"\n')


def test_the_example_pipeline_round_trips():
    loaded = load_pipeline(EXAMPLE)
    again = Pipeline.from_toml(loaded.to_toml(), workdir=EXAMPLE.parent)
    assert again == loaded and again.order() == loaded.order()
    assert (again.workdir, again.path) == (EXAMPLE.parent, EXAMPLE.parent / "stagestore.toml")


_TOML_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
_OFFSETS = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(
    lambda minutes: dt.timezone(dt.timedelta(minutes=minutes)))
_SCALARS = (_TOML_TEXT | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False)
            | st.booleans() | st.dates() | st.times()
            | st.datetimes(timezones=st.none() | _OFFSETS))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(_TOML_TEXT, inner, max_size=4), max_leaves=12)


@given(st.dictionaries(_TOML_TEXT, _VALUES, max_size=4))
def test_any_params_round_trip_through_a_pipeline(params):
    built = Pipeline("p").stage("a", cmd="true", params=params)
    assert Pipeline.from_toml(built.to_toml(), check_inputs=False) == built


# --- checked as a file is checked ---------------------------------------------------------------


@pytest.mark.parametrize("name, keys, where, words", [
    ("a", {"bogus": 1}, "a.bogus", "unknown field `bogus`"),
    ("a", {"cmd": "x", "retries": "3"}, "a.retries", "Expected `int`, got `str`"),
    ("a", {"cmd": "x", "checks": [{"check": "nope"}]}, "a.checks[0].check", "Invalid enum value"),
    ("a", {"cmd": "x", "params": {"p": None}}, "a.params.p", "TOML has no null"),
    ("a", {"cmd": "x", "params": {"p": (1, 2)}}, "a.params.p", "use a list"),
    ("a b", {"cmd": "x"}, "a b", "invalid stage name"),
    ("dup", {"cmd": "x"}, "dup", "stage 'dup' is already defined"),
])
def test_a_bad_stage_is_refused_naming_the_stage_and_key(name, keys, where, words):
    with pytest.raises(PipelineError) as info:
        Pipeline("p").stage("dup", cmd="x").stage(name, **keys)
    message = info.value.message
    assert message.startswith("pipeline 'p' (built in Python): "), message
    assert message.endswith(f"- at `$.stages.{where}`") and words in message, message
    assert "\n" not in message and info.value.stage == name


def test_an_unknown_key_gets_the_list_of_valid_keys():
    with pytest.raises(PipelineError) as info:
        Pipeline("p").stage("a", comand="x")
    assert info.value.hint.startswith("valid stage keys: cmd, call, shell")


@pytest.mark.parametrize("stages", [
    {},
    {"a": {"cmd": "x", "upstream": ["ghost"]}},
    {"a": {"cmd": "x {outputs.nope}"}},
    {"a": {"cmd": "x", "upstream": ["b"]}, "b": {"cmd": "x", "upstream": ["a"]}},
    {"a": {"cmd": "x", "inputs": {"src": "missing.txt"}}},
    {"a": {"call": "no-module"}},
])
def test_validate_gives_the_message_a_file_gives(tmp_path, stages):
    built = Pipeline("p", workdir=tmp_path)
    for name, keys in stages.items():
        built.stage(name, **keys)
    with pytest.raises(PipelineError) as from_python:
        built.validate()
    with pytest.raises(PipelineError) as from_file:
        Pipeline.from_toml(built.to_toml(), workdir=tmp_path)
    assert from_python.value.message.split(": ", 1)[1] == from_file.value.message.split(": ", 1)[1]
    assert from_file.value.message.startswith("<TOML text>: ")


def test_bad_toml_text_is_refused_as_a_file_is():
    at_cmd = r"^p\.toml:4:8: invalid TOML: Invalid value$"
    with pytest.raises(PipelineError, match=at_cmd):
        Pipeline.from_toml('[pipeline]\nname = "p"\n[stages.a]\ncmd = [,]\n', path="p.toml")
    with pytest.raises(PipelineError, match=r"not UTF-8 \(line 2\)"):
        Pipeline.from_toml('[pipeline]\nname = "\ud800"\n')


def test_validate_skips_inputs_only_when_asked(tmp_path):
    built = Pipeline("p", workdir=tmp_path).stage("a", cmd="x {inputs.src}",
                                                   inputs={"src": "later.txt"})
    assert built.validate(check_inputs=False) is built
    with pytest.raises(PipelineError, match="later.txt does not exist"):
        built.validate()


# --- written, and run with the same runner ------------------------------------------------------


def test_write_replaces_the_file_whole_and_loads_back_equal(tmp_path):
    built = _docs(tmp_path)
    (tmp_path / "stagestore.toml").write_text("old")
    assert built.write() == tmp_path / "stagestore.toml"
    assert load_pipeline(tmp_path / "stagestore.toml", check_inputs=False) == built
    assert built.write(tmp_path / "copy.toml").read_text() == built.to_toml()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.toml", "stagestore.toml"]


# Stage scripts for `python -c`: no braces, which the command would read as placeholders.
MAKE = "import sys, json, os; open(sys.argv[2], 'w').write(open(sys.argv[1]).read() + " \
       "json.loads(os.environ['STAGESTORE_PARAMS'])['suffix'])"
SHOUT = "import sys; open(sys.argv[2], 'w').write(open(sys.argv[1]).read().upper())"


def test_a_built_pipeline_runs_and_its_toml_twin_reuses_everything(tmp_path):
    (tmp_path / "src.txt").write_text("hello")
    built = (Pipeline("tiny", workdir=tmp_path)
             .stage("make", cmd=[sys.executable, "-c", MAKE, "{inputs.src}", "{outputs.text}"],
                    inputs={"src": "src.txt"}, outputs=["text"], params={"suffix": "!"})
             .stage("shout", cmd=[sys.executable, "-c", SHOUT, "{upstream.make.text}",
                                  "{outputs.loud}"], upstream=["make"], outputs=["loud"])
             .validate())
    store = Store.create(tmp_path / "store")
    first = stagestore.run(built, store, run_id="built")
    assert first.ok and [s.outcome for s in first.stages] == ["succeeded", "succeeded"]
    loud = store.manifests.read("built", "shout").outputs["loud"]
    assert store.objects.read_bytes(loud.hash) == b"HELLO!"

    twin = Pipeline.from_toml(built.to_toml(), workdir=tmp_path)
    second = stagestore.run(twin, store, run_id="read")
    assert [s.outcome for s in second.stages] == ["cached", "cached"]
    for stage in ("make", "shout"):
        ours, theirs = (store.manifests.read(run, stage) for run in ("built", "read"))
        assert (ours.config_hash, ours.input_hash) == (theirs.config_hash, theirs.input_hash)


# --- the TOML emitter ---------------------------------------------------------------------------


@given(_VALUES)
def test_any_toml_value_reads_back_equal(item):
    assert tomllib.loads(f"v = {value(item)}") == {"v": item}


@given(st.lists(_TOML_TEXT, min_size=1, max_size=3),
       st.dictionaries(_TOML_TEXT, _VALUES, max_size=4), st.booleans())
def test_any_section_reads_back_equal(header, items, array):
    expected: object = [items] if array else items
    for part in reversed(header):
        expected = {part: expected}
    assert tomllib.loads(section(header, items, array=array)) == expected


def test_strings_and_keys_are_escaped_and_quoted_only_when_needed():
    assert value('a"b\\c\nd\x00\x7f') == r'"a\"b\\c\nd\u0000\u007f"'
    assert section(["t", "a.b"], {"bare-key_1": 1, "": 2, "é": 3}) == \
        '[t."a.b"]\nbare-key_1 = 1\n"" = 2\n"é" = 3\n'


def test_special_floats_are_written_as_toml_has_them():
    assert [value(x) for x in (math.inf, -math.inf, math.nan, 1e16, -0.0)] == \
        ["inf", "-inf", "nan", "1e+16", "-0.0"]
    assert math.isnan(tomllib.loads(f"v = {value(math.nan)}")["v"])


@pytest.mark.parametrize("item, words", [
    (None, "TOML has no null"),
    ((1,), "a tuple has no TOML form (use a list)"),
    ({1}, "a set has no TOML form"),
    (b"x", "a bytes has no TOML form"),
    (2**63, "beyond TOML's 64-bit integers"),
    ("\udc80", "lone surrogate"),
    ({1: "x"}, "a TOML key must be a string"),
    (dt.time(1, tzinfo=dt.timezone.utc), "a time with a time zone"),
    (dt.datetime(2024, 1, 1, tzinfo=dt.timezone(dt.timedelta(seconds=30))), "offset"),
])
def test_what_toml_cannot_hold_is_refused_saying_where(item, words):
    with pytest.raises(TomlValueError) as info:
        value({"k": [item]})
    assert words in info.value.reason and info.value.where.startswith("$.k[0]")


def test_run_validates_a_built_pipeline_that_was_not_validated(tmp_path):
    pipeline = Pipeline("p", workdir=tmp_path).stage("a", cmd=["true"], upstream=["missing"])
    with pytest.raises(PipelineError, match="unknown upstream stage 'missing'"):
        stagestore.run(pipeline, stagestore.Store.create(tmp_path / "store"))
