"""A push that stops at any point leaves the remote consistent: no remote manifest names an
object the remote lacks, and pushing again completes it.  Swept over every write of a push
(in process, a folder remote), and once for real: a push killed with SIGKILL against SeaweedFS.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import Workspace
from test_cli import ok
from test_remote import Remote, cli, remote_keys

from stagestore.model.records import (ItemRecord, RunRecord, StageManifest, TreeListing,
                                      decode_record)
from stagestore.remote.remotes import parse_run_key
from stagestore.remote.storage import FileStorage, Storage, pages_flat


class Stopped(BaseException):
    """The pushing process died here (a BaseException, as a kill is not an error to handle)."""


class DyingStorage(Storage):
    """A folder storage whose process dies at its `limit`-th write: that write and every one
    after it (in any thread) never happen."""

    def __init__(self, inner: FileStorage, limit: int) -> None:
        self.inner = inner
        self.url = inner.url
        self.limit = limit
        self.writes = 0

    def _tick(self) -> None:
        self.writes += 1
        if self.writes >= self.limit:
            raise Stopped()

    def read(self, key):  # noqa: ANN001, ANN201
        return self.inner.read(key)

    def read_chunks(self, key):  # noqa: ANN001, ANN201
        return self.inner.read_chunks(key)

    def write(self, key, data):  # noqa: ANN001, ANN201
        self._tick()
        return self.inner.write(key, data)

    def write_file(self, key, path, size):  # noqa: ANN001, ANN201
        self._tick()
        return self.inner.write_file(key, path, size)

    def create(self, key, data):  # noqa: ANN001, ANN201
        self._tick()
        return self.inner.create(key, data)

    def list(self, prefix):  # noqa: ANN001, ANN201
        return self.inner.list(prefix)

    def stat(self, key):  # noqa: ANN001, ANN201
        return self.inner.stat(key)

    def delete(self, key):  # noqa: ANN001, ANN201
        self._tick()
        return self.inner.delete(key)


def dangling(storage: Storage) -> list[str]:
    """Every (key, object) where a remote manifest or record names an object not on the remote
    (the files inside folder outputs included)."""
    keys = [info.key for info in pages_flat(storage.list(""))]
    objects = {"blake3:" + k[len("objects/"):].replace("/", "") for k in keys
               if k.startswith("objects/")}
    problems = []
    for key in keys:
        if not key.startswith("runs/"):
            continue
        run_id = key.split("/")[1]
        kind = parse_run_key(run_id, key)
        assert kind is not None, key
        data = storage.read(key)
        if kind.stage is not None:
            m: StageManifest = decode_record(data, StageManifest, key)
            refs = [*m.outputs.values(), *m.inputs.values()]
            named = {r.hash for r in refs} | {h for log in m.logs for h in (log.stdout, log.stderr)}
        else:
            record = decode_record(data, RunRecord if kind.item is None else ItemRecord, key)
            refs = [r for group in record.inputs.values() for r in group.values()]
            named = {r.hash for r in refs}
        for ref in refs:
            if ref.kind == "tree" and ref.hash in objects:
                tree = storage.read("objects/" + ref.hash[7:9] + "/" + ref.hash[9:])
                named |= {e.hash for e in decode_record(tree, TreeListing, "tree").entries if e.hash}
        problems += [f"{key} -> {digest}" for digest in sorted(named - objects)]
    return problems


@pytest.fixture
def item_ws(ws) -> Workspace:  # noqa: ANN001
    """The linear pipeline plus a per-item stage, so records, trees and item manifests exist."""
    ws.linear(files=4)
    text = ws.pipeline_file.read_text() + """
[stages.each]
upstream = ["make"]
cmd = "python -c \\"import sys; open(sys.argv[1], 'w').write('{item}')\\" {outputs.o}"
outputs = ["o"]
"""
    ws.pipeline(text)
    ws.write("items.txt", "a\nb\n")
    return ws


def test_a_push_stopped_at_any_write_leaves_the_remote_consistent(item_ws, tmp_path):
    from stagestore.store.store import Store
    from stagestore.remote.transfer import Transfer

    ok(item_ws.cli("run", "--run-id", "r1", "--items", "items.txt"))
    store = Store.open(item_ws.store)
    total = DyingStorage(FileStorage(tmp_path / "count"), 10**9)
    Transfer(store, "origin", total).push(["r1"])
    assert total.writes > 20  # objects, manifests, cache entries, records
    for limit in range(1, total.writes + 1):
        inner = FileStorage(tmp_path / f"remote-{limit}")
        with pytest.raises(Stopped):
            Transfer(store, "origin", DyingStorage(inner, limit), jobs=1).push(["r1"])
        assert dangling(inner) == [], f"stopped at write {limit}"
        report = Transfer(store, "origin", inner).push(["r1"])
        assert report.ok, (limit, report)
        assert dangling(inner) == []
        listed = {info.key for info in pages_flat(inner.list("runs/r1/"))}
        expected = {info.key for info in pages_flat(FileStorage(tmp_path / "count").list("runs/r1/"))}
        assert listed == expected, f"stopped at write {limit}"


def test_a_push_killed_midway_leaves_no_manifest_naming_a_missing_object(ws, s3_bucket, tmp_path):
    ws.linear(files=300)  # make's folder output: 300 file objects to send
    ok(ws.cli("run", "--run-id", "r1"))
    remote = Remote(f"s3://{s3_bucket.bucket}/p", s3_bucket.endpoint,
                    {"AWS_ACCESS_KEY_ID": s3_bucket.access_key,
                     "AWS_SECRET_ACCESS_KEY": s3_bucket.secret_key,
                     "AWS_REGION": s3_bucket.region})
    ok(cli(ws, remote, *remote.add_args()))
    env = {**{k: v for k, v in os.environ.items() if k != "STAGESTORE_STORE"}, **remote.env}
    proc = subprocess.Popen([sys.executable, "-m", "stagestore", "push", "--jobs", "1"],
                            cwd=ws.root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(remote_keys(remote, "objects/")) < 20:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    sent = len(remote_keys(remote, "objects/"))
    assert 20 <= sent < 300, sent  # killed midway, not before or after
    assert dangling(remote.storage()) == []
    ok(cli(ws, remote, "verify", "--remote", "origin"))
    ok(cli(ws, remote, "push"))
    ok(cli(ws, remote, "verify", "--remote", "origin"))
    assert len(remote_keys(remote, "runs/r1/")) == 4  # three manifests and the run record
