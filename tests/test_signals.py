"""Stopping (issue 14): SIGTERM and SIGHUP stop every command as Ctrl-C does, and each run has a
stop token of its own, so that a systemic abort in one `run()` of a process leaves another alone.

The CLI tests start the real `stagestore` in a subprocess with SIGINT, SIGTERM and SIGHUP at their
defaults (pytest may run under `nohup`), wait for a real slow point (a stage that sleeps, a push
of many objects, gc waiting for the store lock), send the signal to the CLI process only, and
check the exit code (128 + the signal), the message, that no process of the stage is left, that
no failure was recorded, and that `recover` (or the same command again) completes the work.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stagestore.errors import StagestoreError
from stagestore.model.records import ExecutionOptions
from stagestore.execution.runner import run
from stagestore.store.store import Store

SIGNALS = [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGHUP, id="SIGHUP")]

# `slow` sleeps (in a grandchild: only a kill of its whole group reaches it) while the file
# SLOW exists; each process writes its pid first.
SLOW_PIPELINE = """
[pipeline]
name = "signals"

[stages.slow]
cmd = "echo $$ > STAGE_PID; if [ -e SLOW ]; then sleep 60 & echo $! > SLEEP_PID; wait; fi; echo done > {outputs.o}"
shell = true
outputs = ["o"]

[stages.after]
upstream = ["slow"]
cmd = "cp {upstream.slow.o} {outputs.o}"
shell = true
outputs = ["o"]
"""


def _defaults() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "STAGESTORE_STORE"}


def _spawn(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stagestore", *args], cwd=cwd, env=_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_defaults)


def _wait_for(condition, what: str, proc: subprocess.Popen | None = None,  # noqa: ANN001
              timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the command ended (exit {proc.returncode}) before {what}: "
                                 f"{out[-2000:]}{err[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _stopped(proc: subprocess.Popen, signum: int) -> str:
    """Send `signum` to the CLI process; its stderr, once it checked the exit and message."""
    assert proc.poll() is None, "the command ended before the signal was sent"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, (proc.returncode, err)
    assert f"interrupted by {name}" in err and "`stagestore recover`" in err, err
    assert "Traceback" not in err, err
    return err


def _slow_workspace(ws) -> None:  # noqa: ANN001
    ws.pipeline(SLOW_PIPELINE.replace("STAGE_PID", str(ws.root / "stage.pid"))
                .replace("SLEEP_PID", str(ws.root / "sleep.pid"))
                .replace("SLOW", str(ws.root / "SLOW")))
    (ws.root / "SLOW").write_text("")


def _stage_pids(ws) -> list[int]:  # noqa: ANN001
    return [int((ws.root / name).read_text()) for name in ("stage.pid", "sleep.pid")]


def _assert_interrupted_cleanly(ws, run_id: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + 5
    while not all(_dead(pid) for pid in _stage_pids(ws)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert all(_dead(pid) for pid in _stage_pids(ws)), "a process of the stage outlived the run"
    runs = ws.store / "runs" / run_id
    assert not (runs / "slow.json").exists(), "the killed stage was recorded"
    assert sorted(p.name for p in runs.iterdir()) == ["_run.json"]
    assert os.listdir(ws.store / "tmp") == [], "the attempt folder was left behind"


def _complete_with_recover(ws) -> None:  # noqa: ANN001
    (ws.root / "SLOW").unlink()
    result = ws.cli("recover")
    assert result.returncode == 0, result.stderr
    assert "completed run" in result.stdout
    result = ws.cli("verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in result.stdout + result.stderr


# --- run and recover ----------------------------------------------------------------------------


@pytest.mark.parametrize("signum", SIGNALS)
def test_a_signal_stops_run_like_ctrl_c_and_recover_completes_it(ws, signum):
    _slow_workspace(ws)
    proc = _spawn(ws.root, "run", "--run-id", "r")
    _wait_for(lambda: (ws.root / "sleep.pid").exists(), "the stage started", proc)
    _stopped(proc, signum)
    _assert_interrupted_cleanly(ws, "r")
    _complete_with_recover(ws)


def test_sigterm_stops_recover_mid_stage_and_recover_again_completes(ws):
    _slow_workspace(ws)
    proc = _spawn(ws.root, "run", "--run-id", "r")
    _wait_for(lambda: (ws.root / "sleep.pid").exists(), "the stage started", proc)
    _stopped(proc, signal.SIGTERM)
    for name in ("stage.pid", "sleep.pid"):
        (ws.root / name).unlink()
    proc = _spawn(ws.root, "recover")
    _wait_for(lambda: (ws.root / "sleep.pid").exists(), "recover ran the stage", proc)
    _stopped(proc, signal.SIGTERM)
    _assert_interrupted_cleanly(ws, "r")
    _complete_with_recover(ws)


# --- push, pull, gc -----------------------------------------------------------------------------

MANY = """
[pipeline]
name = "many"

