"""The cache index is derived from the manifests: `verify` reports entries that no longer lead
to a succeeded manifest with their key, and `recover` and `gc` rebuild them from the manifests
(docs/format.md, invariant 11)."""

from __future__ import annotations

import shutil

import msgspec
import pytest

from stagestore.store.layout import run_owner
from stagestore.store.locking import OwnerLock
from stagestore.store.manifests import cache_key
from stagestore.inspection.gc import gc
from stagestore.model.records import CacheEntry, decode_record
from stagestore.inspection.recover import recover
from stagestore.execution.runner import run
from stagestore.inspection.verify import verify

STAGES = ("make", "count", "report")
CACHE_KINDS = {"cache_entry_stale", "cache_entry_invalid"}


def _entry_path(store, run_id: str, stage: str, item: str | None = None):  # noqa: ANN001, ANN202
    manifest = store.manifests.read(run_id, stage, item)
    return store.layout.cache_entry_path(cache_key(manifest.input_hash, manifest.config_hash))


def _entries(store) -> dict[str, tuple[str, str | None, str]]:  # noqa: ANN001
    """Every cache entry, by path: (run, item, stage) it names."""
    found = {}
    for path in sorted(store.layout.cache.glob("*/*.json")):
        entry = decode_record(path.read_bytes(), CacheEntry, str(path))
        found[str(path)] = (entry.run_id, entry.item, entry.stage)
    return found


def _executed(report) -> list[str]:  # noqa: ANN001
    return [s.stage for s in report.stages if s.executed] + [
        f"{i.item}/{s.stage}" for i in report.items for s in i.stages if s.executed]


def _cache_findings(report) -> list:  # noqa: ANN001
    return [f for f in [*report.problems, *report.warnings] if f.kind in CACHE_KINDS]


@pytest.fixture
def two_runs(ws):  # noqa: ANN001, ANN201
    """r1 executed everything; r2 reused all of it; the entries still name r1."""
    ws.linear()
    store = ws.open_store()
    run(ws.load(), store, run_id="r1")
    second = run(ws.load(), store, run_id="r2")
    assert _executed(second) == []
    for stage in STAGES:
        manifest = store.manifests.read("r2", stage)
        # A reused result is a succeeded manifest of r2 with the same keys.
        assert (manifest.status, manifest.cached_from) == ("succeeded", "r1")
    assert sorted(_entries(store).values()) == sorted(("r1", None, s) for s in STAGES)
    return store


def test_verify_reports_each_entry_naming_a_deleted_run_as_a_warning(ws, two_runs):
    store = two_runs
    shutil.rmtree(ws.store / "runs" / "r1")
    report = verify(store)
    assert report.ok, report.problems
    stale = _cache_findings(report)
    assert sorted((f.kind, f.severity, f.run_id, f.stage) for f in stale) == sorted(
        ("cache_entry_stale", "warning", "r1", s) for s in STAGES)
    assert {f.path for f in stale} == {str(_entry_path(store, "r2", s)) for s in STAGES}
    assert all("run r2" in f.message and "recover" in f.message for f in stale)
    result = ws.cli("verify")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("cache_entry_stale") == 3
    # Only the entries are stale: a check of run r2 alone says nothing about them.
    assert _cache_findings(verify(store, ["r2"])) == []


def test_recover_points_stale_entries_at_another_run_and_the_next_run_executes_nothing(ws, two_runs):
    store = two_runs
    shutil.rmtree(ws.store / "runs" / "r1")
    report = recover(store)
    assert report.ok and not report.dry_run
    assert (report.cache_entries_rebuilt, report.cache_entries_removed) == (3, 0)
    assert [a.action for a in report.actions] == ["rebuild_cache_index"]
    assert sorted(_entries(store).values()) == sorted(("r2", None, s) for s in STAGES)
    report = verify(store)
    assert report.ok and not report.warnings, (report.problems, report.warnings)
    again = recover(store)
    assert (again.actions, again.cache_entries_rebuilt, again.cache_entries_removed) == ([], 0, 0)
    assert "nothing to recover" in ws.cli("recover").stdout
    third = run(ws.load(), store, run_id="r3")
    assert _executed(third) == []
    assert all(s.outcome == "cached" for s in third.stages)


