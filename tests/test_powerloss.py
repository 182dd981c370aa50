"""Power loss (invariant 6, and 1-5 and 8 after it): crash images of every prefix of a workload.

A fault-free run of a workload is recorded through the durable seam (`tests/powerloss.py` says
how the filesystem is modelled).  For every prefix P of its K operations, crash images are built
under a metadata policy (which entry changes survive) and a data policy (what an unsynced file
holds), written out as a store, and then:

* invariant 6 on the raw image: every stage reported successful before operation P still has
  its manifest (same output_hash) and its output objects;
* `recover`, which must complete;
* invariants 1-4 and 8 (`check_store`), invariant 6 again, and invariant 5 (`check_rerun`: a
  rerun gives the outputs of the recorded run, and one more executes nothing).

Identical images (with the same reported stages) are checked once.  The base seed is
`STAGESTORE_POWERLOSS_SEED` (default 1729); each image's seed is derived from it and printed
with any failure, together with the workload, P, K, the variant and the next operation.  Images
are written to a tmpfs (/dev/shm) when there is one and checked on two forked workers
(`STAGESTORE_POWERLOSS_WORKERS`).

Fast tier:

* `linear` every prefix x {synced, all} x {dropped, torn, garbage}; `fanout` and `tree50` every
  prefix x {synced, all} x {dropped};
* `linear` killed (a process crash: `Crash` raised at that operation and every later one) at 7
  named points, then `recover`, then a power loss at every prefix of what recover did, x
  {synced, all} x {dropped, torn, garbage}; and once killed then rerun with the same run id;
* the model on tiny hand-written sequences, and two mutations of the seam (a missing folder
  fsync, a missing data fsync) that the checker must catch;
* five regression tests, one per bug this suite found (all fixed; see their comments).

Long tier (`-m slow`): every workload, every prefix x {synced, all, swap} x {dropped, torn,
garbage, mix}, plus random reorderings (`random` x {mix, dropped}, several draws per prefix);
and `linear` (then recover, then a rerun) and `fanout` (then recover) killed at every operation,
each followed by every prefix x {synced, all, swap} x {dropped, torn, garbage}.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

import powerloss
import workloads
from invariants import check_rerun, check_reported_kept, check_store, outputs_of
from powerloss import Recording, recording, seed_for
from stagestore.store import durable
from stagestore.inspection.recover import recover
from stagestore.execution.runner import run
from stagestore.store.store import Store

SEED = int(os.environ.get("STAGESTORE_POWERLOSS_SEED", "1729"))
RANDOM_DRAWS = int(os.environ.get("STAGESTORE_POWERLOSS_DRAWS", "4"))
WORKERS = int(os.environ.get("STAGESTORE_POWERLOSS_WORKERS", str(min(2, os.cpu_count() or 1))))


class Crash(BaseException):
    """The process dies here (SIGKILL): raised by the fault hook at this operation and every
    later one, so that nothing more reaches the disk (cleanup handlers included)."""


def crash_at(n: int):  # noqa: ANN201
    """A fault hook that lets operations 0..n-1 happen and kills the process at operation n."""
    seen = [0]

    def hook(op: str, path: str) -> None:
        if seen[0] >= n:
            raise Crash(f"crashed at operation {n} ({op} {path})")
        seen[0] += 1

    return hook


class Recorded:
    """One recorded workload: run `a` fault-free; or, with `crash`, run `a` killed at operation
    `crash` and then `then` ("recover", or "rerun" of run `a`), recorded as one sequence (the
    second process starts from whatever the first left, durable or not)."""

    def __init__(self, name: str, folder: Path, crash: int | None = None,
                 then: str = "recover", reference: dict | None = None) -> None:
        self.name = name
        self.crash = crash
        self.then = then
        self.pipeline = workloads.make(name, folder / "ws")
        kwargs = workloads.run_kwargs(name)
        store = Store.create(folder / "ws" / ".stagestore")
        with recording(store.root) as rec:
            if crash is None:
                report = run(self.pipeline, store, run_id="a", progress=rec.progress, **kwargs)
                assert report.ok, report
            else:
                previous = durable.set_fault_hook(crash_at(crash))
                try:
                    with pytest.raises(Crash):
                        run(self.pipeline, store, run_id="a", progress=rec.progress, **kwargs)
                finally:
                    durable.set_fault_hook(previous)
                assert rec.k == crash
                if then == "recover":
                    result = recover(store, progress=rec.progress)
                    assert result.ok, result.unresolved
                else:
                    assert run(self.pipeline, store, run_id="a", progress=rec.progress,
                               **kwargs).ok
        self.rec: Recording = rec
        outputs = outputs_of(store, "a")
        if reference is None:
            assert set(outputs) == workloads.outputs_expected(name)
            reference = outputs
        elif not (then == "recover" and not outputs and not store.manifests.has_run("a")):
            # (recover has nothing to complete when the run record was never written)
            assert outputs == reference, f"invariant 5: {outputs} != {reference}"
        self.reference = reference
        self.kwargs = kwargs
        self.label = name if crash is None else f"{name} (crash at {crash}, then {then})"


_CONTEXT: dict = {}


def verify_image(image: powerloss.Image, dest: Path, reported: list, pipeline,  # noqa: ANN001
                 reference: dict, kwargs: dict | None = None) -> None:
    """Materialise a crash image as a store, then check invariant 6, recover, 1-4, 8, 6, 5."""
    image.materialize(dest)
    store = Store.open(dest)
    check_reported_kept(store, reported)  # 6, before recover could redo anything
    report = recover(store)
    if not report.ok:
        raise AssertionError(f"recover left {report.unresolved}")
    check_store(store)  # 1-4, 8
    check_reported_kept(store, reported)  # 6
    check_rerun(pipeline, store, reference, **(kwargs or {}))  # 5


def _verify_job(job: tuple) -> str | None:
    where, image, reported, dest = job
    try:
        verify_image(image, Path(dest), reported, _CONTEXT["pipeline"], _CONTEXT["reference"],
                     _CONTEXT.get("kwargs"))
    except Exception as exc:  # noqa: BLE001 - collected and reported together
        return f"{where}: {type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(Path(dest).parent, ignore_errors=True)
    return None


class Checker:
    """Checks crash images of one recording; collects failures instead of stopping at one.

    `check` builds an image and queues it unless an identical one was queued before; `flush`
    verifies the queue, on WORKERS forked processes (each image is independent: its own store
    folder, the recorded workspace is only read)."""

    def __init__(self, recorded: Recorded, scratch: Path) -> None:
        self.r = recorded
        self.scratch = scratch
        self.seen: set[tuple] = set()
        self.combinations = 0
        self.prefixes: set[int] = set()
        self.checked = 0
        self.failures: list[str] = []
        self.pending: list[tuple[str, powerloss.Image, list, str]] = []
        self._states: dict[int, powerloss.State] = {}

    def state(self, prefix: int) -> powerloss.State:
        if prefix not in self._states:
            self._states = {prefix: self.r.rec.state(prefix)}  # one at a time: prefixes ascend
        return self._states[prefix]

    def check(self, prefix: int, meta: str, data: str, draw: int = 0) -> None:
        state = self.state(prefix)
        if meta == "swap" and not state.swappable():
            return  # operation P-2 changed no entry that could be lost: the same as "all"
        seed = seed_for(SEED, self.r.label, prefix, meta, data, draw)
        image = state.image(meta, data, random.Random(seed))
        self.combinations += 1
        self.prefixes.add(prefix)
        key = (image.digest(), tuple(state.reported))
        if key in self.seen:
            return
        self.seen.add(key)
        self.checked += 1
        where = (f"workload {self.r.label} P={prefix} K={self.r.rec.k} variant={meta}/{data}"
                 f" seed={seed} (base seed {SEED})")
        if prefix < self.r.rec.k:
            op = self.r.rec.ops[prefix]
            where += f" next op {op[0]} {op[1]}" + (f" <- {op[2]}" if op[2] else "")
        dest = str(self.scratch / f"image-{self.checked}" / "store")
        self.pending.append((where, image, list(state.reported), dest))

    def flush(self, workers: int | None = None) -> None:
        jobs, self.pending = self.pending, []
        workers = WORKERS if workers is None else workers
        _CONTEXT.update(pipeline=self.r.pipeline, reference=self.r.reference,
                        kwargs=self.r.kwargs)
        if workers <= 1 or len(jobs) < 2:
            results = [_verify_job(job) for job in jobs]
        else:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                results = pool.map(_verify_job, jobs, chunksize=4)
        self.failures.extend(r for r in results if r is not None)

    def sweep(self, metas: tuple[str, ...], datas: tuple[str, ...], draws: int = 1,
              start: int = 0) -> None:
        for prefix in range(start, self.r.rec.k + 1):
            for meta in metas:
                for data in datas:
                    for draw in range(draws if meta == "random" or data == "mix" else 1):
                        self.check(prefix, meta, data, draw)
            if len(self.pending) >= 400:
                self.flush()
        self.flush()

    def summary(self) -> str:
        return (f"{self.r.label}: K={self.r.rec.k}, {len(self.prefixes)} prefixes, "
                f"{self.combinations} prefix x variant images, {self.checked} distinct checked, "
                f"{len(self.failures)} failed")

    def assert_ok(self) -> None:
        self.flush()
        print(self.summary())
        if self.failures:
            shown = "\n".join(self.failures[:8])
            more = f"\n... and {len(self.failures) - 8} more" if len(self.failures) > 8 else ""
            raise AssertionError(f"{self.summary()}\n{shown}{more}")


@pytest.fixture
def scratch(tmp_path):  # noqa: ANN001, ANN201
    """Where crash images are written: a tmpfs when there is one (checking an image does a few
    hundred metadata operations, 3-5x faster there than on this machine's disk), else tmp_path.
    `STAGESTORE_POWERLOSS_SCRATCH` chooses another parent folder."""
    parent = os.environ.get("STAGESTORE_POWERLOSS_SCRATCH") or (
        "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None)
    if parent is None:
        yield tmp_path / "scratch"
        return
    folder = Path(tempfile.mkdtemp(prefix="stagestore-powerloss-", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):  # noqa: ANN001, ANN201
    cache: dict[str, Recorded] = {}

    def get(name: str) -> Recorded:
        if name not in cache:
            cache[name] = Recorded(name, tmp_path_factory.mktemp(f"powerloss-{name}"))
        return cache[name]

    return get


# --- the model itself ---------------------------------------------------------------------


def _tiny(tmp_path: Path) -> Path:
    root = tmp_path / "fs"
    for folder in ("tmp", "d", "e"):
        (root / folder).mkdir(parents=True)
    (root / "d" / "old").write_bytes(b"old bytes")
    return root


def _write(path: Path, data: bytes, fsync: bool = True) -> None:
    fd = durable.create_exclusive(path)
    try:
        durable.write_all(fd, data, path)
        if fsync:
            durable.fsync_fd(fd, path)
    finally:
        os.close(fd)


def _images(rec: Recording, prefix: int, meta: str = "synced") -> dict[str, powerloss.Image]:
    state = rec.state(prefix)
    return {data: state.image(meta, data, random.Random(7)) for data in powerloss.DATA_POLICIES}


def test_model_a_rename_needs_the_folder_fsync(tmp_path):
    root = _tiny(tmp_path)
    with recording(root) as rec:
        _write(root / "tmp" / "x", b"hello")                       # ops 0-2
        durable.rename(root / "tmp" / "x", root / "d" / "y")      # op 3
        durable.fsync_dir(root / "d")                              # op 4
    assert [op for op, _, _ in rec.ops] == ["create", "write", "fsync", "rename", "fsync_dir"]
    before_sync = rec.state(4)
    for data in powerloss.DATA_POLICIES:
        image = before_sync.image("synced", data, random.Random(1))
        assert not image.has("d/y") and not image.has("tmp/x")    # neither entry is durable
        assert image.files["d/old"][1] == b"old bytes"             # the initial store is
    lucky = before_sync.image("all", "dropped", random.Random(1))
    assert lucky.files["d/y"][1] == b"hello"                       # fsynced data survives
    synced = rec.state(5)
    for data in powerloss.DATA_POLICIES:
        image = synced.image("synced", data, random.Random(1))
        assert image.files["d/y"][1] == b"hello" and not image.has("tmp/x")
    assert not rec.state(3).image("all", "dropped", random.Random(1)).has("d/y")  # before op 3


def test_model_unsynced_data_comes_back_dropped_torn_or_garbage(tmp_path):
    root = _tiny(tmp_path)
    data = b"0123456789abcdef"
    with recording(root) as rec:
        _write(root / "tmp" / "z", data, fsync=False)
        durable.rename(root / "tmp" / "z", root / "d" / "z")
        durable.fsync_dir(root / "d")
    images = _images(rec, rec.k)
    assert images["dropped"].files["d/z"][1] == b""
    assert images["torn"].files["d/z"][1] == data[:8]
    garbage = images["garbage"].files["d/z"][1]
    assert len(garbage) == len(data) and garbage != data
    assert images["mix"].files["d/z"][1] in (b"", data[:8], data) or len(
        images["mix"].files["d/z"][1]) == len(data)
    # the same prefix materialised: the file is there with the dropped (empty) content
    images["dropped"].materialize(tmp_path / "out")
    assert (tmp_path / "out" / "d" / "z").read_bytes() == b""


def test_model_chmod_is_durable_only_with_the_file_fsync(tmp_path):
    root = _tiny(tmp_path)
    with recording(root) as rec:
        _write(root / "tmp" / "a", b"a")
        durable.chmod(root / "tmp" / "a", 0o444)                   # not fsynced afterwards
        durable.rename(root / "tmp" / "a", root / "d" / "a")
        _write(root / "tmp" / "b", b"b")
        durable.chmod(root / "tmp" / "b", 0o444)
        durable.fsync_file(root / "tmp" / "b")                     # as commit_file does
        durable.rename(root / "tmp" / "b", root / "d" / "b")
        durable.fsync_dir(root / "d")
    image = _images(rec, rec.k)["dropped"]
    assert image.files["d/a"][1:] == (b"a", 0o644 & ~_umask())
    assert image.files["d/b"][1:] == (b"b", 0o444)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_model_links_unlinks_rmtree_and_reordering(tmp_path):
    root = _tiny(tmp_path)
    with recording(root) as rec:
        durable.temp_dir(root / "tmp" / "view")                    # op 0
        durable.temp_link(root / "d" / "old", root / "tmp" / "view" / "old")  # op 1
        _write(root / "tmp" / "p", b"p")                           # ops 2-4
        _write(root / "tmp" / "q", b"q")                           # ops 5-7
        durable.rename(root / "tmp" / "p", root / "d" / "p")      # op 8
        durable.rename(root / "tmp" / "q", root / "e" / "q")      # op 9
        durable.unlink(root / "d" / "old")                         # op 10
        durable.rmtree(root / "tmp" / "view")                      # op 11
        durable.fsync_dir(root / "e")                              # op 12
    assert rec.k == 13
    after_renames = rec.state(10)
    everything = after_renames.image("all", "dropped", random.Random(1))
    assert everything.has("d/p") and everything.has("e/q")
    assert everything.files["tmp/view/old"][0] == everything.files["d/old"][0]  # one node
    everything.materialize(tmp_path / "linked")
    assert os.stat(tmp_path / "linked" / "d" / "old").st_nlink == 2
    assert after_renames.swappable()
    swapped = after_renames.image("swap", "dropped", random.Random(1))
    assert swapped.has("e/q") and not swapped.has("d/p")         # op 9 kept, op 8 lost
    end = rec.state(rec.k)
    synced = end.image("synced", "dropped", random.Random(1))
    assert synced.has("e/q") and not synced.has("d/p")           # only e/ was fsynced
    assert synced.has("d/old")                                   # its unlink is not durable
    final = end.image("all", "dropped", random.Random(1))
    assert not final.has("d/old") and not final.has("tmp/view")


def test_model_follows_a_real_run_and_records_reports(recorded):
    r = recorded("linear")
    rec = r.rec
    reports = [e for e in rec.events if e[0] == "report"]
    assert [(e[3], e[4]) for e in reports] == [
        (stage, r.reference[(None, stage)]) for stage in workloads.STAGES["linear"]]
    # The last stage is reported right after the fsync of its run folder, and from that
    # prefix on its manifest is in the image that keeps only what was made durable.
    first = next(p for p in range(rec.k + 1) if len(rec.state(p).reported) == 3)
    assert rec.ops[first - 1][0] == "fsync_dir" and rec.ops[first - 1][1] == "runs/a"
    assert rec.state(first).image("synced", "dropped", random.Random(1)).has("runs/a/report.json")
    assert not rec.state(first - 1).image("synced", "dropped", random.Random(1)).has(
        "runs/a/report.json")


def test_the_checker_catches_a_missing_folder_fsync(tmp_path, monkeypatch):
    """Mutation: without the run folder's fsync after a manifest rename, a reported stage can
    lose its manifest, and the checker must say so (invariant 6)."""
    real = durable.fsync_dir

    def skip_run_folder(path):  # noqa: ANN001, ANN202
        if Path(path).parent.name == "runs":
            return None
        return real(path)

    monkeypatch.setattr(durable, "fsync_dir", skip_run_folder)
    r = Recorded("linear", tmp_path / "rec")
    monkeypatch.setattr(durable, "fsync_dir", real)
    checker = Checker(r, tmp_path / "scratch")
    first = next(p for p in range(r.rec.k + 1) if r.rec.state(p).reported)
    checker.check(first, "synced", "dropped")
    checker.flush()
    assert checker.failures and "invariant 6" in checker.failures[0], checker.failures


def test_the_checker_catches_a_missing_data_fsync(tmp_path, monkeypatch):
    """Mutation: without the fsync of a temp before its rename, a manifest can come back torn
    and the checker must say so."""
    real = durable.fsync_fd

    def skip_temps(fd, path):  # noqa: ANN001, ANN202
        if str(path).endswith("~manifest"):
            return None
        return real(fd, path)

    monkeypatch.setattr(durable, "fsync_fd", skip_temps)
    r = Recorded("linear", tmp_path / "rec")
    monkeypatch.setattr(durable, "fsync_fd", real)
    checker = Checker(r, tmp_path / "scratch")
    first = next(p for p in range(r.rec.k + 1) if r.rec.state(p).reported)
    checker.check(first, "synced", "torn")
    checker.flush()
    assert checker.failures and "invariant 6" in checker.failures[0], checker.failures


# --- the workloads ------------------------------------------------------------------------


def test_powerloss_linear_every_prefix(recorded, scratch):
    checker = Checker(recorded("linear"), scratch)
    checker.sweep(("synced", "all"), ("dropped", "torn", "garbage"))
    checker.assert_ok()


def test_powerloss_items_every_prefix(recorded, scratch):
    """The item log: every prefix, its unsynced tail dropped, torn or garbage."""
    checker = Checker(recorded("items"), scratch)
    checker.sweep(("synced", "all"), ("dropped", "torn", "garbage"))
    checker.assert_ok()


@pytest.mark.parametrize("name", ["fanout", "tree50", "bigin"])
def test_powerloss_every_prefix_dropped(recorded, scratch, name):
    checker = Checker(recorded(name), scratch)
    checker.sweep(("synced", "all"), ("dropped",))
    checker.assert_ok()


def test_powerloss_snaptree_every_prefix_torn_and_garbage(recorded, scratch):
    """The stat cache's records are replaced without an fsync: after a power loss they may be
    dropped, torn or garbage, and the rerun must hash the files again rather than trust them
    (its output, every byte of the input, must equal the reference)."""
    checker = Checker(recorded("snaptree"), scratch)
    checker.sweep(("synced", "all"), ("dropped", "torn", "garbage"))
    checker.assert_ok()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["linear", "fanout", "tree50"])
def test_powerloss_long_every_prefix_reordered(recorded, scratch, name):
    checker = Checker(recorded(name), scratch)
    checker.sweep(("synced", "all", "swap"), ("dropped", "torn", "garbage", "mix"), draws=2)
    checker.sweep(("random",), ("mix", "dropped"), draws=RANDOM_DRAWS)
    checker.assert_ok()


# --- a crash, then recover or a rerun, then a power loss -----------------------------------


def _mkdir_then_parent_sync(ops: list, index: int) -> bool:
    """Whether operation `index` is the parent's fsync that follows a `durable.mkdir`: a crash
    there leaves a folder whose entry is not durable (see the two BUG tests below)."""
    return (0 < index and ops[index][0] == "fsync_dir" and ops[index - 1][0] == "mkdir"
            and ops[index - 1][1].rpartition("/")[0] == ops[index][1])


def _crash_points(ops: list) -> dict[str, int]:
    """Named crash points of a recorded run: before each manifest rename, before each attempt
    folder's removal, and before the run record's last rewrite."""
    points = {}
    for index, (op, path, src) in enumerate(ops):
        if op == "rename" and path.startswith("runs/a/") and path != "runs/a/_run.json":
            points[f"before manifest {path.rpartition('/')[2]}"] = index
        elif op == "rmtree" and path.startswith("tmp/"):
            points[f"before removing attempt {path.rpartition('~')[2]}"] = index
    points["before the last run record"] = max(
        i for i, (op, path, _) in enumerate(ops) if op == "rename" and path == "runs/a/_run.json")
    return points


def test_powerloss_after_a_crash_and_recover(recorded, tmp_path, scratch):
    """linear killed at each named point, then `recover`: a power loss at any prefix of what
    recover does keeps what was reported, before or after the crash."""
    clean = recorded("linear")
    summaries = []
    failures = []
    for label, point in _crash_points(clean.rec.ops).items():
        assert not _mkdir_then_parent_sync(clean.rec.ops, point)
        r = Recorded("linear", tmp_path / f"crash-{point}", crash=point, reference=clean.reference)
        checker = Checker(r, scratch)
        checker.sweep(("synced", "all"), ("dropped", "torn", "garbage"), start=point)
        summaries.append(f"{label}: {checker.summary()}")
        failures += checker.failures
    print("\n".join(summaries))
    assert not failures, "\n".join(failures[:8])


def test_powerloss_after_a_crash_and_a_rerun(recorded, tmp_path, scratch):
    """linear killed before the manifest of `count`, then run `a` again (not recover)."""
    clean = recorded("linear")
    point = _crash_points(clean.rec.ops)["before manifest count.json"]
    r = Recorded("linear", tmp_path / "rerun", crash=point, then="rerun",
                 reference=clean.reference)
    checker = Checker(r, scratch)
    checker.sweep(("synced", "all"), ("dropped", "torn", "garbage"), start=point)
    checker.assert_ok()


def _first_prefix_reporting(rec: Recording, stage: str, after: int) -> int:
    """The first prefix (> after) whose reported stages include a later report of `stage`."""
    before = sum(1 for e in rec.state(after).reported if e[2] == stage)
    return next(p for p in range(after, rec.k + 1)
                if sum(1 for e in rec.state(p).reported if e[2] == stage) > before)


# Regression (fixed): durable.mkdir (stagestore/store/durable.py:131-134) returns without fsyncing the
# parent when the folder already exists, so a shard folder created by a process killed between its
# mkdir and the fsync of objects/ is never made durable by the process that later commits into it
# (objects.py:64 `_shard`); a power loss then loses objects that a reported stage's manifest names
def test_regression_shard_folder_left_by_a_crash_is_never_made_durable(recorded, tmp_path):
    clean = recorded("linear")
    ops = clean.rec.ops
    report_manifest = next(i for i, o in enumerate(ops) if o[:2] == ("rename", "runs/a/report.json"))
    # the crash: after `mkdir objects/xx` for report's output, before `fsync_dir objects`
    point = max(i for i in range(report_manifest) if _mkdir_then_parent_sync(ops, i)
                and ops[i][1] == "objects")
    shard = ops[point - 1][1]
    r = Recorded("linear", tmp_path / "rec", crash=point)
    digest = r.reference[(None, "report")]
    prefix = _first_prefix_reporting(r.rec, "report", point)
    state = r.rec.state(prefix)
    image = state.image("synced", "dropped", random.Random(1))
    assert image.has("runs/a/report.json")  # the manifest is durable ...
    store_dir = tmp_path / "image" / "store"
    image.materialize(store_dir)
    store = Store.open(store_dir)
    assert store.manifests.read("a", "report").output_hash == digest
    # ... and so must be the objects it names, in shard folder `shard` (created by the killed
    # process; its entry in objects/ was never fsynced by either process):
    check_reported_kept(store, state.reported)
    assert any(p.startswith(shard + "/") for p in image.files)


# Regression (fixed): a run folder created by a process killed between `mkdir runs/<id>` and the
# fsync of runs/ is reused by a rerun of the same run id without ever fsyncing runs/
# (manifests.py:34 `_ensure_run_dir` skips an existing folder; durable.py:131-134 would not sync
# it either), so after the rerun reports success a power loss loses the whole run
def test_regression_run_folder_left_by_a_crash_is_never_made_durable(recorded, tmp_path):
    clean = recorded("linear")
    ops = clean.rec.ops
    point = next(i for i in range(len(ops)) if _mkdir_then_parent_sync(ops, i)
                 and ops[i - 1][1] == "runs/a")
    r = Recorded("linear", tmp_path / "rec", crash=point, then="rerun")
    state = r.rec.state(r.rec.k)  # the rerun has ended, exit 0, every stage reported
    assert [e[2] for e in state.reported] == list(workloads.STAGES["linear"])
    image = state.image("synced", "dropped", random.Random(1))
    store_dir = tmp_path / "image" / "store"
    image.materialize(store_dir)
    check_reported_kept(Store.open(store_dir), state.reported)  # runs/a is not durable
    assert image.has("runs/a/_run.json")


# Regression (fixed): with --jobs 2, a stage that commits into a shard folder another thread has
# just created, before that thread's fsync of objects/, finds it existing (durable.py:131-134
# returns without fsyncing the parent) and is reported successful while the shard's entry is not
# durable; a power loss then loses the object its manifest names
def test_regression_concurrent_commit_into_a_shard_not_yet_durable(tmp_path):
    """fanout with two jobs: `left` and `right` produce the same bytes, so the same object in
    the same new shard folder.  The hook holds `right` between its `mkdir objects/xx` and the
    fsync of objects/ until `left` has committed into objects/xx and been reported."""
    from stagestore.store.hashing import digest_bytes

    pipeline = workloads.make("fanout", tmp_path / "ws")
    store = Store.create(tmp_path / "ws" / ".stagestore")
    shard = "objects/" + digest_bytes(b"HELLO FAN-OUT\n").removeprefix("blake3:")[:2]
    local = threading.local()
    right_made_shard, left_reported = threading.Event(), threading.Event()

    def hook(op: str, path: str) -> None:
        rel = os.path.relpath(path, store.root)
        if op == "mkdir" and rel.startswith("tmp/") and rel.count("/") == 1:
            local.stage = rel.rpartition("~")[2].split(".")[0]  # this thread's attempt
        stage = getattr(local, "stage", None)
        if stage == "right" and (op, rel) == ("fsync_dir", "objects") and \
                getattr(local, "last", None) == ("mkdir", shard):
            right_made_shard.set()
            left_reported.wait(timeout=60)
        if stage == "left" and (op, rel) == ("mkdir", shard):
            right_made_shard.wait(timeout=60)
        local.last = (op, rel)

    with recording(store.root) as rec:
        def progress(event) -> None:  # noqa: ANN001
            rec.progress(event)
            if event.stage == "left" and event.event == "succeeded":
                left_reported.set()

        previous = durable.set_fault_hook(hook)
        try:
            assert run(pipeline, store, run_id="a", jobs=2, progress=progress).ok
        finally:
            durable.set_fault_hook(previous)
    assert right_made_shard.is_set() and left_reported.is_set(), "the interleaving did not happen"
    prefix = _first_prefix_reporting(rec, "left", 0)
    state = rec.state(prefix)
    image = state.image("synced", "dropped", random.Random(1))
    store_dir = tmp_path / "image" / "store"
    image.materialize(store_dir)
    check_reported_kept(Store.open(store_dir), state.reported)


def _manifest_then_folder_sync(ops: list, index: int) -> bool:
    """Whether operation `index` is the fsync of a run folder right after a record was renamed
    into it: a crash there leaves a manifest whose entry is not durable (BUG test below)."""
    return (0 < index and ops[index][0] == "fsync_dir" and ops[index - 1][0] == "rename"
            and ops[index - 1][1].rpartition("/")[0] == ops[index][1]
            and ops[index][1].startswith("runs/"))


# Regression (fixed): a stage whose manifest a killed process renamed into the run folder but did
# not fsync the folder for is reported `succeeded` by recover (or a rerun) from that existing
# manifest (stagestore/execution/stagework.py:152-154) without making its entry durable; a power loss then
# loses a manifest reported successful
def test_regression_reused_manifest_whose_entry_is_not_durable(recorded, tmp_path):
    clean = recorded("linear")
    ops = clean.rec.ops
    point = next(i for i in range(len(ops)) if _manifest_then_folder_sync(ops, i)
                 and ops[i - 1][1] == "runs/a/make.json")
    r = Recorded("linear", tmp_path / "rec", crash=point)
    # the killed process never reported make; recover does, from its manifest, at once
    assert not any(e[2] == "make" for e in r.rec.state(point - 1).reported)
    prefix = next(p for p in range(point, r.rec.k + 1)
                  if any(e[2] == "make" for e in r.rec.state(p).reported))
    state = r.rec.state(prefix)
    image = state.image("synced", "dropped", random.Random(1))
    store_dir = tmp_path / "image" / "store"
    image.materialize(store_dir)
    check_reported_kept(Store.open(store_dir), state.reported)


# Regression (fixed): a cache shard folder created by a process killed before the fsync of cache/
# is reused without ever being made durable (stagestore/store/manifests.py:262-263 skips an existing
# folder, durable.py:131-134); after a power loss the cache entry is gone, recover does not
# rebuild it and verify does not notice, so one more run executes the stage again (invariant 5)
def test_regression_cache_shard_left_by_a_crash_is_never_made_durable(recorded, tmp_path):
    clean = recorded("linear")
    ops = clean.rec.ops
    point = next(i for i in range(len(ops)) if _mkdir_then_parent_sync(ops, i)
                 and ops[i][1] == "cache")
    r = Recorded("linear", tmp_path / "rec", crash=point)
    # once recover has redone make (cache entry, then manifest) and before anything fsyncs cache/
    state = r.rec.state(_first_prefix_reporting(r.rec, "make", point))
    image = state.image("synced", "dropped", random.Random(1))
    store_dir = tmp_path / "image" / "store"
    image.materialize(store_dir)
    store = Store.open(store_dir)
    assert recover(store).ok
    check_store(store)
    check_rerun(r.pipeline, store, r.reference, **r.kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("name,then", [("linear", "recover"), ("linear", "rerun"),
                                       ("fanout", "recover")])
def test_powerloss_long_after_a_crash_at_every_operation(recorded, tmp_path, scratch, name, then):
    """The workload killed at every operation, then recover or a
    rerun; then a power loss at every prefix of what follows."""
    clean = recorded(name)
    summaries, failures = [], []
    for point in range(clean.rec.k):
        r = Recorded(name, tmp_path / f"crash-{point}", crash=point, then=then,
                     reference=clean.reference)
        checker = Checker(r, scratch)
        checker.sweep(("synced", "all", "swap"), ("dropped", "torn", "garbage"), start=point)
        summaries.append(checker.summary())
        failures += checker.failures
        shutil.rmtree(tmp_path / f"crash-{point}", ignore_errors=True)
    print("\n".join(summaries))
    print(f"{name} then {then}: {len(summaries)} crash points")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:8])