[stages.many]
cmd = ["python", "-c", "import os, sys; os.makedirs(sys.argv[1]); [open(os.path.join(sys.argv[1], 'f%d' % i), 'w').write('object %d' % i) for i in range(int(sys.argv[2]))]", "{outputs.o}", "3000"]
outputs = ["o"]
"""


def _objects(store: Path) -> int:
    root = store / "objects"
    return sum(len(os.listdir(root / shard)) for shard in os.listdir(root)) if root.exists() else 0


def _remote_objects(remote: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(remote))


@pytest.fixture
def pushed_store(ws, tmp_path):  # noqa: ANN001, ANN201
    """A store with one run of 3000 small objects, and a folder remote `o` it is not pushed to."""
    ws.pipeline(MANY)
    assert run(ws.load(), ws.open_store(), run_id="m").ok
    remote = tmp_path / "remote"
    result = ws.cli("remote", "add", "o", f"file://{remote}")
    assert result.returncode == 0, result.stderr
    return remote


def test_sigterm_stops_a_push_of_many_objects_and_a_second_push_completes(ws, pushed_store):
    proc = _spawn(ws.root, "push", "--remote", "o", "-j", "1")
    _wait_for(lambda: _remote_objects(pushed_store) > 20, "the push sent objects", proc)
    _stopped(proc, signal.SIGTERM)
    assert _remote_objects(pushed_store) < 3000
    result = ws.cli("push", "--remote", "o")
    assert result.returncode == 0, result.stdout + result.stderr
    result = ws.cli("verify", "--remote", "o")
    assert result.returncode == 0, result.stdout + result.stderr
    assert ws.cli("verify").returncode == 0


def test_sighup_stops_a_pull_of_many_objects_and_a_second_pull_completes(ws, pushed_store,
                                                                        tmp_path):
    result = ws.cli("push", "--remote", "o")
    assert result.returncode == 0, result.stdout + result.stderr
    other = tmp_path / "other"
    result = ws.cli("--store", str(other), "remote", "add", "o", f"file://{pushed_store}")
    assert result.returncode == 0, result.stderr
    proc = _spawn(ws.root, "--store", str(other), "pull", "m", "--remote", "o", "-j", "1")
    _wait_for(lambda: _objects(other) > 20, "the pull received objects", proc)
    _stopped(proc, signal.SIGHUP)
    result = ws.cli("--store", str(other), "pull", "m", "--remote", "o")
    assert result.returncode == 0, result.stdout + result.stderr
    result = ws.cli("--store", str(other), "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _objects(other) >= 3000


def _holds_a_lock(pid: int) -> bool:
    with open("/proc/locks") as f:
        return any(line.split()[4] == str(pid) for line in f if len(line.split()) > 4)


def test_sigterm_stops_gc_waiting_for_the_store(ws):
    from stagestore.store.locking import store_lock

    ws.linear()
    store = ws.open_store()
    assert run(ws.load(), store, run_id="a").ok
    with store_lock(store.layout, exclusive=False):  # a run in flight: gc waits for it
        proc = _spawn(ws.root, "gc")
        _wait_for(lambda: _holds_a_lock(proc.pid), "gc to wait for the store", proc)
        time.sleep(0.2)
        _stopped(proc, signal.SIGTERM)
    result = ws.cli("gc")
    assert result.returncode == 0, result.stderr
    assert ws.cli("verify").returncode == 0


# --- two runs in one process --------------------------------------------------------------------

SYSTEMIC = """
[pipeline]
name = "systemic"

