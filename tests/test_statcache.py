"""The stat cache: a no-op rerun does not hash unchanged workspace inputs again, and never
trusts a stat that could hide a change (docs/format.md, `stat-cache.json`)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from stagestore.store import objects as objects_module
from stagestore.execution.runner import run
from stagestore.store.statcache import RACY_NS

PIPELINE = """
[pipeline]
name = "big-input"

[stages.size]
cmd = "wc -c < {inputs.big} > {outputs.n}"
shell = true
inputs = { big = "big.bin", tree = "tree" }
outputs = ["n"]
"""


@pytest.fixture
def hashed(monkeypatch):
    """The workspace files a snapshot reads to hash them, in order (store-internal copies left
    out): small ones through `read_source`, large ones through `hash_source`."""
    seen: list[str] = []
    real_read, real_hash = objects_module.read_source, objects_module.hash_source

    def reading(path, size):  # noqa: ANN001, ANN202
        seen.append(Path(path).name)
        return real_read(path, size)

    def hashing(path, size):  # noqa: ANN001, ANN202
        seen.append(Path(path).name)
        return real_hash(path, size)

    monkeypatch.setattr(objects_module, "read_source", reading)
    monkeypatch.setattr(objects_module, "hash_source", hashing)
    return seen


@pytest.fixture
def settled(monkeypatch):
    """Pretend the wall clock is RACY_NS + 1 s ahead when entries are recorded, as if the run
    happened a while after the files were last changed (ctime cannot be set back by hand)."""
    real = time.time_ns
    monkeypatch.setattr(objects_module.time, "time_ns", lambda: real() + RACY_NS + 1_000_000_000)


def _workspace(ws) -> None:  # noqa: ANN001
    ws.write("big.bin", "x" * 100_000)
    for i in range(3):
        ws.write(f"tree/f{i}.txt", f"file {i}\n")
    ws.pipeline(PIPELINE)


def _output(ws, run_id: str) -> bytes:  # noqa: ANN001
    store = ws.open_store()
    return store.objects.read_bytes(store.manifests.read(run_id, "size").outputs["n"].hash)


def test_a_rerun_does_not_hash_unchanged_inputs_again(ws, hashed, settled):
    _workspace(ws)
    assert run(ws.load(), ws.open_store(), run_id="a").ok
    assert sorted(hashed) == ["big.bin", "f0.txt", "f1.txt", "f2.txt"]
    hashed.clear()
    report = run(ws.load(), ws.open_store(), run_id="b")
    assert report.ok and [s.outcome for s in report.stages] == ["cached"]
    assert hashed == []
    assert len(os.listdir(ws.store / "stat-cache")) == 2  # the workspace folder and tree/


def test_a_file_changed_within_the_racy_window_is_hashed_again(ws, hashed):
    """Without `settled`, the files were written moments before the first run: racy entries."""
    _workspace(ws)
    assert run(ws.load(), ws.open_store(), run_id="a").ok
    hashed.clear()
    assert run(ws.load(), ws.open_store(), run_id="b").ok
    assert sorted(hashed) == ["big.bin", "f0.txt", "f1.txt", "f2.txt"]


@pytest.mark.parametrize("change", ["same-size-mtime-restored", "replaced-same-stat",
                                    "tree-file-rewritten"])
def test_a_changed_input_is_never_taken_from_the_cache(ws, hashed, settled, change):
    """A change that keeps size and mtime still changes ctime or the inode: hashed again, and
    the stage runs on the new content (the stale result would be the worst lie)."""
    _workspace(ws)
    big = ws.root / "big.bin"
    assert run(ws.load(), ws.open_store(), run_id="a").ok
    assert _output(ws, "a").strip() == b"100000"
    before = os.stat(big)
    if change == "same-size-mtime-restored":
        with open(big, "r+b") as f:
            f.write(b"y")
        os.utime(big, ns=(before.st_atime_ns, before.st_mtime_ns))
        target = "big.bin"
    elif change == "replaced-same-stat":
        new = ws.root / "big.new"
        new.write_bytes(b"z" * 100_000)
        os.utime(new, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.replace(new, big)
        target = "big.bin"
    else:
        f1 = ws.root / "tree" / "f1.txt"
        st = os.stat(f1)
        f1.write_text("FILE 1\n")
        os.utime(f1, ns=(st.st_atime_ns, st.st_mtime_ns))
        target = "f1.txt"
    hashed.clear()
    report = run(ws.load(), ws.open_store(), run_id="b")
    assert report.ok
    assert target in hashed
    assert [s.outcome for s in report.stages] == ["succeeded"]  # executed, not cached
    store = ws.open_store()
    assert store.manifests.read("b", "size").input_hash != store.manifests.read("a", "size").input_hash


def _records(ws) -> list[Path]:  # noqa: ANN001
    return sorted((ws.store / "stat-cache").iterdir())


@pytest.mark.parametrize("damage", ["torn", "flipped", "garbage", "empty", "newer"])
def test_a_damaged_stat_cache_is_ignored_and_rewritten(ws, hashed, settled, damage):
    """A record that fails its checksum (torn by a power loss, a flipped bit) or has another
    version vouches for nothing: every file of its folder is read again, and the record is
    written again whole."""
    from stagestore.model.records import StatCacheFolder
    from stagestore.store.statcache import decode_folder, encode_folder

    _workspace(ws)
    assert run(ws.load(), ws.open_store(), run_id="a").ok
    for record in _records(ws):
        data = record.read_bytes()
        if damage == "torn":
            data = data[:len(data) // 2]
        elif damage == "flipped":
            data = data[:10] + bytes([data[10] ^ 1]) + data[11:]
        elif damage == "garbage":
            data = b'{"schema_version": 2, "files": [5' + b"\0" * 40
        elif damage == "empty":
            data = b""
        else:
            old = decode_folder(data)
            assert old is not None
            data = encode_folder(StatCacheFolder(**{
                f: getattr(old, f) for f in old.__struct_fields__} | {"schema_version": 99}))
        record.write_bytes(data)
    hashed.clear()
    assert run(ws.load(), ws.open_store(), run_id="b").ok
    assert sorted(hashed) == ["big.bin", "f0.txt", "f1.txt", "f2.txt"]  # nothing trusted
    hashed.clear()
    assert run(ws.load(), ws.open_store(), run_id="c").ok
    assert hashed == []  # and it was written again


def test_a_damaged_record_never_makes_a_changed_file_look_unchanged(ws, hashed, settled):
    """The worst case of a torn record: one whose stats still match but whose digests are not
    the files' (a record of another state spliced in).  The checksum refuses it."""
    _workspace(ws)
    assert run(ws.load(), ws.open_store(), run_id="a").ok
    tree_record = next(r for r in _records(ws) if b"f0.txt" in r.read_bytes())
    data = bytearray(tree_record.read_bytes())
    at = data.index(b"blake3:") + len(b"blake3:")
    data[at] = ord("0") if data[at] != ord("0") else ord("1")  # a digest changed, stats kept
    tree_record.write_bytes(bytes(data))
    hashed.clear()
    assert run(ws.load(), ws.open_store(), run_id="b").ok
    assert sorted(hashed) == ["f0.txt", "f1.txt", "f2.txt"]
    store = ws.open_store()
    assert store.manifests.read("b", "size").input_hash == store.manifests.read("a", "size").input_hash


