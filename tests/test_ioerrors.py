"""I/O errors (issue 4): an `OSError` raised at durable operation N of a run, for every N.

Workload `linear` (`workloads.py`), run in-process with a fault hook (`durable.set_fault_hook`)
that raises one error kind at operation N, either once (only the Nth operation fails) or
persistently (every operation from the Nth on fails, as SQLite's fault tests do).  Kinds: EIO,
ENOSPC, EDQUOT, EACCES, EROFS, and `fsync-EIO`: EIO raised only by `fsync` and `fsync_dir`
operations, whose N then counts those operations only (K_fsync of them).

After each point (the hook removed again):

* 9: the run does not report success unless every failed operation was a cleanup-only one (the
  removal of a temp in `tmp/`), and then `verify` is clean; otherwise a `StagestoreError` or
  `OSError` propagated, or the report shows a failed stage; no descriptor into the store leaked
  and no lock is held (`check_no_leaks`);
* a failed file fsync is never retried and trusted: the path whose fsync failed is never
  fsynced again nor renamed or linked anywhere afterwards, and (once mode) it is gone when the
  run returns: the temp is dropped;
* `recover` is ok, then invariants 1-4 and 8 (`check_store`), 5 (`check_rerun`), and 10 (the
  sentinel folder and the workspace are unchanged).

Tiers and counts (linear: K=162 operations, K_fsync=54 fsyncs on 2026-12-03; each run prints them):

* fast tier (`make test`): EVERY N for EIO once, ENOSPC once and fsync-EIO once (378 points);
  every 3rd N (the first N rotating with the variant, so that together they cover every
  residue) for EDQUOT, EACCES and EROFS once (162 points) and for every kind in persistent
  mode (288 points): 828 points in all.
* slow tier (`make test-long`, `@pytest.mark.slow`): EVERY N for the nine variants the fast
  tier thins out (1,318 points).

Also: an fsync failure while committing an output makes the stage's attempt fail and drops the
unsynced file, and a rerun recreates the object; and through the real CLI (a subprocess that
installs the hook and calls `stagestore.cli.main`) an injected error of each kind gives a
non-zero exit and an `error:` line, never a traceback.

Points are spread over forked workers like the crash points (`STAGESTORE_FAULT_JOBS`, see
test_crashpoints.py).  Nothing is random (`SEED = 0`, unused): each failure names the kind,
mode, N and K; `STAGESTORE_FAULT_N=17` replays chosen points only.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import invariants
from stagestore.store import durable
from stagestore.errors import StagestoreError
from stagestore.store.hashing import hash_file
from stagestore.execution.runner import run
from stagestore.store.store import Store
from stagestore.inspection.verify import verify
from test_crashpoints import SEED, Workload, points, recover_ok, run_points

FSYNC_OPS = frozenset({"fsync", "fsync_dir"})
# kind -> (errno, the operations that can fail: None for all)
KINDS: dict[str, tuple[int, frozenset[str] | None]] = {
    "EIO": (errno.EIO, None),
    "ENOSPC": (errno.ENOSPC, None),
    "EDQUOT": (errno.EDQUOT, None),
    "EACCES": (errno.EACCES, None),
    "EROFS": (errno.EROFS, None),
    "fsync-EIO": (errno.EIO, FSYNC_OPS),
}
MODES = ("once", "persistent")
EVERY_N_IN_FAST = {("EIO", "once"), ("ENOSPC", "once"), ("fsync-EIO", "once")}
VARIANTS = [(kind, mode) for mode in MODES for kind in KINDS]


class Injector:
    """The fault hook: raises `OSError(code)` at the nth counted operation (once) or at every
    counted operation from the nth on (persistent).  `fired` holds (op, path, index into the
    recorder's events at that moment) of each raised error."""

    def __init__(self, code: int, n: int, persistent: bool, only: frozenset[str] | None,
                 events: list) -> None:
        self.code, self.n, self.persistent, self.only = code, n, persistent, only
        self.events = events
        self.seen = 0
        self.fired: list[tuple[str, str, int]] = []

    def __call__(self, op: str, path: str) -> None:
        if self.only is not None and op not in self.only:
            return
        self.seen += 1
        if self.seen == self.n or (self.persistent and self.seen > self.n):
            self.fired.append((op, path, len(self.events)))
            raise OSError(self.code, os.strerror(self.code), path)


def cleanup_only(op: str, path: str, store: Store) -> bool:
    """The removal of a temp entry of `tmp/`: failing it loses nothing the store promised."""
    return op in ("unlink", "rmtree") and Path(path).parent == store.layout.tmp


def check_fsync_never_trusted(injector: Injector, events: list, once: bool) -> None:
    """A path whose fsync failed is never fsynced again, renamed or linked afterwards; in once
    mode it is gone when the run returns (the temp was dropped)."""
    for op, path, at in injector.fired:
        if op != "fsync":
            continue
        later = [(o, p) for o, p, src in events[at:]
                 if (o == "fsync" and p == path) or (o in ("rename", "link") and src == path)]
        assert not later, (f"the fsync of {path} failed, yet it was later {later[0][0]}-ed: a "
                           "failed fsync must never be retried and trusted")
        if once:
            assert not os.path.lexists(path), f"the fsync of {path} failed, yet it was not dropped"


class IoLinear(Workload):
    """Workload `linear`, plus the number of its fsync operations."""

    def __init__(self, base: Path) -> None:
        super().__init__("linear", base)
        ops: list[str] = []
        probe = Store.create(self.stores / "probe")
        previous = durable.set_fault_hook(lambda op, path: ops.append(op))
        try:
            assert run(self.pipeline, probe, run_id="a").ok
        finally:
            durable.set_fault_hook(previous)
        shutil.rmtree(probe.root)
        assert len(ops) == self.k, "the run's operations are not deterministic"
        self.k_fsync = sum(op in FSYNC_OPS for op in ops)
        print(f"workload=linear seed={SEED} K={self.k} K_fsync={self.k_fsync}")

    def total(self, kind: str) -> int:
        return self.k_fsync if KINDS[kind][1] is not None else self.k


@pytest.fixture(scope="module")
def linear(tmp_path_factory: pytest.TempPathFactory) -> IoLinear:
    return IoLinear(tmp_path_factory.mktemp("ioerrors") / "linear")


def fault_point(w: IoLinear, kind: str, mode: str, n: int) -> None:
    code, only = KINDS[kind]
    once = mode == "once"
    store = w.fresh_store(f"{kind}-{mode}-{n}")
    events: list[tuple[str, str, str | None]] = []
    injector = Injector(code, n, not once, only, events)
    fds_before = invariants.open_fds()
    report = None
    durable.set_fault_hook(injector)
    durable.set_recorder(lambda op, path, src: events.append((op, path, src)))
    try:
        report = run(w.pipeline, store, run_id="a")
    except (StagestoreError, OSError) as exc:
        assert str(exc), f"{type(exc).__name__} without a message"
    finally:
        durable.set_fault_hook(None)
        durable.set_recorder(None)
    assert injector.fired, "the fault point was not reached"
    first = injector.fired[0][:2]
    # 9: the error surfaces, unless only a cleanup step failed.
    if report is not None:
        if report.ok:
            assert all(cleanup_only(op, path, store) for op, path, _ in injector.fired), (
                f"the run reported success although {first[0]} of {first[1]} failed")
            found = verify(store)
            assert found.ok, f"the run reported success but verify finds {found.problems}"
        else:
            failed = [s.stage for s in report.stages if s.outcome == "failed"]
            assert failed, (f"the run ended {report.status} without a failed stage after "
                            f"{first[0]} of {first[1]} failed")
    invariants.check_no_leaks(fds_before, store)
    check_fsync_never_trusted(injector, events, once)
    invariants.check_store(store, after_recover=False)
    recover_ok(store)
    invariants.check_store(store)
    invariants.check_rerun(w.pipeline, store, w.reference)
    w.check_untouched()
    shutil.rmtree(store.root)


def io_loop(w: IoLinear, kind: str, mode: str, step: int) -> int:
    total = w.total(kind)
    first = 1 + VARIANTS.index((kind, mode)) % step
    chosen = points(total, step, first)
    done = run_points(lambda n: fault_point(w, kind, mode, n), chosen,
                      lambda n: f"workload=linear kind={kind} mode={mode} seed={SEED} N={n} "
                                f"K={total}")
    print(f"io errors: workload=linear kind={kind} mode={mode} seed={SEED} K={total} "
          f"points={done}")
    assert done == len(chosen)
    return done


@pytest.mark.parametrize(("kind", "mode"), VARIANTS, ids=[f"{k}-{m}" for k, m in VARIANTS])
def test_an_io_error_at_each_operation_of_a_run(linear, kind, mode):
    """Fast tier: EVERY N for EIO, ENOSPC and fsync-EIO once; every 3rd N (start rotating with
    the variant) for the other kinds and for persistent mode."""
    io_loop(linear, kind, mode, 1 if (kind, mode) in EVERY_N_IN_FAST else 3)


SLOW_VARIANTS = [v for v in VARIANTS if v not in EVERY_N_IN_FAST]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "mode"), SLOW_VARIANTS, ids=[f"{k}-{m}" for k, m in SLOW_VARIANTS])
def test_an_io_error_at_every_operation_of_a_run(linear, kind, mode):
    """Slow tier: EVERY N for the variants the fast tier takes every 3rd N of."""
    io_loop(linear, kind, mode, 1)


