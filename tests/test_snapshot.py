"""Folder inputs at scale (issue 15): trees of trees and the per-folder stat cache.

A 20,000-file input (100,000 behind `slow`) in 100 folders, with one file changed, one added,
one removed and one renamed between two runs: the stage sees exactly the new content, the
manifest's tree equals a tree hashed here independently (blake3 and JSON by hand, not with
stagestore's code), only the files that changed are read, and only the records of the folders
that changed are rewritten.  docs/format.md specifies the trees and the stat cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import blake3
import msgspec
import pytest

from stagestore.execution.runner import run
from stagestore.store import durable
from stagestore.store import objects as objects_module
from stagestore.store.layout import FORMAT_VERSION
from stagestore.store.statcache import RACY_NS

FOLDERS = 100

# The stage lists what it sees: every file below its input with the sha256 of its bytes.
LISTER = """
import hashlib, os, sys
root, out = sys.argv[1], sys.argv[2]
lines = []
for folder, dirs, files in os.walk(root):
    for name in files:
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        lines.append(os.path.relpath(path, root) + " " + digest)
with open(out, "w") as f:
    f.write("\\n".join(sorted(lines)) + "\\n")
"""


@pytest.fixture
def settled(monkeypatch):
    """The wall clock as if the run came a while after the files were last changed."""
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() + RACY_NS + 1_000_000_000)


@pytest.fixture
def read(monkeypatch):
    """The workspace files read to be hashed, as paths relative to the workspace."""
    seen: list[str] = []
    real_read, real_hash = objects_module.read_source, objects_module.hash_source

    def reading(path, size):  # noqa: ANN001, ANN202
        seen.append(path)
        return real_read(path, size)

    def hashing(path, size):  # noqa: ANN001, ANN202
        seen.append(path)
        return real_hash(path, size)

    monkeypatch.setattr(objects_module, "read_source", reading)
    monkeypatch.setattr(objects_module, "hash_source", hashing)
    return seen


def _workspace(ws, files: int) -> Path:  # noqa: ANN001
    data = ws.root / "data"
    per = files // FOLDERS
    for d in range(FOLDERS):
        folder = data / f"d{d:03}"
        folder.mkdir(parents=True)
        for f in range(per):
            (folder / f"f{f:05}.txt").write_bytes(f"document {d}/{f} ".encode() * 5)
    (data / "top.txt").write_bytes(b"top level\n")
    (data / "empty").mkdir()
    ws.pipeline(f"""
        [pipeline]
        name = "snapshot"

        [stages.list]
        cmd = {json.dumps([sys.executable, "-c", LISTER, "{inputs.data}", "{outputs.listing}"])}
        inputs = {{ data = "data" }}
        outputs = ["listing"]
        """)
    return data


def _expected_listing(root: Path) -> str:
    lines = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            lines.append(f"{path.relative_to(root)} {hashlib.sha256(path.read_bytes()).hexdigest()}")
    return "\n".join(sorted(lines)) + "\n"


def independent_tree(folder: Path) -> tuple[str, int]:
    """The version-2 tree digest of `folder` and its bytes, by the spec in docs/format.md."""
    entries = []
    total = 0
    for name in sorted(os.listdir(folder)):
        path = folder / name
        if path.is_dir():
            digest, size = independent_tree(path)
            entries.append({"executable": False, "hash": digest, "kind": "dir", "path": name,
                            "size": size})
        else:
            data = path.read_bytes()
            size = len(data)
            entries.append({"executable": bool(path.stat().st_mode & 0o100),
                            "hash": "blake3:" + blake3.blake3(data).hexdigest(), "kind": "file",
                            "path": name, "size": size})
        total += size
    doc = json.dumps({"entries": entries, "schema_version": 2}, sort_keys=True,
                     separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return "blake3:" + blake3.blake3(doc).hexdigest(), total


def _listing_of(ws, run_id: str) -> str:  # noqa: ANN001
    store = ws.open_store()
    return store.objects.read_bytes(store.manifests.read(run_id, "list").outputs["listing"].hash).decode()


def _check_changes(ws, read, files: int) -> None:  # noqa: ANN001
    data = _workspace(ws, files)
    assert run(ws.load(), ws.open_store(), run_id="a").ok
    assert len(read) == files + 1
    first = ws.open_store().manifests.read("a", "list").inputs["inputs.data"]
    assert first.hash == independent_tree(data)[0]

    changed, added = data / "d003" / "f00010.txt", data / "d007" / "new.txt"
    removed, renamed = data / "d011" / "f00005.txt", data / "d013" / "f00001.txt"
    with open(changed, "ab") as f:
        f.write(b"changed\n")
    added.write_bytes(b"a new document\n")
    removed.unlink()
    renamed.rename(data / "d013" / "renamed.txt")
    read.clear()
    rewritten: list[str] = []
    durable.set_recorder(lambda op, path, src: rewritten.append(path)
                         if op == "rename" and "/stat-cache/" in path else None)
    try:
        report = run(ws.load(), ws.open_store(), run_id="b")
    finally:
        durable.set_recorder(None)
    assert report.ok and [s.outcome for s in report.stages] == ["succeeded"]
    # Only what changed was read: the changed, the added and the renamed file.
    assert sorted(Path(p).relative_to(data).as_posix() for p in read) == [
        "d003/f00010.txt", "d007/new.txt", "d013/renamed.txt"]
    # The records of the four folders that changed and of the top folder, nothing else.
    assert len(rewritten) == 5
    # The stage saw exactly the new content.
    assert _listing_of(ws, "b") == _expected_listing(data)
    store = ws.open_store()
    ref = store.manifests.read("b", "list").inputs["inputs.data"]
    assert (ref.hash, ref.size) == independent_tree(data)
    # Trees of trees: every unchanged folder kept its subtree.
    from stagestore.store.trees import read_tree, read_tree_object

    old = {e.path: e.hash for e in read_tree_object(store.objects, first.hash).entries}
    new = {e.path: e.hash for e in read_tree_object(store.objects, ref.hash).entries}
    assert sorted(name for name in new if new[name] != old.get(name)) == [
        "d003", "d007", "d011", "d013"]
    flat = read_tree(store.objects, ref.hash)
    assert [e.path for e in flat.entries] == sorted(e.path for e in flat.entries)
    assert {e.path for e in flat.entries if e.kind == "file"} == {
        p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file()}
    # A third run reads nothing and executes nothing.
    read.clear()
    report = run(ws.load(), ws.open_store(), run_id="c")
    assert [s.outcome for s in report.stages] == ["cached"] and read == []


def test_a_changed_large_folder_is_snapshotted_exactly(ws, read, settled):
    _check_changes(ws, read, 20_000)


@pytest.mark.slow
def test_a_changed_100000_file_folder_is_snapshotted_exactly(ws, read, settled):
    _check_changes(ws, read, 100_000)


def test_status_reads_the_stat_cache_and_writes_nothing(ws, read, settled):
    from stagestore.inspection.status import status

    data = _workspace(ws, 1_000)
    assert run(ws.load(), ws.open_store(), run_id="a").ok
    records = {p.name: p.read_bytes() for p in (ws.store / "stat-cache").iterdir()}
    read.clear()
    report = status(ws.load(), ws.open_store())
    assert [r.would_execute for r in report.stages] == [False] and read == []
    (data / "d042" / "f00003.txt").write_bytes(b"edited")
    report = status(ws.load(), ws.open_store())
    assert [r.would_execute for r in report.stages] == [True]
    assert [Path(p).name for p in read] == ["f00003.txt"]
    assert {p.name: p.read_bytes() for p in (ws.store / "stat-cache").iterdir()} == records


def test_an_unchanged_folder_whose_tree_object_is_gone_is_stored_again(ws, read, settled):
    """The stat cache names a folder's tree; if that object is missing, the tree is rebuilt
    from the record (no file read) and stored again."""
    data = _workspace(ws, 200)
    assert run(ws.load(), ws.open_store(), run_id="a").ok
    store = ws.open_store()
    ref = store.manifests.read("a", "list").inputs["inputs.data"]
    path = store.objects.path(ref.hash)
    os.chmod(path, 0o644)
    path.unlink()
    read.clear()
    assert run(ws.load(), ws.open_store(), run_id="b", force=True).ok
    assert read == [] and store.objects.exists(ref.hash)
    assert ref.hash == independent_tree(data)[0]


def test_gc_clears_the_stat_cache_before_deleting_objects(ws, read, settled):
    """After gc deleted objects, no stat-cache record may name one: the next run reads the
    files again and stores what gc removed."""
    from stagestore.inspection.gc import forget, gc
    from stagestore.inspection.verify import verify

    _workspace(ws, 200)
    assert run(ws.load(), ws.open_store(), run_id="a").ok
    forget(ws.open_store(), ["a"])
    report = gc(ws.open_store())
    assert report.removed
    assert list((ws.store / "stat-cache").iterdir()) == []
    read.clear()
    assert run(ws.load(), ws.open_store(), run_id="b").ok
    assert len(read) == 201
    assert verify(ws.open_store()).ok


def test_a_format_2_store_is_upgraded_and_its_flat_trees_still_read(ws):
    """Format 3 (trees of trees, `stat-cache/`): the first store lock on a format-2 store
    upgrades it in place, drops the derived `stat-cache.json`, and version-1 (flat) trees
    still read."""
    from stagestore.model.records import TreeEntry, TreeListing
    from stagestore.store.hashing import EMPTY_DIGEST, canonical_json
    from stagestore.store.locking import store_lock
    from stagestore.store.store import Store
    from stagestore.store.trees import artifact_present, read_tree

    store = Store.create(ws.store)
    (ws.store / "stagestore.json").write_text('{"format":"stagestore","version":2}\n')
    (ws.store / "stat-cache.json").write_text('{"schema_version":1,"entries":[]}')
    store = Store.open(ws.store)
    with store_lock(store.layout, exclusive=False):
        pass
    assert msgspec.json.decode((ws.store / "stagestore.json").read_bytes())["version"] == FORMAT_VERSION
    assert not (ws.store / "stat-cache.json").exists()
    empty = store.objects.put_bytes(b"", "test")
    assert empty == EMPTY_DIGEST
    flat = TreeListing(schema_version=1, entries=[
        TreeEntry(path="d", kind="dir"), TreeEntry(path="d/e.txt", kind="file", hash=empty)])
    digest = store.objects.put_bytes(canonical_json(flat), "test")
    assert read_tree(store.objects, digest) == flat
    from stagestore.model.records import ArtifactRef

    assert artifact_present(store.objects, ArtifactRef(hash=digest, size=0, kind="tree"))


def test_bad_names_are_refused_in_a_folder_the_stat_cache_knows(ws, settled):
    """Names are checked quickly where a folder is as recorded; a new subfolder with a
    drive-prefixed name is still refused, whatever its files are called."""
    from stagestore.errors import PipelineError

    data = _workspace(ws, 200)
    assert run(ws.load(), ws.open_store(), run_id="a").ok
    (data / "d001" / "C:x").mkdir()
    (data / "d001" / "C:x" / "ok.txt").write_text("fine name, bad folder\n")
    with pytest.raises(PipelineError, match="drive prefix"):
        run(ws.load(), ws.open_store(), run_id="b")


def test_one_store_object_across_a_gc_elsewhere_reads_the_cache_again(ws, read, settled):
    """A long-lived `Store` (the API) must not keep using records that a `gc` through another
    `Store` cleared before deleting their objects."""
    from stagestore.inspection.gc import forget, gc
    from stagestore.inspection.verify import verify

    _workspace(ws, 200)
    store = ws.open_store()
    assert run(ws.load(), store, run_id="a").ok
    forget(ws.open_store(), ["a"])
    assert gc(ws.open_store()).removed
    read.clear()
    assert run(ws.load(), store, run_id="b").ok
    assert len(read) == 201
    assert verify(store).ok
