"""The store's invariants, checked by one helper after every faulted run (issue 4).

1. Every manifest that decodes names only objects that exist and whose BLAKE3 matches their name.
2. A stage has a complete manifest with all its outputs, or none.
3. After recover: nothing in `tmp/`, no temp-named files elsewhere, no zero-length object unless
   it is the empty content's.
4. `verify` passes (no problem, no warning) after a crash plus recover.
5. After recover and a rerun, every output hash equals a fault-free reference run; one more rerun
   executes no stage command.
6. (power loss) every stage reported successful before the crash keeps its manifest and objects.
7. `gc` never removes an object named by a manifest that existed before it ran.
8. Objects keep mode 0444, link count 1 and their content.
9. An injected error surfaces as an error (no success), with no leaked descriptor or held lock.
10. Nothing outside the store and the declared outputs changes (a sentinel folder).

`check_store` covers 1-4 and 8; the others are helpers the suites call where they apply.  Every
failure message names the invariant, so a failing fault test says which promise broke.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from stagestore.store.hashing import EMPTY_DIGEST, hash_file
from stagestore.store.layout import TMP_SEP
from stagestore.store.locking import OwnerLock, store_lock
from stagestore.store.objects import OBJECT_MODE
from stagestore.model.records import ArtifactRef
from stagestore.store.store import Store
from stagestore.store.trees import read_tree
from stagestore.inspection.verify import verify


class InvariantError(AssertionError):
    pass


def _fail(number: int, message: str) -> InvariantError:
    return InvariantError(f"invariant {number}: {message}")


def referenced(store: Store) -> dict[str, str]:
    """digest -> who names it, for every object named by a decodable manifest, run record or
    item record (outputs, inputs, logs, tree files, snapshots)."""
    names: dict[str, str] = {}

    def note(ref: ArtifactRef, who: str) -> None:
        names.setdefault(ref.hash, who)
        if ref.kind == "tree" and store.objects.exists(ref.hash):
            try:
                listing = read_tree(store.objects, ref.hash)
            except Exception:  # noqa: BLE001 - reported by invariant 1 as a bad object
                return
            for entry in listing.entries:
                if entry.hash is not None:
                    names.setdefault(entry.hash, f"{who} file {entry.path}")

    manifests = store.manifests
    for run_id in manifests.runs():
        try:
            record = manifests.read_run(run_id)
        except Exception:  # noqa: BLE001
            record = None
        if record is not None:
            for stage, refs in record.inputs.items():
                for name, ref in refs.items():
                    note(ref, f"run {run_id} snapshot {stage}.{name}")
        for item in manifests.items(run_id):
            try:
                item_record = manifests.read_item_optional(run_id, item)
            except Exception:  # noqa: BLE001
                item_record = None
            if item_record is not None:
                for stage, refs in item_record.inputs.items():
                    for name, ref in refs.items():
                        note(ref, f"run {run_id} item {item} snapshot {stage}.{name}")
    for run_id, item, stage, manifest in manifests.iter_manifests():
        if isinstance(manifest, Exception):
            continue
        who = f"run {run_id}{' item ' + item if item else ''} stage {stage}"
        for name, ref in (*manifest.outputs.items(), *manifest.inputs.items()):
            note(ref, f"{who} {name}")
        for log in manifest.logs:
            names.setdefault(log.stdout, f"{who} stdout")
            names.setdefault(log.stderr, f"{who} stderr")
    return names


def check_objects_named(store: Store, names: dict[str, str], number: int = 1) -> None:
    for digest, who in sorted(names.items()):
        path = store.objects.path(digest)
        if not path.is_file():
            raise _fail(number, f"{who} names object {digest}, which is missing")
        if hash_file(path) != digest:
            raise _fail(number, f"{who} names object {digest}, whose bytes do not match")


def check_complete_manifests(store: Store) -> None:
    """2: a succeeded (or degraded) manifest has every output its stage declares."""
    for run_id, item, stage, manifest in store.manifests.iter_manifests():
        if isinstance(manifest, Exception) or manifest.status == "failed":
            continue
        try:
            spec = store.manifests.read_run(run_id).definition.stages[stage]
        except Exception:  # noqa: BLE001 - a manifest without its run record: verify's business
            continue
        if sorted(manifest.outputs) != sorted(spec.outputs):
            raise _fail(2, f"run {run_id} stage {stage} item {item}: outputs "
                           f"{sorted(manifest.outputs)} != declared {sorted(spec.outputs)}")


def check_no_temps(store: Store) -> None:
    """3: nothing in tmp/, no temp-named entry anywhere else, no zero-length object but the
    empty content's."""
    leftover = sorted(os.listdir(store.layout.tmp)) if store.layout.tmp.is_dir() else []
    if leftover:
        raise _fail(3, f"tmp/ still holds {leftover[:5]}")
    for folder, dirs, files in os.walk(store.root):
        if Path(folder) == store.layout.locks:
            continue
        for name in (*dirs, *files):
            if TMP_SEP in name:
                raise _fail(3, f"temp-named entry {Path(folder) / name} outside tmp/")
    for digest, path in store.objects.scan():
        if digest is not None and os.stat(path).st_size == 0 and digest != EMPTY_DIGEST:
            raise _fail(3, f"object {digest} is empty")


