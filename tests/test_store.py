"""Objects, trees, records and names: the store's lower layers."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime

import blake3
import msgspec
import pytest

from stagestore.errors import CorruptRecordError, FormatVersionError, InvalidNameError, OutputError
from stagestore.store.hashing import EMPTY_DIGEST, canonical_json, digest_bytes, hash_file
from stagestore.store.layout import contained, validate_name, validate_relpath
from stagestore.store.objects import SyncBatch
from stagestore.model.records import (MANIFEST_SCHEMA_VERSION, ArtifactRef, PipelineRef,
                                      StageManifest, TreeEntry, TreeListing, decode_record,
                                      encode_record)
from stagestore.store.store import Store
from stagestore.store.trees import hash_artifact, read_tree, store_tree


@pytest.fixture
def store(tmp_path):
    return Store.create(tmp_path / "store")


def test_create_is_idempotent_and_writes_format_and_readme(tmp_path):
    Store.create(tmp_path / "s")
    Store.create(tmp_path / "s")
    assert (tmp_path / "s" / "stagestore.json").read_bytes().startswith(b"{")
    assert "docs/format.md" in (tmp_path / "s" / "README.md").read_text()


def test_open_refuses_a_newer_store_format(tmp_path):
    Store.create(tmp_path / "s")
    (tmp_path / "s" / "stagestore.json").write_text('{"format":"stagestore","version":99}')
    with pytest.raises(FormatVersionError, match="99"):
        Store.open(tmp_path / "s")


def test_put_bytes_names_object_by_blake3_and_makes_it_read_only(store):
    digest = store.objects.put_bytes(b"hello", "test")
    assert digest == "blake3:" + blake3.blake3(b"hello").hexdigest()
    path = store.objects.path(digest)
    assert path.read_bytes() == b"hello"
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert path.parent.name + path.name == digest.removeprefix("blake3:")


def test_hash_file_matches_blake3_for_small_and_large_files(tmp_path):
    for size in (0, 100, (1 << 20) + 3, (17 << 20) + 5):
        path = tmp_path / f"f{size}"
        data = os.urandom(size)
        path.write_bytes(data)
        assert hash_file(path) == digest_bytes(data)


def test_commit_file_renames_without_copying(store, tmp_path):
    tmp = store.layout.tmp / "test~x~out"
    tmp.write_bytes(b"content")
    inode = tmp.stat().st_ino
    digest, size = store.objects.commit_file(tmp, "test")
    assert size == 7 and not tmp.exists()
    assert store.objects.path(digest).stat().st_ino == inode


def test_commit_file_copies_a_hard_linked_file_and_leaves_the_original_alone(store, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"shared bytes")
    os.chmod(outside, 0o640)
    linked = store.layout.tmp / "test~x~linked"
    os.link(outside, linked)
    digest, _ = store.objects.commit_file(linked, "test")
    obj = store.objects.path(digest)
    assert obj.stat().st_ino != outside.stat().st_ino
    assert stat.S_IMODE(outside.stat().st_mode) == 0o640
    assert outside.read_bytes() == b"shared bytes"
    assert obj.stat().st_nlink == 1


def test_ingest_file_copies_and_leaves_the_source(store, tmp_path):
    src = tmp_path / "input.txt"
    src.write_bytes(b"input")
    digest, _ = store.objects.ingest_file(src, "test")
    assert src.exists() and store.objects.path(digest).stat().st_ino != src.stat().st_ino


def _folder(root, files):
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_tree_is_independent_of_mtimes_and_creation_order(store, tmp_path):
    a = _folder(tmp_path / "a", {"x/1": b"1", "y": b"2", "x/2": b"3"})
    b = _folder(tmp_path / "b", {"x/2": b"3", "y": b"2", "x/1": b"1"})
    os.utime(b / "y", (0, 0))
    assert hash_artifact(a, "a") == hash_artifact(b, "b")
    batch = SyncBatch()
    ref = store_tree(a, store.objects, "test", batch, move=False, what="a")
    batch.flush()
    assert ref == hash_artifact(b, "b")
    assert [e.path for e in read_tree(store.objects, ref.hash).entries] == ["x", "x/1", "x/2", "y"]


def test_tree_keeps_empty_files_empty_folders_and_the_executable_bit(store, tmp_path):
    root = _folder(tmp_path / "t", {"empty": b"", "run.sh": b"#!/bin/sh\n"})
    (root / "hollow").mkdir()
    os.chmod(root / "run.sh", 0o755)
    batch = SyncBatch()
    ref = store_tree(root, store.objects, "test", batch, move=False, what="t")
    entries = {e.path: e for e in read_tree(store.objects, ref.hash).entries}
    assert entries["empty"].hash == EMPTY_DIGEST and entries["empty"].size == 0
    assert entries["hollow"].kind == "dir"
    assert entries["run.sh"].executable and not entries["empty"].executable


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_outputs_refuse_symlinks_and_fifos(store, tmp_path, kind):
    root = _folder(tmp_path / "t", {"a": b"a"})
    if kind == "symlink":
        os.symlink("/etc/passwd", root / "link")
    else:
        os.mkfifo(root / "pipe")
    with pytest.raises(OutputError):
        store_tree(root, store.objects, "test", SyncBatch(), move=True, what="output")


def test_canonical_encoding_ignores_insertion_order():
    assert canonical_json({"b": 1, "a": {"y": 2, "x": 1}}) == canonical_json({"a": {"x": 1, "y": 2}, "b": 1})


def _manifest(**overrides):
    fields = dict(stage="s", run_id="r", pipeline=PipelineRef(name="p", version="1"),
                  status="failed", input_hash=EMPTY_DIGEST, config_hash=EMPTY_DIGEST,
                  output_hash=None, inputs={}, outputs={}, started_at=datetime.now(UTC),
                  finished_at=datetime.now(UTC), attempts=1)
    fields.update(overrides)
    return StageManifest(**fields)


def test_manifest_round_trips():
    manifest = _manifest(inputs={"inputs.a": ArtifactRef(hash=EMPTY_DIGEST, size=0, kind="file")})
    assert decode_record(encode_record(manifest), StageManifest, "m") == manifest


def test_newer_manifest_is_refused_naming_both_versions():
    raw = msgspec.json.decode(encode_record(_manifest()))
    raw["schema_version"] = MANIFEST_SCHEMA_VERSION + 1
    with pytest.raises(FormatVersionError) as err:
        decode_record(msgspec.json.encode(raw), StageManifest, "m.json")
    assert str(MANIFEST_SCHEMA_VERSION + 1) in str(err.value) and str(MANIFEST_SCHEMA_VERSION) in str(err.value)


def test_unknown_manifest_field_is_corrupt():
    raw = msgspec.json.decode(encode_record(_manifest()))
    raw["surprise"] = 1
    with pytest.raises(CorruptRecordError, match="surprise"):
        decode_record(msgspec.json.encode(raw), StageManifest, "m.json")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/abs", "a\x00b", "-x", "x" * 129, "é"])
def test_invalid_names_are_refused(name):
    with pytest.raises(InvalidNameError):
        validate_name(name)


@pytest.mark.parametrize("path", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/.",
                                  "a\\b", "a\x00", "x" * 256, "\udcff"])
def test_invalid_tree_paths_are_refused(path):
    with pytest.raises(InvalidNameError):
        validate_relpath(path)


def test_containment_is_checked_on_resolved_paths(tmp_path):
    (tmp_path / "dest").mkdir()
    os.symlink(tmp_path, tmp_path / "dest" / "up")
    with pytest.raises(InvalidNameError, match="outside"):
        contained(tmp_path / "dest", "up/escape")


def test_read_tree_refuses_hostile_listings(store):
    for version in (1, 2):  # flat, and a tree of trees
        bad = TreeListing(schema_version=version,
                          entries=[TreeEntry(path="../evil", kind="file", hash=EMPTY_DIGEST)])
        digest = store.objects.put_bytes(canonical_json(bad), "test")
        with pytest.raises(CorruptRecordError, match="evil"):
            read_tree(store.objects, digest)
    unsorted = TreeListing(schema_version=1, entries=[TreeEntry(path="b", kind="dir"),
                                                      TreeEntry(path="a", kind="dir")])
    digest = store.objects.put_bytes(canonical_json(unsorted), "test")
    with pytest.raises(CorruptRecordError, match="sorted"):
        read_tree(store.objects, digest)
    sub = store.objects.put_bytes(canonical_json(TreeListing(entries=[])), "test")
    for entries, why in (
            ([TreeEntry(path="b", kind="dir", hash=sub), TreeEntry(path="a", kind="dir", hash=sub)],
             "sorted"),
            ([TreeEntry(path="a/b", kind="file", hash=EMPTY_DIGEST)], "single name"),
            ([TreeEntry(path="a", kind="dir")], "no valid hash")):
        digest = store.objects.put_bytes(canonical_json(TreeListing(entries=entries)), "test")
        with pytest.raises(CorruptRecordError, match=why):
            read_tree(store.objects, digest)
    # A version-2 tree naming a flat tree as its subtree is refused too.
    flat = store.objects.put_bytes(canonical_json(TreeListing(schema_version=1, entries=[])), "test")
    digest = store.objects.put_bytes(canonical_json(TreeListing(entries=[
        TreeEntry(path="a", kind="dir", hash=flat)])), "test")
    with pytest.raises(CorruptRecordError, match="not a version-2 tree"):
        read_tree(store.objects, digest)


def test_linking_an_object_survives_a_concurrent_replacement(tmp_path, monkeypatch):
    """Regression: a stage's input view failed with InputMissingFailure when another item
    committed the same content at the moment it was linked (Linux link(2) returns ENOENT for an
    inode that just lost its last name, although the object's path never stops existing)."""
    from stagestore.store import durable

    source = tmp_path / "object"
    source.write_bytes(b"ok\n")
    real_link = os.link
    calls = []

    def racing_link(src, dst):  # noqa: ANN001
        calls.append(src)
        if len(calls) == 1:  # what the kernel reports mid-rename
            raise FileNotFoundError(2, "No such file or directory", str(src))
        real_link(src, dst)

    monkeypatch.setattr(os, "link", racing_link)
    durable.temp_link(source, tmp_path / "view")
    assert len(calls) == 2 and (tmp_path / "view").read_bytes() == b"ok\n"
    # A source that is really gone is still an error, at once.
    calls.clear()
    with pytest.raises(FileNotFoundError):
        durable.temp_link(tmp_path / "gone", tmp_path / "view2")
    assert len(calls) == 1


def test_concurrent_commits_of_one_content_never_break_a_view(tmp_path):
    """Two threads commit the same bytes over and over while two others keep linking the object
    into views: no link may fail.  (Without the retry in `durable.temp_link` this loses about
    one link in a hundred on Linux.)"""
    import threading

    from stagestore.store import durable
    from stagestore.store.store import Store

    store = Store.create(tmp_path / "store")
    digest = store.objects.put_bytes(b"same\n", "t")
    errors: list[OSError] = []
    links = []
    done = threading.Event()

    def commit(n: int) -> None:
        for i in range(200):
            path = store.layout.new_tmp_path("t", f"c{n}.{i}")
            path.write_bytes(b"same\n")
            store.objects.commit_file(path, "t")

    def link(n: int) -> None:
        i = 0
        while not done.is_set():
            i += 1
            view = tmp_path / f"v{n}.{i}"
            try:
                durable.temp_link(store.objects.path(digest), view)
                os.unlink(view)
            except OSError as exc:
                errors.append(exc)
        links.append(i)

    committers = [threading.Thread(target=commit, args=(n,)) for n in range(2)]
    linkers = [threading.Thread(target=link, args=(n,)) for n in range(2)]
    for thread in committers + linkers:
        thread.start()
    for thread in committers:
        thread.join()
    done.set()
    for thread in linkers:
        thread.join()
    assert errors == [] and sum(links) > 100


def _many_files(store, count: int, outside=None):  # noqa: ANN001, ANN202
    folder = store.layout.tmp / "test~x~out"
    folder.mkdir()
    for i in range(count):
        (folder / f"f{i:03}").write_bytes(b"same" if i % 2 else f"file {i}".encode())
    if outside is not None:
        os.link(outside, folder / "linked")
    return folder


def test_a_folder_of_many_files_is_synced_once_then_renamed(store, tmp_path):
    """From SYNCFS_MIN_FILES files on: hash and chmod each, one syncfs, then the renames; no
    per-file fsync, no copy of any byte (same inodes), and a hard-linked file is still copied."""
    from stagestore.store import durable
    from stagestore.store.objects import SYNCFS_MIN_FILES

    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"shared")
    os.chmod(outside, 0o644)
    folder = _many_files(store, SYNCFS_MIN_FILES + 8, outside)
    inodes = {p.name: p.stat().st_ino for p in folder.iterdir()}
    ops = []
    durable.set_recorder(lambda op, path, src: ops.append(
        (op, os.path.basename(src if op == "rename" else path))))
    try:
        ref = store_tree(folder, store.objects, "test", SyncBatch(), move=True, what="out")
    finally:
        durable.set_recorder(None)
    own = [(op, name) for op, name in ops if name in inodes and name != "linked"]
    synced_at = ops.index(("syncfs", "test~x~out"))
    assert [op for op, _ in ops].count("syncfs") == 1
    assert not [name for op, name in ops if op == "fsync" and name in inodes]  # no per-file fsync
    # every file of the folder chmod-ed before the sync and renamed after it
    assert {op for op, _ in own} == {"chmod", "rename"}
    assert all((ops.index(entry) < synced_at) == (entry[0] == "chmod") for entry in own)
    listing = read_tree(store.objects, ref.hash)
    renamed = {store.objects.path(e.hash).stat().st_ino for e in listing.entries}
    for entry in listing.entries:
        obj = store.objects.path(entry.hash)
        assert stat.S_IMODE(obj.stat().st_mode) == 0o444 and obj.stat().st_nlink == 1
        if entry.path != "linked":  # one of the files of that content, renamed, not copied
            assert obj.stat().st_ino in set(inodes.values())
    count = SYNCFS_MIN_FILES + 8
    assert len(renamed) == count // 2 + 2  # distinct contents: the even files, "same", "shared"
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644 and outside.read_bytes() == b"shared"


