"""Concurrency under load (issue 4), beyond tests/test_concurrency.py.

* Writers x stages into ONE store, while a maintenance loop runs `recover`, `verify`, `gc` (with
  and without `--timeout`) and a small junk run that is forgotten again, until the writers are
  done: every writer exits 0, nothing is missing, no writer lost a temp to `recover`, and every
  output holds the bytes its command wrote.  Fast tier 4 writers x 50 stages; slow tier 8 x 1,000.
* A SIGKILLed lock holder: its run lock, and its shared hold on the store lock, are taken again
  within a second.
* Two processes started together on one run and stage: exactly one executes the stage.

Seeded where timing is chosen: the seed and N are printed, `STAGESTORE_STRESS_SEED` replays.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest

from invariants import check_objects_named, check_store, referenced
from stagestore.errors import RunBusyError
from stagestore.store.layout import StoreLayout
from stagestore.store.locking import OwnerLock, owner_is_live, store_lock
from stagestore.store.store import Store
from stagestore.store.trees import read_tree


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "STAGESTORE_STORE"}
    env.update(extra)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "stagestore", *args]


def _seed() -> int:
    value = os.environ.get("STAGESTORE_STRESS_SEED")
    return int(value) if value else random.SystemRandom().randrange(1 << 32)


# --- the writers' pipelines -------------------------------------------------------------------
#
# `chains` chains of `length` stages, stage `c<C>s<K>` reading the output of `c<C>s<K-1>`.
# * Chain 0 is the same in every writer (same commands, same upstream outputs): the writers
#   share that work through the cache and the work locks.
# * In the other chains every command is tagged with its writer (so each writer executes it), but
#   even stages write the same bytes in every writer (shared objects, committed concurrently),
#   odd stages bytes of their own, and each chain starts with a folder output holding one shared
#   and one own file.


def _stage(writer: int, chain: int, k: int) -> tuple[str, object]:
    """(command, expected output: bytes for a file, {path: bytes} for a folder)."""
    tag = "" if chain == 0 else f": w{writer}; "
    need = "" if k == 0 else f"test -e {{upstream.c{chain}s{k - 1}.o}} && "
    if chain != 0 and k == 0:
        shared, own = f"shared c{chain}", f"w{writer} c{chain}"
        cmd = (f"{tag}mkdir {{outputs.o}} && printf '%s\\n' '{shared}' > {{outputs.o}}/a && "
               f"printf '%s\\n' '{own}' > {{outputs.o}}/b")
        return cmd, {"a": f"{shared}\n".encode(), "b": f"{own}\n".encode()}
    if chain == 0:
        text = f"common c0 s{k}"
    elif k % 2 == 0:
        text = f"shared c{chain} s{k}"
    else:
        text = f"w{writer} c{chain} s{k}"
    return f"{tag}{need}printf '%s\\n' '{text}' > {{outputs.o}}", f"{text}\n".encode()


def writer_pipeline(writer: int, chains: int, length: int) -> tuple[str, dict[str, object]]:
    lines = ["[pipeline]", f'name = "writer{writer}"', ""]
    expected = {}
    for chain in range(chains):
        for k in range(length):
            name = f"c{chain}s{k}"
            cmd, out = _stage(writer, chain, k)
            expected[name] = out
            lines += [f"[stages.{name}]", "cmd = " + _toml_str(cmd), "shell = true",
                      'outputs = ["o"]']
            if k:
                lines.append(f'upstream = ["c{chain}s{k - 1}"]')
            lines.append("")
    return "\n".join(lines), expected


def _toml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


JUNK = """
[pipeline]
name = "junk"

[stages.same]
cmd = "printf 'shared c1 s2\\n' > {outputs.o}"
shell = true
outputs = ["o"]

