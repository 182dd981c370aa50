"""Crash points (issue 4): end the process right before durable operation N, for every N.

For each reference workload of `workloads.py` (`linear`, `fanout`, `tree50`, `kinds`, `bigin`,
`snaptree`),
K is the number of durable operations (calls into `stagestore/store/durable.py`, seen by the fault hook) of
a fault-free `run` on a freshly created store.  For every N in 1..K a forked child runs the
workload and ends itself with `os._exit(99)` right before operation N; the parent then checks

* invariants 1 and 2 right after the crash, before anything repairs the store;
* `recover` reports ok, then invariants 1-4 and 8 (`check_store`);
* 5: a rerun ends with the output hashes of a fault-free reference run, and one more run
  executes nothing (`check_rerun`);
* 10: the sentinel folder, and the workspace itself, are unchanged.

Nested crashes, workload `linear`: a crash at N in `run`, then a crash at operation M of the
`recover` that follows (on a fresh copy of the crashed store each time), then a full `recover`:
invariants 1-5 and 8.  And: a crash at N in `run`, a full recover, a second run `b` (with and
without `forget a` first, so that gc has real garbage to delete), then a crash at operation M of
`gc`: every object referenced before gc still exists (7); then `recover`, `check_store`, and run
`b` reruns to the reference outputs (5).

Tiers and counts (K as measured on this machine; the tests assert only K > 30):

* fast tier (`make test`):
  - EVERY crash point of every workload, and a check that the sweep missed none (a run told to
    crash right before operation K+1 completes after exactly K): linear K=162, fanout K=174, tree50 K=343 on 2026-12-03 (679 points; K grows with the write path, each run prints it);
  - nested run/recover: every 10th N of the run (16 values), each with every 4th M of the
    recover that follows, the first M rotating with N so that together they cover every
    residue of M; every M when recover has 8 operations or fewer (253 of the 990 nested
    points of those 16 values of N);
  - nested run/gc: every 10th N, EVERY M of gc: 52 points keeping run a, 112 forgetting it.
* slow tier (`make test-long`, `@pytest.mark.slow`): the nested tests with EVERY N and EVERY M
  (about 10,000 run/recover points, and about 500 + 1,100 run/gc points).

Measured on the 2-core machine while other test suites shared it (load average 6-8): this file
and test_ioerrors.py together took 136 s of CPU time (user + sys) and 237 s of wall time in the
fast tier.

Points are spread over `$STAGESTORE_FAULT_JOBS` forked workers (default: 2, or the CPU count if
lower); set it to 1 to check them one after the other in the test process.

There is no randomness: the seed is fixed (`SEED = 0`, nothing draws from it) and a workload's
operations come in a fixed order (`jobs=1`), so a point replays exactly.  Each failure names the
workload, N, M and K; to replay chosen points only, set `STAGESTORE_FAULT_N=17,18` (and, for the
nested tests, `STAGESTORE_FAULT_M=3`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

import invariants
import workloads
from stagestore.store import durable
from stagestore.errors import StagestoreError
from stagestore.pipeline.model import Pipeline
from stagestore.inspection.gc import forget, gc
from stagestore.inspection.recover import recover
from stagestore.execution.runner import run
from stagestore.store.store import Store

SEED = 0  # printed with every point; nothing here is random, the op order is deterministic
CRASH_EXIT = 99
WORKLOADS = ("linear", "fanout", "tree50", "kinds", "bigin", "items", "snaptree")
JOBS = max(1, int(os.environ.get("STAGESTORE_FAULT_JOBS", min(2, os.cpu_count() or 1))))

T = TypeVar("T")


# --- shared helpers (test_ioerrors.py imports them) ---------------------------------------------


def in_child(fn: Callable[[], object], crash_at: int | None = None) -> tuple[int, int | None]:
    """Run `fn` in a forked child with a fault hook that counts durable operations and ends the
    child with `os._exit(99)` right before operation `crash_at` (1-based; None: never).

    Returns (exit code, operations seen): 99 when the crash point was reached, 0 when `fn`
    returned, 1 when it raised (its traceback goes to stderr); the count is None after a crash.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(read_end)
            seen = 0

            def hook(op: str, path: str) -> None:
                nonlocal seen
                seen += 1
                if seen == crash_at:
                    os._exit(CRASH_EXIT)

            durable.set_fault_hook(hook)
            try:
                fn()
                code = 0
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
            durable.set_fault_hook(None)
            os.write(write_end, str(seen).encode())
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), (int(data) if data else None)