def test_a_failed_syncfs_renames_nothing_into_the_store(store, monkeypatch):
    """A failed sync is never retried and trusted: the error surfaces and no file of the folder
    became an object."""
    import errno

    from stagestore.store import durable
    from stagestore.store.objects import SYNCFS_MIN_FILES

    folder = _many_files(store, SYNCFS_MIN_FILES)
    before = set(store.objects.list())

    def hook(op: str, path: str) -> None:
        if op == "syncfs":
            raise OSError(errno.EIO, "injected", path)

    durable.set_fault_hook(hook)
    try:
        with pytest.raises(OSError):
            store_tree(folder, store.objects, "test", SyncBatch(), move=True, what="out")
    finally:
        durable.set_fault_hook(None)
    assert set(store.objects.list()) == before
    assert len(list(folder.iterdir())) == SYNCFS_MIN_FILES


def test_a_large_folder_input_is_copied_then_synced_once(store, tmp_path):
    """From SYNCFS_MIN_FILES files on, an input folder's copies are not fsynced one by one: one
    syncfs makes them durable, and only then are they renamed into the store.  The workspace
    files are left as they were, and a second snapshot copies nothing."""
    from stagestore.store import durable
    from stagestore.store.objects import SYNCFS_MIN_FILES

    source = tmp_path / "input"
    source.mkdir()
    for i in range(2 * SYNCFS_MIN_FILES + 8):  # SYNCFS_MIN_FILES distinct contents and more
        (source / f"f{i:03}").write_bytes(b"same" if i % 2 else f"input {i}".encode())
    before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in source.iterdir()}
    ops = []
    durable.set_recorder(lambda op, path, src: ops.append((op, os.path.basename(path))))
    try:
        ref = store_tree(source, store.objects, "test", SyncBatch(), move=False, what="input")
    finally:
        durable.set_recorder(None)
    kinds = [op for op, _ in ops]
    assert kinds.count("syncfs") == 1
    synced_at = kinds.index("syncfs")
    renames = [i for i, op in enumerate(kinds) if op == "rename"]
    assert renames and min(renames) > synced_at  # every copy durable before any rename
    assert not [name for op, name in ops if op == "fsync" and "snapshot" in name]
    listing = read_tree(store.objects, ref.hash)
    for entry in listing.entries:
        assert store.objects.path(entry.hash).read_bytes() == (source / entry.path).read_bytes()
    assert {p.name: (p.stat().st_ino, p.read_bytes()) for p in source.iterdir()} == before
    assert list(store.layout.tmp.iterdir()) == []
    ops.clear()
    durable.set_recorder(lambda op, path, src: ops.append(op))
    try:
        again = store_tree(source, store.objects, "test", SyncBatch(), move=False, what="input")
    finally:
        durable.set_recorder(None)
    assert again == ref and "write" not in ops and "syncfs" not in ops