def test_recover_dry_run_reports_the_rebuild_and_writes_nothing(ws, two_runs):
    store = two_runs
    shutil.rmtree(ws.store / "runs" / "r1")
    before = {p: open(p, "rb").read() for p in _entries(store)}
    report = recover(store, dry_run=True)
    assert report.dry_run and (report.cache_entries_rebuilt, report.cache_entries_removed) == (3, 0)
    assert [a.message for a in report.actions] == [
        "would point 3 cache entries at runs that hold the same results"]
    assert {p: open(p, "rb").read() for p in _entries(store)} == before
    result = ws.cli("recover", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    decoded = msgspec.json.decode(result.stdout)
    assert (decoded["cache_entries_rebuilt"], decoded["cache_entries_removed"]) == (3, 0)
    text = ws.cli("recover", "--dry-run").stdout
    assert "would point 3 cache entries at runs that hold the same results" in text
    assert {p: open(p, "rb").read() for p in _entries(store)} == before


def test_gc_points_stale_entries_at_another_run(ws, two_runs):
    store = two_runs
    shutil.rmtree(ws.store / "runs" / "r1")
    dry = gc(store, dry_run=True)
    assert (dry.cache_entries_rebuilt, dry.cache_entries_removed) == (3, 0)
    assert sorted(_entries(store).values()) == sorted(("r1", None, s) for s in STAGES)
    result = ws.cli("gc")
    assert result.returncode == 0, result.stderr
    assert "rebuilt 3 cache entries, removed 0" in result.stdout
    assert sorted(_entries(store).values()) == sorted(("r2", None, s) for s in STAGES)
    result = ws.cli("gc", "--json")
    decoded = msgspec.json.decode(result.stdout)
    assert (decoded["cache_entries_rebuilt"], decoded["cache_entries_removed"]) == (0, 0)
    assert "cache entries" not in ws.cli("gc").stdout
    assert _executed(run(ws.load(), store, run_id="r3")) == []


@pytest.mark.parametrize("repair", ["recover", "gc"])
def test_entries_no_run_can_replace_are_removed(ws, repair):
    ws.linear()
    store = ws.open_store()
    run(ws.load(), store, run_id="r1")
    paths = {str(_entry_path(store, "r1", s)) for s in STAGES}
    shutil.rmtree(ws.store / "runs" / "r1")
    stale = _cache_findings(verify(store))
    assert {(f.kind, f.path) for f in stale} == {("cache_entry_stale", p) for p in paths}
    assert all("`stagestore recover` or `stagestore gc` removes it" in f.message for f in stale)
    report = recover(store) if repair == "recover" else gc(store)
    assert (report.cache_entries_rebuilt, report.cache_entries_removed) == (0, 3)
    assert _entries(store) == {}
    report = verify(store)
    assert report.ok and not report.warnings, (report.problems, report.warnings)


def test_an_entry_that_does_not_decode_is_rebuilt_from_the_manifests(ws):
    ws.linear()
    store = ws.open_store()
    run(ws.load(), store, run_id="r1")
    path = _entry_path(store, "r1", "count")
    path.write_bytes(b"{not json")
    stale = _cache_findings(verify(store))
    assert [(f.kind, f.severity, f.path) for f in stale] == [
        ("cache_entry_invalid", "warning", str(path))]
    report = recover(store)
    assert report.ok and (report.cache_entries_rebuilt, report.cache_entries_removed) == (1, 0)
    assert _entries(store)[str(path)] == ("r1", None, "count")
    assert _executed(run(ws.load(), store, run_id="r2")) == []


def test_an_entry_naming_a_manifest_with_other_keys_is_rebuilt(ws):
    ws.linear()
    store = ws.open_store()
    run(ws.load(), store, run_id="r1")
    path = _entry_path(store, "r1", "make")
    entry = decode_record(path.read_bytes(), CacheEntry, str(path))
    path.write_bytes(msgspec.json.encode(msgspec.structs.replace(entry, stage="count")))
    assert store.cache.lookup(entry.input_hash, entry.config_hash) is None  # a miss, never trusted
    stale = _cache_findings(verify(store))
    assert [(f.kind, f.path, f.stage) for f in stale] == [("cache_entry_stale", str(path), "count")]
    assert gc(store).cache_entries_rebuilt == 1
    assert _entries(store)[str(path)] == ("r1", None, "make")
    assert _executed(run(ws.load(), store, run_id="r2")) == []


def test_the_rebuilt_entry_names_the_run_that_started_last(ws):
    ws.linear()
    store = ws.open_store()
    for run_id in ("r1", "r3", "r2"):  # started in this order: the newest is r2, not r3
        run(ws.load(), store, run_id=run_id)
    shutil.rmtree(ws.store / "runs" / "r1")
    recover(store)
    assert sorted(_entries(store).values()) == sorted(("r2", None, s) for s in STAGES)


ITEMS = """
[pipeline]
name = "items"

[stages.fetch]
cmd = ["sh", "-c", "echo {item} > {outputs.o}"]
outputs = ["o"]

[stages.build]
upstream = ["fetch"]
cmd = ["sh", "-c", "cat {upstream.fetch.o} > {outputs.o}"]
outputs = ["o"]
"""


def test_item_manifests_rebuild_their_entries(ws):
    ws.pipeline(ITEMS)
    store = ws.open_store()
    run(ws.load(), store, run_id="r1", items=["a", "b"])
    assert _executed(run(ws.load(), store, run_id="r2", items=["a", "b"])) == []
    shutil.rmtree(ws.store / "runs" / "r1")
    assert len(_cache_findings(verify(store))) == 4
    assert recover(store).cache_entries_rebuilt == 4
    assert sorted(_entries(store).values()) == sorted(
        ("r2", item, stage) for item in ("a", "b") for stage in ("fetch", "build"))
    assert _executed(run(ws.load(), store, run_id="r3", items=["a", "b"])) == []


def test_entries_naming_a_live_run_are_neither_reported_nor_touched(ws, two_runs):
    store = two_runs
    shutil.rmtree(ws.store / "runs" / "r1")
    before = _entries(store)
    lock = OwnerLock(store.layout, run_owner("r1"))
    assert lock.try_acquire()
    try:  # a live run writes its entry before its manifest: the entry is not stale yet
        assert _cache_findings(verify(store)) == []
        report = recover(store)
        assert (report.cache_entries_rebuilt, report.cache_entries_removed) == (0, 0)
    finally:
        lock.release()
    assert _entries(store) == before


def test_an_entry_of_a_newer_format_is_left_alone(ws):
    ws.linear()
    store = ws.open_store()
    run(ws.load(), store, run_id="r1")
    path = _entry_path(store, "r1", "make")
    path.write_bytes(path.read_bytes().replace(b'"schema_version": 2', b'"schema_version": 99'))
    assert b'"schema_version": 99' in path.read_bytes()
    assert _cache_findings(verify(store)) == []
    assert (recover(store).cache_entries_rebuilt, gc(store).cache_entries_removed) == (0, 0)
    assert path.exists()


def test_recover_leaves_the_index_to_a_forget_in_progress(ws, two_runs):
    store = two_runs
    shutil.rmtree(ws.store / "runs" / "r1")  # as a forget's first step would
    before = _entries(store)
    lock = OwnerLock(store.layout, "forget")  # the cache-index lock a forget holds throughout
    assert lock.try_acquire()
    try:
        report = recover(store)
        assert (report.actions, report.cache_entries_rebuilt) == ([], 0)
    finally:
        lock.release()
    assert _entries(store) == before
    assert recover(store).cache_entries_rebuilt == 3


def test_forget_points_the_entries_of_the_forgotten_run_at_another(ws, two_runs):
    from stagestore.inspection.gc import forget

    store = two_runs
    forget(store, ["r1"])
    assert sorted(_entries(store).values()) == sorted(("r2", None, s) for s in STAGES)
    forget(store, ["r2"])
    assert _entries(store) == {}
    report = verify(store)
    assert report.ok and not report.warnings, (report.problems, report.warnings)


@pytest.mark.parametrize("repair", ["recover", "gc"])
def test_a_lost_entry_is_reported_and_written_again(ws, repair):
    # Entries are not fsynced (invariant 11): a power loss can lose one whose manifest is
    # durable.  verify says so, recover and gc write it again, and the stage is reused after.
    ws.linear()
    store = ws.open_store()
    run(ws.load(), store, run_id="a")
    lost = _entry_path(store, "a", "count")
    lost.unlink()
    report = verify(store)
    assert report.ok
    assert [(f.kind, f.run_id, f.stage) for f in report.warnings] == [
        ("cache_entry_missing", "a", "count")]
    assert "stagestore recover" in report.warnings[0].message
    if repair == "recover":
        done = recover(store)
        assert done.ok and done.cache_entries_rebuilt == 1
    else:
        assert gc(store).cache_entries_rebuilt == 1
    assert _entries(store)[str(lost)] == ("a", None, "count")
    assert not verify(store).warnings
    assert _executed(run(ws.load(), store, run_id="b")) == []
