"""Item runs record their items in the run's item log (store format 3, docs/format.md).

- the store footprint: a no-op rerun of N items adds at most N/20 files;
- `show RUN STAGE --item ITEM --json` prints the manifest from the log;
- a torn tail (a record cut short, or a byte flipped in it) is ignored by readers, reported by
  verify, cut by recover, and recover completes the items it interrupted;
- a format-2 store (item folders) is read as it is, upgraded to format 3 by the first store
  lock, and its runs stay readable beside the new ones; a run taken again after the upgrade
  holds both layouts;
- verify and recover on a 2,000-item run (10,000 behind `slow`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec
import pytest

from stagestore.errors import RunBusyError
from stagestore.execution.runner import run
from stagestore.inspection.recover import recover
from stagestore.inspection.verify import verify
from stagestore.store.layout import FORMAT_VERSION, item_dirname
from stagestore.store.store import Store

THREE = """
[pipeline]
name = "three"

[stages.copy]
cmd = "cp {inputs.src} {outputs.a}"
inputs = { src = "data/{item}.txt" }
outputs = ["a"]

[stages.upper]
upstream = ["copy"]
cmd = ["sh", "-c", "tr a-z A-Z < \\"$0\\" > \\"$1\\"", "{upstream.copy.a}", "{outputs.b}"]
outputs = ["b"]

[stages.count]
upstream = ["upper"]
cmd = ["sh", "-c", "wc -c < \\"$0\\" > \\"$1\\"", "{upstream.upper.b}", "{outputs.c}"]
outputs = ["c"]
"""

# No process per item: a once-per-run stage, and a per-item passthrough of its output.
CHEAP = """
[pipeline]
name = "cheap"

[stages.seed]
cmd = ["sh", "-c", "echo seed > {outputs.o}"]
outputs = ["o"]