[stages.own]
upstream = ["same"]
cmd = "cat {upstream.same.o} > {outputs.o}; echo junk $STAGESTORE_RUN_ID >> {outputs.o}"
shell = true
outputs = ["o"]
"""


def _check_outputs(store: Store, run_id: str, expected: dict[str, object]) -> None:
    assert sorted(store.manifests.stages(run_id)) == sorted(expected), run_id
    for stage, want in expected.items():
        manifest = store.manifests.read(run_id, stage)
        assert manifest.status == "succeeded", (run_id, stage, manifest.status)
        ref = manifest.outputs["o"]
        if isinstance(want, bytes):
            assert ref.kind == "file" and store.objects.read_bytes(ref.hash) == want, (run_id, stage)
        else:
            listing = read_tree(store.objects, ref.hash)
            got = {e.path: store.objects.read_bytes(e.hash) for e in listing.entries
                   if e.kind == "file"}
            assert got == want, (run_id, stage, got)


class Maintenance(threading.Thread):
    """Steps picked from `steps` (recover, verify, gc, gc --timeout, a junk run forgotten again)
    in a loop, the first one first, until told to stop."""

    def __init__(self, name: str, steps: list[str], root: Path, store: Path, rng: random.Random,
                 done: threading.Event) -> None:
        super().__init__(name=name)
        self.steps = steps
        self.root = root
        self.store = store
        self.rng = rng
        self.done = done
        self.errors: list[str] = []
        self.counts = {"recover": 0, "verify": 0, "gc": 0, "gc-locked": 0, "junk": 0}

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(_cli(*args, "--store", str(self.store)), cwd=self.root, env=_env(),
                              capture_output=True, text=True, timeout=600)

    def fail(self, what: str, result: subprocess.CompletedProcess) -> None:
        self.errors.append(f"{what} exited {result.returncode}: {result.stdout[-1500:]}"
                           f"{result.stderr[-1500:]}")

    def run(self) -> None:
        try:
            self.steps_until_done()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(f"{self.name} thread crashed: {exc!r}")

    def steps_until_done(self) -> None:
        n = 0
        while not self.done.is_set() and not self.errors:
            n += 1
            step = self.steps[0] if n == 1 else self.rng.choice(self.steps)
            if step == "recover":
                result = self.cli("recover", "--json")
                if result.returncode != 0 or "Traceback" in result.stderr:
                    self.fail("recover", result)
                else:
                    # Nothing here ever dies, so nothing is orphaned: the only thing recover
                    # may do is skip the runs that are live.  A removed temp is a live one.
                    acted = [a for a in msgspec.json.decode(result.stdout)["actions"]
                             if a["action"] != "skip_live_run"]
                    if acted:
                        self.errors.append(f"recover acted beside live processes: {acted}")
                self.counts["recover"] += 1
            elif step == "verify":
                result = self.cli("verify")
                if result.returncode != 0 or "Traceback" in result.stderr:
                    self.fail("verify (while writers run)", result)
                self.counts["verify"] += 1
            elif step in ("gc", "gc-timeout"):
                args = ["gc"] if step == "gc" else ["gc", "--timeout", f"{self.rng.uniform(0, 0.5):.2f}"]
                result = self.cli(*args)
                if result.returncode == 0:
                    self.counts["gc"] += 1
                elif step == "gc-timeout" and result.returncode == 1 and \
                        "the store is locked by another stagestore process" in result.stderr:
                    self.counts["gc-locked"] += 1
                else:
                    self.fail(" ".join(args), result)
            else:
                run_id = f"junk-{self.name}-{n}"
                result = self.cli("run", "-p", "junk.toml", "--run-id", run_id, "-q")
                if result.returncode != 0:
                    self.fail(f"run {run_id}", result)
                else:
                    result = self.cli("forget", run_id)
                    if result.returncode != 0:
                        self.fail(f"forget {run_id}", result)
                self.counts["junk"] += 1


def _stress(tmp_path: Path, writers: int, chains: int, length: int, jobs: int) -> None:
    seed = _seed()
    print(f"\nconcurrency stress: seed={seed} N={writers} writers x {chains * length} stages "
          f"(replay: STAGESTORE_STRESS_SEED={seed})", flush=True)
    rng = random.Random(seed)
    root = tmp_path / "ws"
    root.mkdir()
    store_root = root / "store"
    (root / "junk.toml").write_text(JUNK)
    expected = {}
    for w in range(writers):
        text, expected[f"w{w}"] = writer_pipeline(w, chains, length)
        (root / f"writer{w}.toml").write_text(text)
    staggers = [rng.uniform(0, 1.0) for _ in range(writers)]
    Store.create(store_root)
    # Garbage for gc from the start: a junk run, forgotten.
    for args in (["run", "-p", "junk.toml", "--run-id", "junk0", "-q"], ["forget", "junk0"]):
        subprocess.run(_cli(*args, "--store", str(store_root)), cwd=root, env=_env(), check=True,
                       capture_output=True)

    done = threading.Event()
    # One thread repairs and checks, the other collects garbage and makes more of it.
    maintenance = [
        Maintenance("repair", ["recover", "recover", "verify"], root, store_root,
                    random.Random(seed + 1), done),
        # A blocking gc waits for every run holding the store and holds off runs that start
        # after it, so it is rarer than gc --timeout: the writers should mostly overlap.
        Maintenance("collect", ["gc-timeout", "gc-timeout", "gc", "junk", "junk"], root,
                    store_root, random.Random(seed + 2), done)]
    began = time.monotonic()
    for thread in maintenance:
        thread.start()
    procs = []
    try:
        start = time.monotonic()
        for w in sorted(range(writers), key=lambda w: staggers[w]):
            time.sleep(max(0.0, start + staggers[w] - time.monotonic()))
            err = open(root / f"writer{w}.err", "w")
            procs.append((w, err, subprocess.Popen(
                _cli("run", "-p", f"writer{w}.toml", "--store", str(store_root), "--run-id",
                     f"w{w}", "-j", str(jobs), "-q"),
                cwd=root, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err)))
        codes = {}
        for w, err, proc in procs:
            codes[w] = proc.wait(timeout=3600)
            err.close()
    finally:
        done.set()
        for thread in maintenance:
            thread.join(timeout=600)
        for _, _, proc in procs:
            if proc.poll() is None:
                proc.kill()
    elapsed = time.monotonic() - began
    counts = {k: sum(t.counts[k] for t in maintenance) for k in maintenance[0].counts}
    errors = [e for t in maintenance for e in t.errors]
    print(f"writers done in {elapsed:.1f}s; beside them: {counts}", flush=True)
    where = f"seed={seed} N={writers}x{chains * length}"
    for w in range(writers):
        err = (root / f"writer{w}.err").read_text()
        assert codes[w] == 0, f"{where}: writer {w} exited {codes[w]}: {err[-3000:]}"
        # A temp removed under a live writer (by recover) would surface as a missing file.
        assert "No such file" not in err and "Traceback" not in err, f"{where}: writer {w}: {err}"
    assert not errors, f"{where}: {errors}"
    assert counts["recover"] >= 1, f"{where}: recover never ran beside the writers"

    store = Store.open(store_root)
    check_objects_named(store, referenced(store))  # zero missing objects
    check_store(store)  # verify clean, tmp/ empty, objects sound
    for w in range(writers):
        _check_outputs(store, f"w{w}", expected[f"w{w}"])


# Two jobs per writer: worker threads decoding records side by side once crashed a writer with
# SIGSEGV (the regression test below).
JOBS = 2


def test_four_writers_fifty_stages_with_gc_and_recover_beside_them(tmp_path):
    _stress(tmp_path, writers=4, chains=5, length=10, jobs=JOBS)


@pytest.mark.slow
def test_eight_writers_thousand_stages_with_gc_and_recover_beside_them(tmp_path):
    # 8 writers x 1,000 stages (20 chains of 50): 8,000 stage manifests, about 7,000 executions.
    _stress(tmp_path, writers=8, chains=20, length=50, jobs=JOBS)


# --- worker threads decoding records for the first time -----------------------------------

FIRST_DECODE = """
import sys, threading
sys.setswitchinterval(1e-6)  # switch threads as often as possible: widens the window
from stagestore.store.store import Store