def test_the_legacy_stat_cache_file_is_ignored(ws, hashed, settled):
    """Format 2's `stat-cache.json` is neither read nor trusted by format 3."""
    _workspace(ws)
    ws.store.mkdir(parents=True, exist_ok=True)
    assert run(ws.load(), ws.open_store(), run_id="a").ok
    (ws.store / "stat-cache.json").write_text('{"schema_version": 1, "entries": []}')
    hashed.clear()
    assert run(ws.load(), ws.open_store(), run_id="b").ok
    assert hashed == []


def test_an_entry_whose_object_is_gone_falls_back_to_hashing_and_storing(ws, hashed, settled):
    """The cache names a digest; if gc (or damage) removed that object, the input is hashed and
    stored again rather than named without its bytes."""
    _workspace(ws)
    assert run(ws.load(), ws.open_store(), run_id="a").ok
    store = ws.open_store()
    digest = store.manifests.read("a", "size").inputs["inputs.big"].hash
    path = store.objects.path(digest)
    os.chmod(path, 0o644)
    path.unlink()
    hashed.clear()
    assert run(ws.load(), store, run_id="b").ok
    assert "big.bin" in hashed
    assert store.objects.exists(digest)


def test_the_stat_cache_survives_another_store_instance_saving_beside_it(ws, settled):
    """Two runs saving at once replace one folder's record each, and lose nothing: a file input
    updates its own entry in its folder's record."""
    from stagestore.store.store import Store

    _workspace(ws)
    ws.write("sub/other.bin", "o" * 10)
    first, second = Store.create(ws.store), Store.create(ws.store)
    first.objects.ingest_file(ws.root / "big.bin", "test")
    second.objects.ingest_file(ws.root / "sub" / "other.bin", "test")
    first.objects.stat_cache.save("test")
    second.objects.stat_cache.save("test")
    third = Store.create(ws.store).objects.stat_cache
    for path in (ws.root / "big.bin", ws.root / "sub" / "other.bin"):
        assert third.lookup(str(path), os.stat(path)) is not None


def test_item_inputs_are_remembered_once_at_the_end_of_the_run(ws, hashed, settled):
    """Each item's own inputs are hashed as the item starts; the cache is saved once when the
    run ends (not once per item: a save rewrites the whole file), and a rerun hashes none."""
    from stagestore.store import durable

    for item in ("a", "b", "c"):
        ws.write(f"data/{item}.txt", f"item {item}\n")
    ws.pipeline("""
        [pipeline]
        name = "items"

        [stages.copy]
        cmd = "cp {inputs.src} {outputs.o}"
        shell = true
        inputs = { src = "data/{item}.txt" }
        outputs = ["o"]
        """)
    renames = []
    durable.set_recorder(lambda op, path, src: renames.append(path) if op == "rename" else None)
    try:
        assert run(ws.load(), ws.open_store(), run_id="r1", items=["a", "b", "c"]).ok
    finally:
        durable.set_recorder(None)
    assert sorted(hashed) == ["a.txt", "b.txt", "c.txt"]
    # One record (the folder data/), written once, at the end of the run.
    assert sum("/stat-cache/" in path for path in renames) == 1
    hashed.clear()
    assert run(ws.load(), ws.open_store(), run_id="r2", items=["a", "b", "c"]).ok
    assert hashed == []
