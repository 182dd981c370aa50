"""Deferred durability of item stages (store/unsynced.py, docs/format.md rule 18): an item
stage's objects are made durable by one `syncfs` per group of item records instead of an fsync
each, and the marker that guards the store after a power loss."""

from __future__ import annotations

import json
import os

import pytest

from stagestore.errors import StoreNeedsRecoverError
from stagestore.execution.runner import run
from stagestore.inspection.checkout import checkout
from stagestore.inspection.recover import recover
from stagestore.inspection.verify import verify
from stagestore.store import durable, unsynced
from stagestore.store.store import Store

from test_itemlog import _three

pytestmark = pytest.mark.skipif(
    not durable.syncfs_available() or durable.boot_id() is None,
    reason="writes are deferred only where syncfs(2) and a boot id exist (Linux)")


def _marker(store: Store, owner: str, boot: str) -> str:
    path = store.layout.new_tmp_path(owner, unsynced.LABEL)
    path.write_text(f"stagestore unsynced writes; boot {boot}\n")
    return str(path)


def test_an_item_run_fsyncs_no_object_and_syncs_once_per_group(ws):
    items = _three(ws, 40)
    store = ws.open_store()
    ops: list[tuple[str, str]] = []
    previous = durable.set_recorder(lambda op, path, src: ops.append((op, path)))
    try:
        report = run(ws.load(), store, run_id="a", items=items)
    finally:
        durable.set_recorder(previous)
    assert report.ok
    fsynced = [path for op, path in ops if op == "fsync"]
    # 40 items x 3 stages executed: before, 120 outputs, 40 snapshots and 240 logs were each
    # fsynced.  Now only records outside the item log are (the run record, the marker...).
    assert len(fsynced) < 10, fsynced
    assert not [p for p in fsynced if "~snapshot" in p or "/out/" in p]
    # One syncfs per group commit: at most one per item even on a loaded machine (a group is
    # due 0.2 s after its oldest record), where each item's objects had seven fsyncs.
    syncs = [path for op, path in ops if op == "syncfs"]
    assert 1 <= len(syncs) <= len(items) + 2
    # The marker is made durable before the first deferred write and gone at the end.
    first_marker = next(i for i, (op, p) in enumerate(ops) if op == "create" and p.endswith("~unsynced"))
    first_output = next(i for i, (op, p) in enumerate(ops) if op == "chmod" and "/out/" in p)
    assert first_marker < first_output
    assert ("fsync", ops[first_marker][1]) in ops[first_marker:first_output]
    assert not unsynced.markers(store.layout)
    assert verify(store).ok and not verify(store).warnings


def test_a_marker_from_another_boot_stops_run_checkout_and_push_until_recover(ws):
    items = _three(ws, 3)
    store = ws.open_store()
    assert run(ws.load(), store, run_id="a", items=items).ok
    # What a power loss during run b's deferred writes leaves: its marker, written during
    # another boot, and an object whose name is there but whose bytes are not.
    marker = _marker(store, "run-b", "00000000-0000-0000-0000-000000000000")
    damaged = store.manifests.read("a", "upper", "i0001").outputs["b"].hash
    path = store.objects.path(damaged)
    os.chmod(path, 0o644)
    path.write_bytes(b"")
    with pytest.raises(StoreNeedsRecoverError) as caught:
        run(ws.load(), store, run_id="c", items=items)
    assert "run-b" in caught.value.message and "recover" in caught.value.hint
    with pytest.raises(StoreNeedsRecoverError):
        checkout(store, "a", "upper", ws.root / "out", item="i0001")
    ws.write("items.txt", "".join(f"{i}\n" for i in items))
    result = ws.cli("run", "--run-id", "d", "--items", "items.txt", "--json")
    assert result.returncode == 1, result.stderr
    error = json.loads(result.stderr)
    assert "not yet durable" in error["error"] and "stagestore recover" in error["hint"]
    assert "Traceback" not in result.stderr
    done = recover(store)
    assert done.ok, done.unresolved
    assert "remove_object" in [a.action for a in done.actions]
    assert not os.path.exists(marker)
    report = run(ws.load(), store, run_id="e", items=items)
    assert report.ok
    assert verify(store).ok


def test_a_marker_of_this_boot_is_a_crash_synced_and_removed_by_the_next_run(ws):
    items = _three(ws, 2)
    store = ws.open_store()
    marker = _marker(store, "run-b", durable.boot_id())
    assert run(ws.load(), store, run_id="a", items=items).ok
    assert not os.path.exists(marker)


def test_a_live_owners_marker_is_left_alone(ws):
    from stagestore.store.locking import OwnerLock

    items = _three(ws, 2)
    store = ws.open_store()
    marker = _marker(store, "run-b", "another-boot")
    lock = OwnerLock(store.layout, "run-b")
    assert lock.try_acquire()
    try:
        assert run(ws.load(), store, run_id="a", items=items).ok
        assert os.path.exists(marker)
    finally:
        lock.release()


def test_a_format_3_store_is_upgraded_to_format_4_by_the_first_store_lock(tmp_path):
    # Format 4 adds the `unsynced` markers, which a format-3 stagestore would not honour: the
    # upgrade is the format file saying 4, so that none opens the store any more.
    import msgspec

    from stagestore.store.layout import FORMAT_VERSION
    from stagestore.store.locking import store_lock

    assert FORMAT_VERSION == 4
    Store.create(tmp_path / "store")
    (tmp_path / "store" / "stagestore.json").write_bytes(b'{"format":"stagestore","version":3}\n')
    (tmp_path / "store" / "stat-cache").mkdir(exist_ok=True)
    (tmp_path / "store" / "stat-cache" / "keep").write_bytes(b"a format-3 record")
    store = Store.open(tmp_path / "store")
    assert store.layout.format_version == 3
    with store_lock(store.layout, exclusive=False):
        pass
    assert msgspec.json.decode((tmp_path / "store" / "stagestore.json").read_bytes()) == {
        "format": "stagestore", "version": 4}
    assert (tmp_path / "store" / "stat-cache" / "keep").exists()  # format 3's stat cache stays
    assert Store.open(tmp_path / "store").layout.format_version == 4