[stages.gate]
domain = "infrastructure"
cmd = ["sh", "-c", "echo 'gate: runner pool exhausted' >&2; exit 1"]
outputs = ["o"]
per_item = true
"""

# Waits for the file GO (at most 60 s), so that it is running when the other run aborts.
WAITING = """
[pipeline]
name = "waiting"

[stages.wait]
cmd = "touch STARTED; n=0; while [ ! -e GO ] && [ $n -lt 1200 ]; do sleep 0.05; n=$((n+1)); done; echo waited > {outputs.o}"
shell = true
outputs = ["o"]

[stages.after]
upstream = ["wait"]
cmd = "cp {upstream.wait.o} {outputs.o}"
shell = true
outputs = ["o"]
"""


class _Thread(threading.Thread):
    def __init__(self, target) -> None:  # noqa: ANN001
        super().__init__(daemon=True)
        self._target_call = target
        self.result = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._target_call()
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            self.error = exc


def _waiting_workspace(tmp_path: Path):  # noqa: ANN202
    from conftest import Workspace

    root = tmp_path / "waiting"
    root.mkdir()
    other = Workspace(root)
    other.pipeline(WAITING.replace("STARTED", str(root / "started")).replace("GO", str(root / "go")))
    return other


def test_a_systemic_abort_in_one_run_leaves_another_run_of_the_process_alone(ws, tmp_path):
    ws.pipeline(SYSTEMIC)
    items = [f"i{n:02d}" for n in range(1, 31)]
    other = _waiting_workspace(tmp_path)
    waiting = _Thread(lambda: run(other.load(), other.open_store(), run_id="w"))
    waiting.start()
    _wait_for(lambda: (other.root / "started").exists(), "the waiting stage started")
    aborting = _Thread(lambda: run(ws.load(), ws.open_store(), run_id="s", items=items, jobs=1,
                                   execution=ExecutionOptions(mode="sampling",
                                                              systemic_min_items=5,
                                                              systemic_threshold=0.8)))
    aborting.start()
    aborting.join(120)
    (other.root / "go").write_text("")
    waiting.join(120)
    assert aborting.error is None, repr(aborting.error)
    assert aborting.result.status == "aborted" and aborting.result.processed == 5
    assert waiting.error is None, repr(waiting.error)
    assert waiting.result.ok and [s.outcome for s in waiting.result.stages] == [
        "succeeded", "succeeded"]


def test_a_signal_stops_a_run_in_another_thread_with_a_stagestore_error(tmp_path):
    from stagestore.execution import processes

    other = _waiting_workspace(tmp_path)
    waiting = _Thread(lambda: run(other.load(), other.open_store(), run_id="w"))
    waiting.start()
    _wait_for(lambda: (other.root / "started").exists(), "the waiting stage started")
    processes.stop_all(signal.SIGTERM)  # what the CLI's SIGTERM handler does first
    waiting.join(30)
    assert not waiting.is_alive(), "the run did not stop"
    error = waiting.error
    assert isinstance(error, StagestoreError), repr(error)
    assert error.exit_code == 143 and "SIGTERM" in error.message
    assert "stagestore recover" in (error.hint or "")
    store = Store.open(other.store)
    assert not store.layout.manifest_path("w", "wait").exists()
    (other.root / "go").write_text("")
    assert run(other.load(), store, run_id="w").ok  # a later run in the process is not stopped
