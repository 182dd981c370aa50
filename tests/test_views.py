"""Folder inputs are handed to stages as shared views (stagestore/store/views.py).

A stage that writes into its view is detected (or, without root, refused) and the store's
objects stay intact; a view is reused across runs, updated by difference to exactly the new
tree, shared by concurrent attempts, removed by gc, and survives crashes of its writers.
"""

from __future__ import annotations

import os
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from invariants import check_objects_sound
from stagestore.execution.runner import run
from stagestore.inspection.gc import gc, forget
from stagestore.inspection.recover import recover
from stagestore.inspection.verify import verify
from stagestore.store import durable
from stagestore.store.trees import describe_artifact, read_tree
from stagestore.store.views import TREE, USERS, ViewStore, full_check

# The stage prints every file under its input as "path<TAB>content", so a test sees exactly
# what the view held; then runs the attack in the workspace's attack.txt (Python), if any: read
# live, not snapshotted, so that a test can stop it before `recover` executes the stage again.
LIST = """
import os, sys
root = sys.argv[1]
with open(sys.argv[2], "w") as out:
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            out.write(os.path.relpath(path, root) + "\\t" + open(path).read())
attack = open("attack.txt").read() if os.path.exists("attack.txt") else ""
if attack:
    exec(attack, {"root": root, "os": os})
"""

PIPELINE = """
[pipeline]
name = "views"

[stages.list]
cmd = ["{python}", "list.py", "{{inputs.src}}", "{{outputs.o}}"]
inputs = {{ src = "data" }}
outputs = ["o"]
"""


def _setup(ws, attack: str = "", files: int = 4) -> None:
    ws.write("list.py", LIST)
    for i in range(files):
        ws.write(f"data/sub{i % 2}/f{i}.txt", f"file {i}\n")
    if attack:
        ws.write("attack.txt", attack)
    ws.pipeline(textwrap.dedent(PIPELINE.format(python=sys.executable)))


def _listing(store, report) -> str:
    stage = report.stages[-1]
    manifest = store.manifests.read(report.run_id, stage.stage)
    return store.objects.read_bytes(manifest.outputs["o"].hash).decode()


def _expected(root: Path) -> str:
    lines = []
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            lines.append(os.path.relpath(path, root) + "\t" + open(path).read())
    return "".join(lines)


def _views(store) -> list[str]:
    return [n for n in ViewStore(store.objects).names() if (store.layout.views / n / TREE).exists()]


# --- attacks: each is detected as InputModifiedFailure, and verify passes afterwards ---

