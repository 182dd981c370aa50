"""Where a damaged or newer-format record is a quiet miss, only those errors are: a bug in our own
code (a TypeError, AttributeError, KeyError) must propagate, not pass for a damaged record."""

from __future__ import annotations

import msgspec
import pytest

from stagestore.inspection import diff
from stagestore.store import manifests
from stagestore.remote import remotes
from stagestore.execution import resilience
from stagestore.model.records import MANIFEST_SCHEMA_VERSION
from stagestore.execution.runner import run

PIPELINE = """
[pipeline]
name = "narrow"

[stages.build]
cmd = ["sh", "-c", "echo v1 > {outputs.o}"]
outputs = ["o"]
"""


def _newer(path) -> None:
    raw = msgspec.json.decode(path.read_bytes())
    raw["schema_version"] = MANIFEST_SCHEMA_VERSION + 1
    path.write_bytes(msgspec.json.encode(raw))


def _damaged(path) -> None:
    path.write_bytes(b'{"schema_version": 1, "stage": ')


def _unreadable(path) -> None:
    # A folder in the record's place: an OSError on read even as root, unlike a mode-0 file.
    path.unlink()
    path.mkdir()


DAMAGE = {"newer": _newer, "damaged": _damaged, "unreadable": _unreadable}


def _bug(*args, **kwargs):  # noqa: ANN002, ANN003
    raise TypeError("a bug in stagestore")


@pytest.fixture
def store(ws):  # noqa: ANN001, ANN201
    """A store holding run A, whose stage `build` succeeded."""
    ws.pipeline(PIPELINE)
    assert run(ws.load(), ws.open_store(), run_id="A").status == "succeeded"
    return ws.open_store()


def _manifest_path(store, run_id: str = "A"):  # noqa: ANN001, ANN202
    return store.layout.manifest_path(run_id, "build")


# --- manifests.CacheIndex.lookup ---


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_cache_lookup_of_a_damaged_or_newer_manifest_is_a_miss(store, damage):
    manifest = store.manifests.read("A", "build")
    assert store.cache.lookup(manifest.input_hash, manifest.config_hash) == manifest
    DAMAGE[damage](_manifest_path(store))
    assert store.cache.lookup(manifest.input_hash, manifest.config_hash) is None


@pytest.mark.parametrize("where", ["decode_record", "check_manifest"])
def test_cache_lookup_lets_a_bug_propagate(store, monkeypatch, where):
    manifest = store.manifests.read("A", "build")
    monkeypatch.setattr(manifests, where, _bug)
    with pytest.raises(TypeError, match="a bug in stagestore"):
        store.cache.lookup(manifest.input_hash, manifest.config_hash)


# --- resilience.last_good and last_output_size ---


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_or_newer_manifest_is_not_a_last_good_result(store, damage):
    good = store.manifests.read("A", "build")
    assert resilience.last_good(store, "build", None, ["o"], exclude_run="B") == good
    assert resilience.last_output_size(store, "build", exclude_run="B") == good.outputs["o"].size
    DAMAGE[damage](_manifest_path(store))
    assert resilience.last_good(store, "build", None, ["o"], exclude_run="B") is None
    assert resilience.last_output_size(store, "build", exclude_run="B") is None


def test_last_good_and_last_output_size_let_a_bug_propagate(store, monkeypatch):
    monkeypatch.setattr(manifests, "decode_record", _bug)
    with pytest.raises(TypeError, match="a bug in stagestore"):
        resilience.last_good(store, "build", None, ["o"], exclude_run="B")
    with pytest.raises(TypeError, match="a bug in stagestore"):
        resilience.last_output_size(store, "build", exclude_run="B")


# --- diff: the order of stages and items, read from the run records ---


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_diff_of_runs_with_a_damaged_run_record_orders_by_name(ws, store, damage):
    assert run(ws.load(), store, run_id="B").status == "succeeded"
    path = store.layout.run_record_path("B")
    DAMAGE[damage](path)
    report = diff.diff_runs(store, "A", "B")
    assert [s.stage for s in report.stages] == ["build"]


def test_diff_lets_a_bug_in_reading_the_run_record_propagate(ws, store, monkeypatch):
    assert run(ws.load(), store, run_id="B").status == "succeeded"
    monkeypatch.setattr(store.manifests, "read_run", _bug)
    with pytest.raises(TypeError, match="a bug in stagestore"):
        diff.diff_runs(store, "A", "B")


# --- remotes.parse_run_key ---


def test_a_key_under_a_folder_that_is_no_item_folder_is_a_stray():
    assert remotes.parse_run_key("r", "runs/r/items/%zz/build.json") is None
    assert remotes.parse_run_key("r", "runs/r/items/a%2Fb%/build.json") is None
    key = remotes.manifest_key("r", "build", "it/1")
    assert remotes.parse_run_key("r", key) == remotes.RunKey(item="it/1", stage="build")


def test_parse_run_key_lets_a_bug_propagate(monkeypatch):
    monkeypatch.setattr(remotes, "item_id", _bug)
    with pytest.raises(TypeError, match="a bug in stagestore"):
        remotes.parse_run_key("r", "runs/r/items/x/build.json")