store = Store.open(sys.argv[1])
barrier = threading.Barrier(4)

def work():
    barrier.wait()
    for _ in range(20):
        store.manifests.read("a", "only")

threads = [threading.Thread(target=work) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
"""


# Regression (fixed): records.py decoded with msgspec.json.decode(data, type=T), whose type
# information msgspec (0.22.0 here) builds lazily on first use and not safely across threads;
# `run --jobs N` worker threads decoding a record type for the first time side by side died with
# SIGSEGV (about 1 try in 7).  Decoders are now built once at import.
def test_worker_threads_decoding_a_record_type_for_the_first_time_do_not_crash(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "stagestore.toml").write_text(
        '[pipeline]\nname = "one"\n\n[stages.only]\ncmd = "echo x > {outputs.o}"\n'
        'shell = true\noutputs = ["o"]\n')
    subprocess.run(_cli("run", "--store", str(root / "store"), "--run-id", "a", "-q"), cwd=root,
                   env=_env(), check=True, capture_output=True)
    # Each try is a fresh process (the type information is built once per process); a crash
    # shows up in about 1 try in 7 here, so 100 tries miss it with a chance of about 1e-7.
    for attempt in range(100):
        result = subprocess.run([sys.executable, "-c", FIRST_DECODE, str(root / "store")],
                                env=_env(PYTHONFAULTHANDLER="1"), capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, (
            f"try {attempt}: four threads reading one manifest for the first time: exit "
            f"{result.returncode}\n{result.stderr[-3000:]}")


# --- a SIGKILLed lock holder ------------------------------------------------------------------

HOLD = """
[pipeline]
name = "hold"

[stages.hold]
cmd = ["python3", "-c", "import os, sys, time; time.sleep(float(os.environ.get('HOLD', '0'))); open(sys.argv[1], 'w').write('held')", "{outputs.o}"]
outputs = ["o"]
"""


def _hold(root: Path, run_id: str) -> subprocess.Popen:
    """A `stagestore run` that holds run `run_id`'s lock, and the store lock shared, for 60 s."""
    proc = subprocess.Popen(_cli("run", "--store", str(root / "store"), "--run-id", run_id, "-q"),
                            cwd=root, env=_env(HOLD="60"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    layout = StoreLayout(root / "store")
    deadline = time.monotonic() + 30
    while not ((layout.tmp.is_dir() and any(e.name.startswith(f"run-{run_id}~") and
                                            e.name.endswith("~hold.1")
                                            for e in os.scandir(layout.tmp)))
               and owner_is_live(layout, f"run-{run_id}")):
        assert proc.poll() is None and time.monotonic() < deadline, "the holder never started"
        time.sleep(0.01)
    return proc


def _hold_workspace(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    (root / "stagestore.toml").write_text(HOLD)
    return root


def test_a_sigkilled_run_lock_holder_is_replaced_within_a_second(tmp_path):
    root = _hold_workspace(tmp_path)
    layout = StoreLayout(root / "store")
    # 1. measured by polling the lock itself
    proc = _hold(root, "one")
    os.killpg(proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    lock = OwnerLock(layout, "run-one")
    while not lock.try_acquire():
        assert time.monotonic() - killed < 5, "the run lock was never released"
        time.sleep(0.005)
    took = time.monotonic() - killed
    lock.release()
    proc.wait(timeout=30)
    print(f"\nrun lock of a SIGKILLed run taken again after {took * 1000:.0f} ms")
    assert took < 1.0

    # 2. measured by the CLI: `stagestore run --run-id SAME`, retried while it says busy
    proc = _hold(root, "two")
    os.killpg(proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    tries = 0
    while True:
        attempt = time.monotonic()
        result = subprocess.run(_cli("run", "--store", str(root / "store"), "--run-id", "two"),
                                cwd=root, env=_env(HOLD="0"), capture_output=True, text=True,
                                timeout=60)
        if result.returncode == 0:
            break
        assert result.returncode == 1 and "in use by another live stagestore process" in \
            result.stderr, result.stderr
        assert time.monotonic() - killed < 5, "the run stayed busy"
        tries += 1
    took = attempt - killed
    proc.wait(timeout=30)
    print(f"`stagestore run --run-id two` started {took * 1000:.0f} ms after the SIGKILL got the "
          f"run ({tries} refused before it)")
    assert took < 1.0
    result = subprocess.run(_cli("recover", "--store", str(root / "store")), cwd=root,
                            env=_env(HOLD="0"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    check_store(Store.open(root / "store"))


def test_a_sigkilled_shared_store_lock_holder_lets_gc_in_within_a_second(tmp_path):
    root = _hold_workspace(tmp_path)
    layout = StoreLayout(root / "store")
    # 1. measured by polling the exclusive hold in this process
    proc = _hold(root, "one")
    try:
        with store_lock(layout, exclusive=True, timeout=0):
            pytest.fail("the store lock was not held shared by the running run")
    except RunBusyError:
        pass
    os.killpg(proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    while True:
        try:
            with store_lock(layout, exclusive=True, timeout=0):
                took = time.monotonic() - killed
                break
        except RunBusyError:
            assert time.monotonic() - killed < 5, "the store lock was never released"
            time.sleep(0.005)
    proc.wait(timeout=30)
    print(f"\nexclusive store lock taken {took * 1000:.0f} ms after its shared holder's SIGKILL")
    assert took < 1.0

    # 2. a `stagestore gc` already waiting for the exclusive hold when the holder is killed
    proc = _hold(root, "two")
    collector = subprocess.Popen(_cli("gc", "--store", str(root / "store")), cwd=root,
                                 env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
    time.sleep(1.0)
    assert collector.poll() is None, "gc did not wait for the running run"
    os.killpg(proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    out, err = collector.communicate(timeout=60)
    took = time.monotonic() - killed
    proc.wait(timeout=30)
    print(f"waiting gc finished {took * 1000:.0f} ms after the shared holder's SIGKILL")
    assert collector.returncode == 0, err
    assert took < 1.0
    result = subprocess.run(_cli("recover", "--store", str(root / "store")), cwd=root,
                            env=_env(HOLD="0"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    check_store(Store.open(root / "store"))


# --- two processes on one run and stage -------------------------------------------------------

ONCE = """
[pipeline]
name = "once"

[stages.only]
cmd = "echo $PPID >> {log}; sleep 0.5; echo done > {{outputs.o}}"
shell = true
outputs = ["o"]
"""

# Waits for the go file, then becomes `stagestore run` (same pid: the stage's $PPID is it).
BARRIER = ("import os, sys, time\n"
           "while not os.path.exists(sys.argv[1]): time.sleep(0.001)\n"
           "os.execv(sys.executable, [sys.executable, '-m', 'stagestore', *sys.argv[2:]])\n")


@pytest.mark.parametrize("round_", range(5))
def test_two_processes_started_together_on_one_run_never_both_write_the_stage(tmp_path, round_):
    root = tmp_path / "ws"
    root.mkdir()
    log = tmp_path / "executions"
    (root / "stagestore.toml").write_text(ONCE.format(log=log))
    go = tmp_path / "go"
    store = root / "store"
    Store.create(store)  # so neither is held up by creating it
    procs = [subprocess.Popen([sys.executable, "-c", BARRIER, str(go), "run", "--store",
                               str(store), "--run-id", "x"], cwd=root, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    time.sleep(0.3)  # both are waiting on the barrier
    go.write_text("go")
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        results.append((proc.returncode, proc.pid, err))
    executions = log.read_text().split()
    assert len(executions) == 1, f"the stage ran {len(executions)} times: {executions}"
    winners = [r for r in results if r[0] == 0]
    losers = [r for r in results if r[0] != 0]
    print(f"\nexit codes {sorted(r[0] for r in results)}; the stage ran once, under pid "
          f"{executions[0]}")
    if losers:  # the usual case: the second is refused at once
        assert len(winners) == 1 and len(losers) == 1, results
        code, _, err = losers[0]
        assert code == 1 and "error: run 'x' is in use by another live stagestore process" in err, err
        assert "Traceback" not in err
    # Either way exactly one process executed the stage, and it is one that succeeded.
    assert int(executions[0]) in [pid for _, pid, _ in winners], (executions, results)
    manifest = Store.open(store).manifests.read("x", "only")
    assert manifest.status == "succeeded" and manifest.attempts == 1
    check_store(Store.open(store))