# --- a failed fsync while committing an output -------------------------------------------------


def test_a_failed_fsync_of_an_output_fails_the_attempt_and_is_never_trusted(linear):
    """EIO from the fsync of stage count's output `n` (in its attempt folder, about to be
    renamed into objects/): the attempt fails (the run raises or reports the stage failed), the
    file is never fsynced again nor renamed, it is dropped with the attempt folder, no manifest
    names its content, and recover runs the stage again, recreating the object."""
    w = linear
    store = w.fresh_store("fsync-output")
    events: list[tuple[str, str, str | None]] = []
    failed: list[tuple[str, str, int]] = []
    digest: list[str] = []  # the content of the file whose fsync failed

    def hook(op: str, path: str) -> None:
        if op == "fsync" and path.endswith("~count.1/out/n") and not failed:
            failed.append((op, path, len(events)))
            digest.append(hash_file(Path(path)))
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)

    fds_before = invariants.open_fds()
    report, raised = None, None
    durable.set_fault_hook(hook)
    durable.set_recorder(lambda op, path, src: events.append((op, path, src)))
    try:
        report = run(w.pipeline, store, run_id="a")
    except (StagestoreError, OSError) as exc:
        raised = exc
    finally:
        durable.set_fault_hook(None)
        durable.set_recorder(None)
    assert failed, "the output's fsync never happened"
    path, at = failed[0][1], failed[0][2]
    expected = w.reference[(None, "count")]
    assert raised is not None or any(
        s.stage == "count" and s.outcome == "failed" for s in report.stages), \
        f"the run did not fail: {report}"
    if raised is not None:
        assert isinstance(raised, OSError) and raised.errno == errno.EIO, raised
    later = [(o, p, s) for o, p, s in events[at:] if p == path or s == path]
    assert not any(o == "fsync" for o, _, _ in later), f"the failed fsync was retried: {later}"
    assert not any(o in ("rename", "link") for o, _, _ in later), \
        f"the unsynced file was moved into the store: {later}"
    assert not os.path.lexists(path), "the file whose fsync failed was not dropped"
    # Its content (count's output, "2\n") is not an object, and no manifest names it.
    object_path = store.objects.path(digest[0])
    assert not object_path.exists(), "the unsynced file became an object"
    assert digest[0] not in invariants.referenced(store)
    manifest = store.manifests.read_optional("a", "count")
    assert manifest is None or manifest.status == "failed"
    invariants.check_no_leaks(fds_before, store)
    invariants.check_store(store, after_recover=False)

    recover_ok(store)
    invariants.check_store(store)  # tmp/ holds nothing of the failed attempt, verify is clean
    manifest = store.manifests.read("a", "count")
    assert manifest.status == "succeeded" and manifest.output_hash == expected
    assert manifest.outputs["n"].hash == digest[0] and object_path.is_file()
    assert hash_file(object_path) == digest[0]
    invariants.check_rerun(w.pipeline, store, w.reference)
    w.check_untouched()