def count_ops(fn: Callable[[], object], what: str) -> int:
    """K: the durable operations of a fault-free call of `fn` (in a child, so nothing leaks)."""
    code, seen = in_child(fn)
    assert code == 0 and seen is not None, f"the fault-free {what} failed (exit {code})"
    return seen


def points(total: int, step: int = 1, first: int = 1, env: str = "STAGESTORE_FAULT_N") -> list[int]:
    """first, first+step, ... up to total; `$STAGESTORE_FAULT_N` (or `env`) replays chosen points."""
    chosen = os.environ.get(env)
    if chosen:
        return [int(n) for n in chosen.split(",") if n.strip() and 1 <= int(n) <= total]
    return list(range(first, total + 1, step))


def checked(where: str, body: Callable[[], None]) -> None:
    """Run `body`; a failure is re-raised as an AssertionError naming the point."""
    try:
        body()
    except AssertionError as exc:
        raise AssertionError(f"{where}: {exc}") from exc
    except (StagestoreError, OSError) as exc:
        raise AssertionError(f"{where}: {type(exc).__name__}: {exc}") from exc


def run_points(check: Callable[[T], None], items: Sequence[T], where: Callable[[T], str],
               jobs: int = JOBS) -> int:
    """`check(item)` for every item, spread round-robin over `jobs` forked workers.  A worker
    stops at its first failing point; the test then fails with every worker's first failure,
    each naming its point (`where(item)`).  Returns the number of points checked."""
    if jobs <= 1 or len(items) < 2:
        for item in items:
            print(f"point {where(item)}")
            checked(where(item), lambda: check(item))
        return len(items)
    workers = []
    for index in range(jobs):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - a worker
            code = 1
            try:
                os.close(read_end)
                failures, done = [], 0
                for item in items[index::jobs]:
                    print(f"point {where(item)}")
                    try:
                        checked(where(item), lambda: check(item))
                    except AssertionError as exc:
                        failures.append(str(exc))
                        break
                    except BaseException:  # noqa: BLE001 - an internal error is a failure too
                        failures.append(f"{where(item)}: {traceback.format_exc()}")
                        break
                    done += 1
                with os.fdopen(write_end, "wb") as pipe:
                    pipe.write(json.dumps({"done": done, "failures": failures}).encode())
                code = 0
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(write_end)
        workers.append((pid, read_end))
    done, failures = 0, []
    for pid, read_end in workers:
        with os.fdopen(read_end, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0 or not data:
            failures.append(f"worker {pid} died (status {status})")
            continue
        result = json.loads(data)
        done += result["done"]
        failures += result["failures"]
    assert not failures, "\n".join(failures)
    return done


def copy_store(src: Path, dst: Path) -> Store:
    shutil.copytree(src, dst, symlinks=True)
    return Store.open(dst)


def recover_ok(store: Store) -> None:
    report = recover(store)
    assert report.ok, f"recover is not ok: {report.unresolved}"


class Workload:
    """One reference workload: its workspace, sentinel, reference outputs and K."""

    def __init__(self, name: str, base: Path) -> None:
        self.name = name
        self.base = base
        self.workspace = base / "ws"
        self.pipeline: Pipeline = workloads.make(name, self.workspace)
        self.sentinel = workloads.sentinel(base)
        self.stores = base / "stores"
        self.stores.mkdir()
        ref_store = Store.create(base / "reference")
        self.kwargs = workloads.run_kwargs(name)
        report = run(self.pipeline, ref_store, run_id="a", **self.kwargs)
        assert report.ok, f"workload {name}: the reference run failed"
        self.reference = invariants.outputs_of(ref_store, "a")
        assert set(self.reference) == workloads.outputs_expected(name)
        shutil.rmtree(base / "reference")
        probe = Store.create(self.stores / "probe")
        self.k = count_ops(lambda: run(self.pipeline, probe, run_id="a", **self.kwargs),
                           f"run of {name}")
        shutil.rmtree(self.stores / "probe")
        assert self.k > 30, f"workload {name}: only {self.k} durable operations"
        self.before = self.snapshot()
        print(f"workload={name} seed={SEED} K={self.k}")

    def snapshot(self) -> tuple[dict, dict]:
        return invariants.snapshot_tree(self.sentinel), invariants.snapshot_tree(self.workspace)

    def check_untouched(self) -> None:
        """10: the sentinel folder, and the workspace itself, are unchanged."""
        invariants.check_sentinel(self.before[0], self.sentinel)
        invariants.check_sentinel(self.before[1], self.workspace)

    def fresh_store(self, label: str) -> Store:
        root = self.stores / label
        if root.exists():
            shutil.rmtree(root)
        return Store.create(root)

    def crashed_run(self, n: int, label: str) -> Store:
        """A fresh store whose run `a` was ended right before operation n."""
        store = self.fresh_store(label)
        code, _ = in_child(lambda: run(self.pipeline, store, run_id="a", **self.kwargs), n)
        assert code == CRASH_EXIT, (f"workload={self.name} N={n} K={self.k}: the crash point "
                                    f"was not reached (exit {code})")
        return store


_WORKLOADS: dict[tuple[Path, str], Workload] = {}


@pytest.fixture(scope="module")
def workload_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("crashpoints")


def get_workload(name: str, base: Path) -> Workload:
    """One Workload per name and module: the reference and K are computed once."""
    if (base, name) not in _WORKLOADS:
        _WORKLOADS[(base, name)] = Workload(name, base / name)
    return _WORKLOADS[(base, name)]


# --- every crash point of a run -----------------------------------------------------------------


def crash_loop(w: Workload, chosen: Sequence[int]) -> int:
    def check(n: int) -> None:
        store = w.crashed_run(n, f"crash-{n}")
        invariants.check_store(store, after_recover=False)  # 1, 2: nothing visible is partial
        recover_ok(store)
        invariants.check_store(store)  # 1, 2, 3, 4, 8
        invariants.check_rerun(w.pipeline, store, w.reference, **w.kwargs)  # 5
        w.check_untouched()  # 10
        shutil.rmtree(store.root)

    done = run_points(check, chosen, lambda n: f"workload={w.name} seed={SEED} N={n} K={w.k}")
    print(f"crash points: workload={w.name} seed={SEED} K={w.k} points={done}")
    return done


def check_sweep_complete(w: Workload, chosen: Sequence[int]) -> None:
    """The sweep missed no crash point: it crashed at 1..last without a gap, and a run told to
    crash right before operation last+1 never reaches it, completing after exactly `last`
    operations.  This does not trust K: a K counted short, or a sweep that stops early, fails."""
    last = max(chosen)
    assert sorted(chosen) == list(range(1, last + 1)), (
        f"workload={w.name}: the sweep skipped points of 1..{last}")
    store = w.fresh_store("past-the-end")
    code, seen = in_child(lambda: run(w.pipeline, store, run_id="a", **w.kwargs), last + 1)
    assert (code, seen) == (0, last), (
        f"workload={w.name} K={w.k}: the sweep ended at N={last}, but a run told to crash right "
        f"before operation {last + 1} " + ("crashed there: the sweep missed crash points"
                                          if code == CRASH_EXIT else
                                          f"exited {code} after {seen} operations"))
    shutil.rmtree(store.root)


@pytest.mark.parametrize("name", WORKLOADS)
def test_crash_before_every_operation_of_a_run_then_recover(name, workload_base):
    """Fast tier: EVERY N in 1..K, for each workload."""
    w = get_workload(name, workload_base)
    chosen = points(w.k)
    assert crash_loop(w, chosen) == len(chosen)
    if not os.environ.get("STAGESTORE_FAULT_N"):  # replaying chosen points covers only those
        check_sweep_complete(w, chosen)


# --- nested: a crash in run, then a crash in recover ---------------------------------------------


def nested_ms(m_total: int, m_step: int, index: int) -> list[int]:
    """The points M of a nested recover or gc: every M when there are few, else every m_step-th,
    starting at a residue that rotates with the index of N."""
    if m_step == 1 or m_total <= 2 * m_step:
        return points(m_total, env="STAGESTORE_FAULT_M")
    return points(m_total, m_step, 1 + index % m_step, env="STAGESTORE_FAULT_M")


def nested_recover_loop(w: Workload, n_step: int, m_step: int) -> int:
    bases: dict[int, tuple[Store, int]] = {}
    items: list[tuple[int, int]] = []
    for index, n in enumerate(points(w.k, n_step)):
        base = w.crashed_run(n, f"nested-{n}")
        counting = copy_store(base.root, w.stores / f"nested-{n}-count")
        m_total = count_ops(lambda: recover(counting), f"recover after a crash at N={n}")
        shutil.rmtree(counting.root)
        bases[n] = (base, m_total)
        items += [(n, m) for m in nested_ms(m_total, m_step, index)]

    def where(point: tuple[int, int]) -> str:
        n, m = point
        return (f"workload={w.name} seed={SEED} run crash N={n} (K={w.k}), recover crash M={m} "
                f"(of {bases[n][1]})")

    def check(point: tuple[int, int]) -> None:
        n, m = point
        store = copy_store(bases[n][0].root, w.stores / f"nested-{n}-{m}")
        code, _ = in_child(lambda: recover(store), m)
        assert code == CRASH_EXIT, f"the crash point was not reached (exit {code})"
        invariants.check_store(store, after_recover=False)
        recover_ok(store)
        invariants.check_store(store)
        invariants.check_rerun(w.pipeline, store, w.reference)
        w.check_untouched()
        shutil.rmtree(store.root)

    done = run_points(check, items, where)
    for base, _ in bases.values():
        shutil.rmtree(base.root)
    print(f"nested run/recover: workload={w.name} seed={SEED} K={w.k} N every {n_step}, "
          f"M every {m_step}: points={done}")
    return done


def test_crash_in_run_then_crash_in_recover(workload_base):
    """Fast tier: every 10th N of the run; every 4th M of the recover that follows (rotating
    start; every M when recover has 8 operations or fewer)."""
    w = get_workload("linear", workload_base)
    assert nested_recover_loop(w, 10, 4) > 0


@pytest.mark.slow
def test_crash_in_run_then_crash_in_recover_every_point(workload_base):
    """Slow tier: EVERY N of the run, EVERY M of the recover that follows."""
    w = get_workload("linear", workload_base)
    assert nested_recover_loop(w, 1, 1) > 0


# --- nested: a crash in run, recover, a second run, then a crash in gc --------------------------


def nested_gc_loop(w: Workload, n_step: int, forget_a: bool) -> int:
    bases: dict[int, tuple[Store, int, dict[str, str]]] = {}
    items: list[tuple[int, int]] = []
    for n in points(w.k, n_step):
        base = w.crashed_run(n, f"gc-{n}")
        checked(f"workload={w.name} N={n} K={w.k}: before gc", lambda: recover_ok(base))
        assert run(w.pipeline, base, run_id="b").ok
        if forget_a and base.manifests.has_run("a"):  # a crash at N=1 leaves no run a
            forget(base, ["a"])
        before = invariants.referenced(base)
        assert before, "nothing is referenced before gc"
        counting = copy_store(base.root, w.stores / f"gc-{n}-count")
        m_total = count_ops(lambda: gc(counting), f"gc after a crash at N={n}")
        shutil.rmtree(counting.root)
        bases[n] = (base, m_total, before)
        items += [(n, m) for m in points(m_total, env="STAGESTORE_FAULT_M")]

    def where(point: tuple[int, int]) -> str:
        n, m = point
        return (f"workload={w.name} seed={SEED} forget_a={forget_a} run crash N={n} (K={w.k}), "
                f"gc crash M={m} (of {bases[n][1]})")

    def check(point: tuple[int, int]) -> None:
        n, m = point
        base, _, before = bases[n]
        store = copy_store(base.root, w.stores / f"gc-{n}-{m}")
        code, _ = in_child(lambda: gc(store), m)
        assert code == CRASH_EXIT, f"the crash point was not reached (exit {code})"
        invariants.check_objects_named(store, before, number=7)
        recover_ok(store)
        invariants.check_store(store)
        invariants.check_rerun(w.pipeline, store, w.reference, run_id="b")
        w.check_untouched()
        shutil.rmtree(store.root)

    done = run_points(check, items, where)
    for base, _, _ in bases.values():
        shutil.rmtree(base.root)
    print(f"nested run/gc: workload={w.name} seed={SEED} forget_a={forget_a} K={w.k} "
          f"N every {n_step}: points={done}")
    return done


@pytest.mark.parametrize("forget_a", [False, True], ids=["keep-a", "forget-a"])
def test_crash_in_run_then_crash_in_gc(workload_base, forget_a):
    """Fast tier: every 10th N of the run, EVERY M of the gc that follows."""
    w = get_workload("linear", workload_base)
    assert nested_gc_loop(w, 10, forget_a) > 0


@pytest.mark.slow
@pytest.mark.parametrize("forget_a", [False, True], ids=["keep-a", "forget-a"])
def test_crash_in_run_then_crash_in_gc_every_point(workload_base, forget_a):
    """Slow tier: EVERY N of the run, EVERY M of the gc that follows."""
    w = get_workload("linear", workload_base)
    assert nested_gc_loop(w, 1, forget_a) > 0


# --- invariant 7 without a crash ----------------------------------------------------------------


@pytest.mark.parametrize("forgotten", ["a", "b"])
def test_gc_after_forget_keeps_every_object_the_remaining_run_names(tmp_path, forgotten):
    """Two runs that share some objects and not others; forget one, gc: every object named by
    the remaining run (manifests, logs, tree files, input snapshots) survives, and the objects
    only the forgotten run named are reclaimed."""
    pipeline = workloads.make("linear", tmp_path / "ws")
    store = Store.create(tmp_path / "store")
    assert run(pipeline, store, run_id="a").ok
    (tmp_path / "ws" / "data" / "f2.txt").write_text("file 2\n")  # b sees different content
    assert run(pipeline, store, run_id="b").ok
    kept = "b" if forgotten == "a" else "a"
    all_before = set(invariants.referenced(store))
    forget(store, [forgotten])
    remaining = invariants.referenced(store)
    assert remaining and all(who.startswith(f"run {kept} ") for who in remaining.values())
    only_forgotten = all_before - set(remaining)
    assert only_forgotten, "the two runs name the same objects: the test would prove nothing"
    report = gc(store)
    invariants.check_objects_named(store, remaining, number=7)
    assert set(report.removed) >= only_forgotten
    assert not set(report.removed) & set(remaining)
    invariants.check_store(store)
    assert len(invariants.outputs_of(store, kept)) == 3
