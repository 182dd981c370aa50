"""checkout never writes outside DIR, whatever a manifest or tree says."""

from __future__ import annotations

import os

import msgspec
import pytest

from stagestore.inspection.checkout import checkout
from stagestore.errors import StagestoreError
from stagestore.store.hashing import EMPTY_DIGEST, canonical_json
from stagestore.store.manifests import output_hash
from stagestore.model.records import ArtifactRef, TreeEntry, TreeListing
from stagestore.execution.runner import run


def _listing(tmp_path):
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))


@pytest.fixture
def done(ws):
    ws.linear()
    store = ws.open_store()
    run(ws.load(), store, run_id="a")
    return ws, store


def _rewrite(ws, stage, mutate):
    path = ws.store / "runs" / "a" / f"{stage}.json"
    raw = msgspec.json.decode(path.read_bytes())
    mutate(raw)
    os.chmod(path, 0o644)
    path.write_bytes(msgspec.json.encode(raw))


def test_checkout_copies_outputs_with_their_bytes(done, tmp_path):
    ws, store = done
    written = checkout(store, "a", "make", tmp_path / "out")
    assert written == [str(tmp_path / "out" / "out")]
    assert (tmp_path / "out" / "out" / "f1.txt").read_text() == "file 1\n!"
    tree = store.manifests.read("a", "make").outputs["out"].hash
    from stagestore.store.trees import read_tree

    for entry in read_tree(store.objects, tree).entries:
        if entry.hash is not None:  # copied, never linked out (views/ may hold other links)
            copy = tmp_path / "out" / "out" / entry.path
            assert copy.stat().st_ino != store.objects.path(entry.hash).stat().st_ino


@pytest.mark.parametrize("name", ["../evil", "/tmp/evil", "a/b", "..", ""])
def test_an_escaping_output_name_in_a_manifest_is_refused(done, tmp_path, name):
    ws, store = done

    def mutate(raw):
        raw["outputs"] = {name: raw["outputs"]["n"]}

    _rewrite(ws, "count", mutate)
    before = _listing(tmp_path)
    with pytest.raises(StagestoreError):
        checkout(store, "a", "count", tmp_path / "dest" / "inner")
    after = [p for p in _listing(tmp_path) if not p.startswith("dest")]
    assert after == [p for p in before if not p.startswith("dest")]
    result = ws.cli("checkout", "a", "count", "--to", str(tmp_path / "dest2"))
    assert result.returncode != 0 and result.stderr.startswith("error:")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("path", ["../../escaped", "ok/../../escaped", "/abs/escaped"])
def test_an_escaping_path_inside_a_tree_is_refused(done, tmp_path, path):
    ws, store = done
    listing = TreeListing(entries=[TreeEntry(path=path, kind="file", size=0, hash=EMPTY_DIGEST)])
    store.objects.put_bytes(b"", "test")
    tree = store.objects.put_bytes(canonical_json(listing), "test")
    outputs = {"out": ArtifactRef(hash=tree, size=0, kind="tree")}

    def mutate(raw):
        raw["outputs"] = {"out": {"hash": tree, "size": 0, "kind": "tree"}}
        raw["output_hash"] = output_hash(outputs)

    _rewrite(ws, "make", mutate)
    dest = tmp_path / "a" / "b" / "dest"
    with pytest.raises(StagestoreError):
        checkout(store, "a", "make", dest)
    assert not any("escaped" in p for p in _listing(tmp_path))
    assert not (dest / "out").exists()