def _view_links(store: Store) -> dict[tuple[int, int], int]:
    """How many names each inode has under `views/*/tree` (store/views.py links objects)."""
    links: dict[tuple[int, int], int] = {}
    for folder, _, files in os.walk(store.layout.views):
        if not Path(folder).relative_to(store.layout.views).parts[1:2] == ("tree",):
            continue
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            links[(st.st_dev, st.st_ino)] = links.get((st.st_dev, st.st_ino), 0) + 1
    return links


def check_objects_sound(store: Store) -> None:
    """8: every object has mode 0444, one link besides those of views, and bytes that hash to
    its name."""
    views = _view_links(store)
    for digest, path in store.objects.scan():
        if digest is None:
            raise _fail(8, f"{path} in objects/ is not an object name")
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise _fail(8, f"object {digest} is not a regular file")
        if stat.S_IMODE(st.st_mode) != OBJECT_MODE:
            raise _fail(8, f"object {digest} has mode {stat.S_IMODE(st.st_mode):o}")
        if st.st_nlink != 1 + views.get((st.st_dev, st.st_ino), 0):
            raise _fail(8, f"object {digest} has {st.st_nlink} links")
        if hash_file(path, st.st_size) != digest:
            raise _fail(8, f"object {digest} does not match its name")


def check_verify_clean(store: Store) -> None:
    """4: verify finds no problem and no warning."""
    report = verify(store)
    if not report.ok or report.warnings:
        raise _fail(4, "verify is not clean: "
                       + "; ".join(f.message for f in [*report.problems, *report.warnings][:5]))


def check_store(store: Store, *, after_recover: bool = True) -> None:
    """Invariants 1, 2, 8 always; 3 and 4 when `recover` has run since the fault."""
    check_objects_named(store, referenced(store))
    check_complete_manifests(store)
    if after_recover:
        check_no_temps(store)
        check_verify_clean(store)
        check_objects_sound(store)


def outputs_of(store: Store, run_id: str) -> dict[tuple[str | None, str], str | None]:
    """(item, stage) -> output_hash of every manifest of a run."""
    found = {}
    for _, item, stage, manifest in store.manifests.iter_manifests([run_id]):
        if not isinstance(manifest, Exception):
            found[(item, stage)] = manifest.output_hash
    return found