ATTACKS = {
    "append": "open(os.path.join(root, 'sub0/f0.txt'), 'a').write('tamper')",
    "truncate": "open(os.path.join(root, 'sub0/f0.txt'), 'w').close()",
    "chmod-and-write": ("p = os.path.join(root, 'sub1/f1.txt'); os.chmod(p, 0o644); "
                        "open(p, 'r+').write('FILE')"),
    "write-and-restore-mtime": (
        "p = os.path.join(root, 'sub0/f0.txt'); st = os.stat(p); os.chmod(p, 0o644); "
        "open(p, 'r+').write('FILE'); os.chmod(p, st.st_mode); "
        "os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))"),
    "unlink": "os.chmod(os.path.join(root, 'sub0'), 0o755); os.unlink(os.path.join(root, 'sub0/f2.txt'))",
    "add-a-file": "os.chmod(root, 0o755); open(os.path.join(root, 'new.txt'), 'w').write('x')",
    "add-in-a-subfolder": ("os.chmod(os.path.join(root, 'sub1'), 0o755); "
                           "open(os.path.join(root, 'sub1/new.txt'), 'w').write('x')"),
    "rename": ("os.chmod(os.path.join(root, 'sub1'), 0o755); "
               "os.rename(os.path.join(root, 'sub1/f1.txt'), os.path.join(root, 'sub1/g.txt'))"),
    "chmod-a-folder": "os.chmod(os.path.join(root, 'sub0'), 0o700)",
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_stage_writing_into_its_view_is_detected_and_the_objects_stay_intact(ws, attack):
    _setup(ws, attack=ATTACKS[attack])
    store = ws.open_store()
    report = run(ws.load(), store, run_id="a")
    failure = report.stages[-1].failure
    if os.geteuid() != 0 and failure is not None and failure.class_ == "BuildFailure":
        assert "Permission denied" in failure.signal  # refused: the view is read-only
    else:
        assert failure is not None and failure.class_ == "InputModifiedFailure", failure
    damaged = attack in ("append", "truncate", "chmod-and-write", "write-and-restore-mtime")
    if damaged and failure.class_ == "InputModifiedFailure":
        assert "objects behind it are damaged" in failure.signal
        # The write went through a hard link into the object: verify names it, recover repairs.
        assert not verify(store).ok
        (ws.root / "attack.txt").unlink()
        assert recover(store).ok
    assert verify(store).ok, verify(store).problems
    check_objects_sound(store)
    assert _views(store) == [] or not full_check(
        store.layout.views / _views(store)[0] / TREE,
        read_tree(store.objects, "blake3:" + _views(store)[0]), 0)
    # The next run gets a sound view of exactly the snapshot.
    if (ws.root / "attack.txt").exists():
        (ws.root / "attack.txt").unlink()
    again = run(ws.load(), store, run_id="b")
    assert again.ok, again.stages[-1].failure
    assert _listing(store, again) == _expected(ws.root / "data")


def test_a_stage_that_only_reads_its_view_passes_and_leaves_no_marker(ws):
    _setup(ws)
    store = ws.open_store()
    report = run(ws.load(), store, run_id="a")
    assert report.ok, report.stages[-1].failure
    assert _listing(store, report) == _expected(ws.root / "data")
    [name] = _views(store)
    assert os.listdir(store.layout.views / name / USERS) == []
    assert verify(store).ok and verify(store).warnings == []
    check_objects_sound(store)


def test_a_view_is_reused_across_runs(ws):
    _setup(ws)
    store = ws.open_store()
    assert run(ws.load(), store, run_id="a").ok
    [name] = _views(store)
    tree = store.layout.views / name / TREE
    inode = os.stat(tree).st_ino
    assert run(ws.load(), store, run_id="b", force=True).ok
    assert _views(store) == [name] and os.stat(tree).st_ino == inode


@pytest.mark.parametrize("change", ["changed", "added", "removed", "renamed", "folder-to-file"])
def test_a_view_updated_by_difference_holds_exactly_the_new_tree(ws, change):
    _setup(ws, files=40)
    store = ws.open_store()
    assert run(ws.load(), store, run_id="a").ok
    [old] = _views(store)
    old_inode = os.stat(store.layout.views / old / TREE).st_ino
    data = ws.root / "data"
    if change == "changed":
        (data / "sub0/f0.txt").write_text("changed\n")
    elif change == "added":
        (data / "sub1/new.txt").write_text("new\n")
    elif change == "removed":
        (data / "sub1/f1.txt").unlink()
    elif change == "renamed":
        (data / "sub1/f3.txt").rename(data / "sub0/moved.txt")
    else:
        for path in (data / "sub1").iterdir():
            path.unlink()
        (data / "sub1").rmdir()
        (data / "sub1").write_text("now a file\n")
    report = run(ws.load(), store, run_id="b")
    assert report.ok, report.stages[-1].failure
    assert _listing(store, report) == _expected(data)
    [new] = _views(store)
    assert new != old
    # Built from the old view by difference: the same folder, moved.
    assert os.stat(store.layout.views / new / TREE).st_ino == old_inode
    ref, _ = describe_artifact(data, "data")
    assert "blake3:" + new == ref.hash
    assert not full_check(store.layout.views / new / TREE, read_tree(store.objects, ref.hash), 0)
    assert verify(store).ok and verify(store).warnings == []
    check_objects_sound(store)


def test_concurrent_attempts_share_one_view(ws):
    _setup(ws)
    store = ws.open_store()
    assert run(ws.load(), store, run_id="a").ok
    reports = {}

    def go(run_id: str) -> None:
        reports[run_id] = run(ws.load(), store, run_id=run_id, force=True)

    threads = [threading.Thread(target=go, args=(f"c{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for report in reports.values():
        assert report.ok, report.stages[-1].failure
        assert _listing(store, report) == _expected(ws.root / "data")
    assert len(_views(store)) == 1
    assert verify(store).ok and verify(store).warnings == []


def test_concurrent_processes_share_one_view(ws):
    _setup(ws, attack="import time; time.sleep(0.5)")
    ws.open_store()
    procs = [__import__("subprocess").Popen(
        [sys.executable, "-m", "stagestore", "run", "--force"], cwd=ws.root,
        stdout=-1, stderr=-1) for _ in range(3)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    store = ws.open_store()
    assert len(_views(store)) == 1
    assert verify(store).ok and verify(store).warnings == []


def test_gc_removes_views_of_forgotten_trees_and_keeps_used_ones(ws):
    _setup(ws)
    store = ws.open_store()
    assert run(ws.load(), store, run_id="a").ok
    [name] = _views(store)
    gc(store)
    assert _views(store) == [name]  # its tree is still referenced
    forget(store, ["a"])
    gc(store)
    assert ViewStore(store.objects).names() == []
    assert not (store.layout.locks / f"view-{name}.lock").exists()


def test_gc_removes_views_unused_for_a_week(ws):
    _setup(ws)
    store = ws.open_store()
    assert run(ws.load(), store, run_id="a").ok
    [name] = _views(store)
    old = 8 * 24 * 3600
    for path in (store.layout.views / name / USERS, store.layout.views / name / "seal.json"):
        st = os.stat(path)
        os.utime(path, (st.st_atime - old, st.st_mtime - old))
    gc(store)
    assert ViewStore(store.objects).names() == []
    assert run(ws.load(), store, run_id="b", force=True).ok  # rebuilt from the objects


def test_a_view_used_by_an_attempt_that_died_is_checked_before_reuse(ws):
    _setup(ws)
    store = ws.open_store()
    assert run(ws.load(), store, run_id="a").ok
    [name] = _views(store)
    tree = store.layout.views / name / TREE
    # What a killed runner leaves: its marker, and a write nobody watched.
    durable.write_temp(store.layout.views / name / USERS / "run-dead~0123456789abcdef~list.1~0",
                       b"")
    victim = tree / "sub1" / "f1.txt"
    os.chmod(victim, 0o644)
    with open(victim, "r+") as f:
        f.write("X")
    report = run(ws.load(), store, run_id="b", force=True)
    assert report.ok
    # The damaged view was discarded and rebuilt; the stage saw the objects' bytes (the object
    # shares the inode and is damaged too, which verify reports).
    assert "X" in _listing(store, report)
    assert not verify(store).ok
    assert recover(store).ok
    report = run(ws.load(), store, run_id="c", force=True)
    assert report.ok and _listing(store, report) == _expected(ws.root / "data")
    check_objects_sound(store)


def test_an_unwatched_write_into_a_view_is_found_by_a_full_check(ws):
    """Where inotify is missing, the check after the command looks at every file."""
    _setup(ws, attack=ATTACKS["unlink"])
    store = ws.open_store()
    from stagestore.store import views

    original = views.FolderWatch.start
    views.FolderWatch.start = classmethod(lambda cls, folders: None)
    try:
        report = run(ws.load(), store, run_id="a")
    finally:
        views.FolderWatch.start = original
    assert report.stages[-1].failure.class_ == "InputModifiedFailure"
    assert verify(store).ok


def test_recover_removes_orphans_of_a_view_build_and_damaged_views(ws):
    _setup(ws)
    store = ws.open_store()
    assert run(ws.load(), store, run_id="a").ok
    [name] = _views(store)
    os.chmod(store.layout.views / name / TREE, 0o755)
    (store.layout.views / name / TREE / "extra").write_text("x")
    assert [w.kind for w in verify(store).warnings] == ["view_damaged"]
    assert recover(store).ok
    assert verify(store).ok and verify(store).warnings == []
    assert _views(store) == []