# --- through the CLI ----------------------------------------------------------------------------

CLI_SCRIPT = """
import errno, os, sys
from stagestore.store import durable
from stagestore.cli import main

kind, n = sys.argv[1], int(sys.argv[2])
code = getattr(errno, kind.removeprefix("fsync-"))
only = {"fsync", "fsync_dir"} if kind.startswith("fsync-") else None
seen = 0

def hook(op, path):
    global seen
    if only is not None and op not in only:
        return
    seen += 1
    if seen == n:
        raise OSError(code, os.strerror(code), path)

durable.set_fault_hook(hook)
sys.exit(main(sys.argv[3:]))
"""


def test_an_injected_error_through_the_cli_is_an_error_line_and_a_failing_exit(linear):
    """`stagestore run` in a subprocess whose fault hook raises each kind once, at the first,
    a middle or the last operation in turn: a non-zero exit, an `error:` line on stderr, no
    traceback; the store then recovers to a clean state."""
    w = linear
    for index, kind in enumerate(KINDS):
        total = w.total(kind)
        n = (1, total // 2, total)[index % 3]
        store = w.fresh_store(f"cli-{kind}")
        env = {k: v for k, v in os.environ.items() if k != "STAGESTORE_STORE"}
        result = subprocess.run(
            [sys.executable, "-c", CLI_SCRIPT, kind, str(n), "run", "-q", "-p",
             str(w.workspace / "stagestore.toml"), "--store", str(store.root), "--run-id", "a"],
            cwd=w.workspace, capture_output=True, text=True, timeout=120, env=env)
        where = f"CLI kind={kind} mode=once seed={SEED} N={n} K={total}"
        assert result.returncode != 0, f"{where}: exit 0\n{result.stderr}"
        assert "error:" in result.stderr, f"{where}: no error line\n{result.stderr}"
        assert "Traceback" not in result.stderr and "internal error" not in result.stderr, \
            f"{where}:\n{result.stderr}"
        recover_ok(store)
        invariants.check_store(store)
        w.check_untouched()
        shutil.rmtree(store.root)