def test_rmtree_removes_what_a_stage_leaves_and_never_follows_a_symlink(tmp_path):
    from stagestore.store import durable

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    folder = tmp_path / "attempt"
    (folder / "in" / "inputs" / "src").mkdir(parents=True)
    (folder / "in" / "inputs" / "src" / "a.txt").write_text("a")
    (folder / "out" / "deep" / "er").mkdir(parents=True)
    (folder / "out" / "deep" / "er" / "f").write_text("f")
    (folder / "out" / "link").symlink_to(outside)  # a symlink to a folder: removed, not followed
    (folder / "out" / "ro").mkdir()
    (folder / "out" / "ro" / "x").write_text("x")
    os.chmod(folder / "out" / "ro", 0o555)  # a read-only folder (a non-root user takes the fallback)
    (folder / "stdout").write_bytes(b"")
    durable.rmtree(folder)
    assert not folder.exists()
    assert (outside / "keep.txt").read_text() == "keep"


def test_objects_found_present_cost_one_syncfs_per_process_not_a_folder_fsync_each(tmp_path, monkeypatch):
    # An object found present may have been renamed in by a process that died before it
    # fsynced the folder.  Once this process has completed a syncfs, every object whose ctime
    # is older than that syncfs's start (by the margin) has a durable entry: no fsync for it.
    import time

    import stagestore.store.objects as objects_module
    from stagestore.store import durable

    if not durable.syncfs(tmp_path):
        pytest.skip("no syncfs(2) here: every present object costs its folder's fsync")
    created = Store.create(tmp_path / "store")
    old = [created.objects.put_bytes(b"old %d" % k, "t") for k in range(3)]
    monkeypatch.setattr(objects_module, "SYNCED_MARGIN_NS", 20_000_000)  # 20 ms, not 2 s
    time.sleep(0.05)
    store = Store.open(tmp_path / "store")  # a fresh process's view: nothing confirmed yet
    ops: list[tuple[str, str]] = []
    previous = durable.set_recorder(lambda op, path, src: ops.append((op, path)))
    try:
        for k, digest in enumerate(old):
            assert store.objects.put_bytes(b"old %d" % k, "t") == digest
        assert [op for op, _ in ops] == ["syncfs"]
        ops.clear()
        # Put in place after that syncfs (here by another store object, as another process
        # would): its entry may not be durable, so its folder is fsynced once.
        fresh = created.objects.put_bytes(b"fresh", "t")
        ops.clear()
        assert store.objects.put_bytes(b"fresh", "t") == fresh
        assert [op for op, _ in ops] == ["fsync_dir"]
    finally:
        durable.set_recorder(previous)