[stages.each]
kind = "passthrough"
per_item = true
upstream = ["seed"]
input = "{upstream.seed.o}"
outputs = ["o"]
"""


def _three(ws, n: int) -> list[str]:  # noqa: ANN001
    items = [f"i{k:04d}" for k in range(n)]
    for item in items:
        ws.write(f"data/{item}.txt", f"{item} hello\n")
    ws.pipeline(THREE)
    return items


def _entries(root: Path) -> int:
    """Files and folders under `root` (locks excluded: they are not the store's data)."""
    count = 0
    for folder, dirs, files in os.walk(root):
        if Path(folder) == root:
            dirs[:] = [d for d in dirs if d != "locks"]
        count += len(dirs) + len(files)
    return count


def _segments(store: Store, run_id: str) -> list[Path]:
    return sorted(store.layout.run_dir(run_id).glob("_items.*.log"))


# --- footprint -----------------------------------------------------------------------------------


def test_a_noop_rerun_of_200_items_adds_at_most_one_file_per_20_items(ws):
    items = _three(ws, 200)
    first = run(ws.load(), ws.open_store(), run_id="a", items=items, jobs=2)
    assert first.ok and first.processed == 200
    before = _entries(ws.store)
    again = run(ws.load(), ws.open_store(), run_id="b", items=items, jobs=2)
    assert again.ok and all(s.outcome == "cached" for i in again.items for s in i.stages)
    added = _entries(ws.store) - before
    assert added <= 200 // 20, f"a no-op rerun of 200 items added {added} files and folders"
    before = _entries(ws.store)
    same = run(ws.load(), ws.open_store(), run_id="b", items=items, jobs=2)
    assert same.ok
    assert _entries(ws.store) - before <= 200 // 20
    store = ws.open_store()
    assert not store.layout.items_dir("b").exists()  # no folder per item any more
    assert len(_segments(store, "b")) == 2  # one per invocation that wrote item records
    assert store.manifests.items("b") == items
    assert verify(store).ok


def test_show_prints_an_item_manifest_from_the_log(ws):
    items = _three(ws, 3)
    assert run(ws.load(), ws.open_store(), run_id="r", items=items).ok
    store = ws.open_store()
    proc = ws.cli("show", "r", "count", "--item", "i0001", "--json")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown == json.loads(store.manifests.read_bytes("r", "count", "i0001"))
    assert (shown["run_id"], shown["item"], shown["stage"], shown["status"]) == (
        "r", "i0001", "count", "succeeded")


# --- torn tails ----------------------------------------------------------------------------------


def _interrupted(store: Store, run_id: str) -> None:
    """As a crash leaves it: the run record says the run has not finished."""
    record = store.manifests.read_run(run_id)
    store.manifests.write_run(msgspec.structs.replace(record, finished_at=None, status=None),
                              f"run-{run_id}")


def _last_frame(path: Path):  # noqa: ANN202 - an itemlog.Frame
    from stagestore.store import itemlog

    found = itemlog.scan(path.read_bytes(), str(path))
    assert found.end == path.stat().st_size
    return found.frames[-1]


@pytest.mark.parametrize("damage", ["cut", "flip"])
def test_a_torn_tail_is_ignored_reported_cut_and_its_items_completed(ws, damage):
    from stagestore.store import itemlog

    items = _three(ws, 12)
    assert run(ws.load(), ws.open_store(), run_id="r", items=items, jobs=1).ok
    store = ws.open_store()
    [segment] = _segments(store, "r")
    last = _last_frame(segment)  # the last item's ended record
    assert (last.kind, last.item) == (itemlog.KIND_ITEM, items[-1])
    if damage == "cut":
        os.truncate(segment, last.offset + last.length // 2)
    else:
        data = bytearray(segment.read_bytes())
        data[last.offset + last.length - 5] ^= 0x20
        segment.write_bytes(bytes(data))
    _interrupted(store, "r")

    store = ws.open_store()  # readers ignore the tail: the item is back at `running`
    assert store.manifests.read_item("r", items[-1]).status == "running"
    assert store.manifests.read("r", "count", items[-1]).status == "succeeded"
    report = verify(store)
    assert report.ok  # a torn tail loses nothing committed: a warning
    kinds = sorted(f.kind for f in report.warnings)
    assert kinds == ["item_log_torn", "run_incomplete"], report.warnings
    torn = next(f for f in report.warnings if f.kind == "item_log_torn")
    assert torn.path == str(segment) and "recover" in torn.message

    fixed = recover(store)
    assert fixed.ok, fixed.unresolved
    assert [a.action for a in fixed.actions][:2] == ["cut_item_log", "complete_run"]
    assert segment.stat().st_size == last.offset  # cut back to its last good record
    store = ws.open_store()
    assert all(store.manifests.read_item("r", i).status == "succeeded" for i in items)
    after = verify(store)
    assert after.ok and not after.warnings, after.warnings
    assert store.manifests.read_run("r").finished_at is not None


def test_damage_inside_the_log_is_a_problem_and_the_records_after_it_are_kept(ws):
    from stagestore.store import itemlog

    items = _three(ws, 4)
    assert run(ws.load(), ws.open_store(), run_id="r", items=items, jobs=1).ok
    store = ws.open_store()
    [segment] = _segments(store, "r")
    found = itemlog.scan(segment.read_bytes(), str(segment))
    first = found.frames[0]  # the first item's `running` record, superseded later
    data = bytearray(segment.read_bytes())
    data[first.offset + first.length - 3] ^= 0x01
    segment.write_bytes(bytes(data))
    store = ws.open_store()
    assert all(store.manifests.read_item("r", i).status == "succeeded" for i in items)
    report = verify(store)
    assert [f.kind for f in report.problems] == ["item_log_damaged"], report.problems


# --- format 2 ------------------------------------------------------------------------------------


def _as_format_2(store: Store, run_id: str) -> None:
    """Rewrite a run's item records as format 2 left them (one folder per item, one file per
    record, the same bytes), drop its item log, and mark the store format 2."""
    manifests = store.manifests
    for item in manifests.items(run_id):
        folder = store.layout.run_dir(run_id) / "items" / item_dirname(item)
        folder.mkdir(parents=True)
        (folder / "_item.json").write_bytes(manifests.read_item_bytes(run_id, item))
        for stage in manifests.stages(run_id, item):
            (folder / f"{stage}.json").write_bytes(manifests.read_bytes(run_id, stage, item))
    for segment in _segments(store, run_id):
        segment.unlink()
    store.layout.format_file.write_text('{"format":"stagestore","version":2}\n')


def test_a_format_2_store_is_read_as_it_is_then_upgraded_and_both_layouts_are_read(ws):
    items = _three(ws, 6) + ["gcc/12"]
    ws.write("data/gcc/12.txt", "a compiler\n")
    assert run(ws.load(), ws.open_store(), run_id="old", items=items).ok
    store = ws.open_store()
    expected = {(i, s): store.manifests.read_bytes("old", s, i)
                for i in items for s in ("copy", "upper", "count")}
    _as_format_2(store, "old")

    store = Store.open(ws.store)  # read as it is: no upgrade without the store lock
    assert store.layout.format_version == 2
    assert store.manifests.items("old") == sorted(items)
    assert {(i, s): store.manifests.read_bytes("old", s, i) for i, s in expected} == expected
    proc = ws.cli("show", "old", "count", "--item", "gcc/12", "--json")
    assert json.loads(proc.stdout) == json.loads(expected[("gcc/12", "count")])
    assert b'"version":2' in store.layout.format_file.read_bytes()

    report = verify(store)  # the first store lock upgrades the store
    assert report.ok and not report.warnings, report.warnings
    assert json.loads(store.layout.format_file.read_text())["version"] == FORMAT_VERSION

    # A new run reuses the format-2 run's results (the cache entries name its item files).
    new = run(ws.load(), ws.open_store(), run_id="new", items=items)
    assert new.ok and all(s.outcome == "cached" for i in new.items for s in i.stages)
    assert not (ws.store / "runs" / "new" / "items").exists()
    # The format-2 run taken again: its item records now also in a log, which wins.
    again = run(ws.load(), ws.open_store(), run_id="old", items=items)
    assert again.ok
    store = ws.open_store()
    assert (ws.store / "runs" / "old" / "items").is_dir() and _segments(store, "old")
    for item in items:
        assert store.manifests.read_item("old", item).status == "succeeded"
        assert store.manifests.stages("old", item) == ["copy", "count", "upper"]
    for command in (["runs"], ["report", "old"], ["diff", "old", "new"], ["stats"],
                    ["show", "old"], ["verify"], ["gc"], ["doctor"]):
        proc = ws.cli(*command)
        assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
    store = ws.open_store()
    assert verify(store).ok
    for (item, stage), data in expected.items():  # gc kept every object either layout names
        manifest = store.manifests.read("old", stage, item)
        assert all(store.objects.exists(ref.hash) for ref in manifest.outputs.values())


def test_a_format_2_store_in_use_by_an_older_stagestore_is_not_upgraded(ws, monkeypatch):
    import fcntl

    from stagestore.store import locking

    items = _three(ws, 2)
    assert run(ws.load(), ws.open_store(), run_id="r", items=items).ok
    store = ws.open_store()
    _as_format_2(store, "r")
    store = Store.open(ws.store)
    monkeypatch.setattr(locking, "LEGACY_LOCK_WAIT", 0.1)
    fd = os.open(store.layout.store_lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # a format-2 run in progress holds the store lock
        with pytest.raises(RunBusyError, match="older stagestore .store format 2."):
            verify(store)
    finally:
        os.close(fd)
    assert b'"version":2' in store.layout.format_file.read_bytes()
    assert verify(store).ok
    assert store.layout.format_version == FORMAT_VERSION


# --- scale ---------------------------------------------------------------------------------------


def _verify_and_recover_at_scale(ws, n: int) -> None:  # noqa: ANN001
    ws.pipeline(CHEAP)
    items = [f"p{k:05d}" for k in range(n)]
    first = run(ws.load(), ws.open_store(), run_id="big", items=items, jobs=2)
    assert first.ok and first.processed == n
    store = ws.open_store()
    [segment] = _segments(store, "big")
    report = verify(store)
    assert report.ok and not report.warnings and report.manifests_checked == n + 1
    # A crash near the end: the last records torn, the run not finished.
    last = _last_frame(segment)
    os.truncate(segment, last.offset + 7)
    _interrupted(store, "big")
    store = ws.open_store()
    report = verify(store)
    assert report.ok and sorted(f.kind for f in report.warnings) == [
        "item_log_torn", "run_incomplete"]
    fixed = recover(store)
    assert fixed.ok, fixed.unresolved
    store = ws.open_store()
    assert store.manifests.read_item("big", items[-1]).status == "succeeded"
    report = verify(store)
    assert report.ok and not report.warnings and report.manifests_checked == n + 1


def test_verify_and_recover_on_a_2000_item_run(ws):
    _verify_and_recover_at_scale(ws, 2000)


@pytest.mark.slow
def test_verify_and_recover_on_a_10000_item_run(ws):
    _verify_and_recover_at_scale(ws, 10_000)