def check_rerun(pipeline, store: Store, reference: dict, run_id: str = "a", **run_kwargs) -> None:  # noqa: ANN001
    """5: a rerun of `run_id` ends with the reference's output hashes, and a run after that
    executes nothing."""
    from stagestore.execution.runner import run

    run(pipeline, store, run_id=run_id, **run_kwargs)
    got = outputs_of(store, run_id)
    if got != reference:
        raise _fail(5, f"outputs after rerun {got} != reference {reference}")
    again = run(pipeline, store, run_id=run_id + "-again", **run_kwargs)
    executed = [s.stage for s in again.stages if s.executed] + [
        s.stage for i in again.items for s in i.stages if s.executed]
    if executed:
        raise _fail(5, f"a second rerun executed {executed}")


def check_reported_kept(store: Store, reported: list[tuple[str, str | None, str, str]]) -> None:
    """6: each (run, item, stage, output_hash) reported successful still has that manifest, and
    every object it names: its outputs and its inputs, and for a folder every file of it (a
    file inside a tree, or an input snapshot, lost to a missing sync would otherwise pass: a
    later recover re-runs the deterministic stage and hides it)."""
    for run_id, item, stage, output_hash in reported:
        try:
            manifest = store.manifests.read(run_id, stage, item)
        except Exception as exc:  # noqa: BLE001
            raise _fail(6, f"stage {stage} (item {item}) of run {run_id} was reported successful "
                           f"but its manifest is gone or unreadable: {exc}") from None
        if manifest.output_hash != output_hash:
            raise _fail(6, f"stage {stage} of run {run_id}: output_hash changed")
        names = {}
        refs = [(f"output {name}", ref) for name, ref in manifest.outputs.items()]
        refs += [(f"input {name}", ref) for name, ref in manifest.inputs.items()]
        for what, ref in refs:
            names[ref.hash] = f"run {run_id} stage {stage} {what}"
        check_objects_named(store, names, number=6)  # tree objects first: they are read next
        for what, ref in refs:
            if ref.kind == "tree":
                check_objects_named(store, {
                    entry.hash: f"run {run_id} stage {stage} {what} file {entry.path}"
                    for entry in read_tree(store.objects, ref.hash).entries
                    if entry.hash is not None}, number=6)


def check_no_leaks(fds_before: set[int], store: Store, run_ids: tuple[str, ...] = ("a",)) -> None:
    """9: no descriptor leaked by the failed operation, and no lock still held."""
    leaked = open_fds() - fds_before
    if leaked:
        targets = []
        for fd in sorted(leaked):
            try:
                targets.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        store_paths = [t for t in targets if t.startswith(str(store.root))]
        if store_paths:
            raise _fail(9, f"leaked descriptors into the store: {store_paths}")
    try:
        with store_lock(store.layout, exclusive=True, timeout=0):
            pass
    except Exception as exc:  # noqa: BLE001
        raise _fail(9, f"the store lock is still held: {exc}") from None
    for run_id in run_ids:
        lock = OwnerLock(store.layout, f"run-{run_id}")
        if not lock.try_acquire():
            raise _fail(9, f"the lock of run {run_id} is still held")
        lock.release()


def open_fds() -> set[int]:
    try:
        return {int(name) for name in os.listdir("/proc/self/fd")}
    except OSError:
        return set()


def snapshot_tree(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """10: path -> (mode, size, mtime_ns, sha256) of everything under `root`, without following
    symlinks (a symlink's target string is hashed)."""
    found = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in (*dirs, *files):
            path = Path(folder) / name
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                digest = hashlib.sha256(os.readlink(path).encode()).hexdigest()
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                digest = ""
            found[str(path.relative_to(root))] = (st.st_mode, st.st_size if not stat.S_ISDIR(
                st.st_mode) else 0, st.st_mtime_ns if not stat.S_ISDIR(st.st_mode) else 0, digest)
    return found


def check_sentinel(before: dict, root: Path) -> None:
    after = snapshot_tree(root)
    if after != before:
        changed = sorted(set(before) ^ set(after)) + sorted(
            k for k in set(before) & set(after) if before[k] != after[k])
        raise _fail(10, f"the sentinel folder changed: {changed[:5]}")
