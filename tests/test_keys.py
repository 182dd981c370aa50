"""The keys cover whatever a stage's process is handed that can differ between two stages."""

from __future__ import annotations

import stagestore
from stagestore.pipeline.keys import config_hash
from stagestore.model.records import StageSpec

TWO_STAGES = """
[pipeline]
name = "who"

[stages.first]
cmd = 'echo "I am $STAGESTORE_STAGE" > {outputs.o}'
shell = true
outputs = ["o"]

[stages.second]
cmd = 'echo "I am $STAGESTORE_STAGE" > {outputs.o}'
shell = true
outputs = ["o"]
"""


def test_two_stages_with_the_same_command_each_see_their_own_name(ws):
    # The process is handed STAGESTORE_STAGE, so two stages with the same command and inputs
    # are not the same work: `second` must not reuse what `first` wrote.
    ws.pipeline(TWO_STAGES)
    result = ws.cli("run", "--run-id", "R")
    assert result.returncode == 0, result.stderr
    for stage in ("first", "second"):
        result = ws.cli("checkout", "R", stage, "--to", f"out-{stage}")
        assert result.returncode == 0, result.stderr
        assert (ws.root / f"out-{stage}" / "o").read_text() == f"I am {stage}\n"


def test_the_library_executes_both_stages(ws):
    ws.pipeline(TWO_STAGES)
    report = stagestore.run(ws.load(), ws.open_store(), run_id="R")
    assert {s.stage: s.outcome for s in report.stages} == {"first": "succeeded",
                                                           "second": "succeeded"}
    again = stagestore.run(ws.load(), ws.open_store(), run_id="R2")
    # A later run of the same stage is still the same work.
    assert {s.stage: (s.outcome, s.cached_from) for s in again.stages} == {
        "first": ("cached", "R"), "second": ("cached", "R")}


def test_specs_differing_only_in_stage_name_have_different_keys():
    spec = StageSpec(cmd="echo hi > {outputs.o}", shell=True, outputs=["o"])
    assert config_hash("first", spec) != config_hash("second", spec)
    assert config_hash("first", spec) == config_hash("first", spec)


def test_kind_stages_differing_only_in_stage_name_have_different_keys():
    spec = StageSpec(kind="checksum", input="{inputs.src}", inputs={"src": "data"},
                     outputs=["sum"])
    assert config_hash("a", spec, {"kind": "checksum"}) != config_hash("b", spec, {"kind": "checksum"})


CHECK_USES_ITEM = """
[pipeline]
name = "checked"

[stages.make]
cmd = "echo made > {outputs.o}"
shell = true
outputs = ["o"]

[[stages.make.checks]]
cmd = "test {item} != bad"
"""


def test_item_in_a_check_makes_the_stage_run_per_item(ws):
    # The check's verdict depends on the item, so the item must be in the key: the stage runs
    # per item, like one with {item} in its cmd, instead of crashing on a missing value.
    ws.pipeline(CHECK_USES_ITEM)
    result = ws.cli("run", "--run-id", "R")
    assert result.returncode == 2, result.stderr
    assert "runs once per item" in result.stderr and "Traceback" not in result.stderr
    ws.write("items.txt", "good\nbad\n")
    result = ws.cli("run", "--run-id", "R", "--items", "items.txt", "--json")
    assert result.returncode == 1, result.stderr
    import json

    items = json.loads(result.stdout)["items"]
    statuses = {name: item["status"] for name, item in items.items()} if isinstance(items, dict) \
        else {item["item"]: item["status"] for item in items}
    assert statuses == {"good": "succeeded", "bad": "failed"}
