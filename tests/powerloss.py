"""A power-loss model of the filesystem under a store (ALICE-style), for invariant 6.

`Recording` watches one fault-free workload through `durable.set_recorder` (every durable
operation is announced *before* it happens) and keeps an abstract filesystem:

* **nodes**: files (bytes and mode as they are *now*, and as of their last `fsync`) and folders
  (their entries as they are now);
* **entry changes**: every create, mkdir, link, rename, unlink and rmtree is one or two changes
  `(folder, name -> node or nothing)`, each tagged with the index of the operation that made it;
* **barriers**: `fsync` of a file makes its current bytes *and mode* durable; `fsync_dir` of a
  folder makes every earlier entry change of that folder durable.

It stores all that as an event list, with a mark where each operation starts, so the state after
any prefix P (operations 0..P-1 completed) is rebuilt by replaying the events up to mark P
(`Recording.state(P)`).  A crash image (`State.image`) is then chosen by two policies:

* **meta** (which entry changes survive): an entry change is *forced* when a later `fsync_dir` of
  its folder completed before the crash; any other change survives or not as the policy says:
  ``synced`` (none survives: only what was made durable), ``all`` (every one survives, as a
  journalling filesystem that commits metadata in order would leave it), ``swap`` (all but
  those of operation P-2: the last two operations reordered; when P-1 is a barrier for P-2 --
  the fsync_dir of a folder P-2 changed -- P-2's changes are forced and the image is the same
  as ``all``; a write and its file's fsync are data, which the data policy covers),
  ``random`` (each operation's changes survive with probability 1/2, an arbitrary reordering
  subject only to the barriers).  The changes of one operation survive or vanish together (a
  rename between two folders is atomic).
* **data** (what a file holds when its bytes or mode changed since its last fsync): ``dropped``
  (its last fsynced bytes, or empty if it never was, and its mode as of that fsync, or as
  created), ``torn`` (the first half of its current bytes), ``garbage`` (random bytes of its
  current length), and ``mix`` (one of those or its current bytes, at random per file).  A file
  not changed since its fsync always holds its fsynced bytes and mode.  A file only appended
  to since its fsync (`durable.append`: an item log segment) keeps its fsynced bytes: ``torn``
  and ``garbage`` apply to the appended tail only.

Assumptions of the model (see also `Recording` and `State.image`):

* **chmod** is inode metadata that becomes durable with the file's next `fsync` (as with the
  file's bytes), never by a folder fsync; `commit_file` chmods 0444 before its fsync.  A torn or
  garbage file keeps its current mode (the inode was written, its data blocks were not); a
  dropped one reverts to its last durable mode.
* **rmtree** is one change: the tree's entry disappears from its parent.  A partly removed
  tree (some children gone, the folder still there) is not modelled; the trees removed are
  temps in `tmp/` and empty run folders, whose partial removal would leave an orphan that
  `recover` removes anyway.
* **Hard links** (`link`, the read-only views in `tmp/`) add an entry naming the same node; a
  crash image materialises them as real hard links, so an object linked from a surviving view
  has two links until `recover` removes the view.
* Files a stage process writes (outside the seam) enter the model at the first operation that
  names them (the chmod, fsync or rename of `commit_file`), with the bytes they hold then, as
  entry changes of that operation; before that they are absent from images.  They live in an
  attempt folder in `tmp/`, which is never fsynced during a run.  Likewise `stdout`/`stderr`,
  created through the seam and written by the stage, are re-read before every operation while
  they are not fsynced.
* `locks/` is not modelled: its lock files are taken and created outside the seam and mean
  nothing after a crash; every image gets an empty `locks/`.
* An operation that will fail (O_EXCL on an existing path, `mkdir` of an existing folder,
  unlink or rename of a missing path) changes nothing; this is decided from the disk at the
  announcement, which is exact because the workloads run with one job.
* The store's state when recording starts (after `Store.create`) is taken as fully durable.
* Reordered (``swap``, ``random``) images may drop an operation while keeping a later one that
  depends on it (a create lost, the rename of the created file kept): changes are per folder
  entry and name nodes, so the result is still a set of directory entries a filesystem could
  hold (a node may then have two names, materialised as a hard link).
* A process crash before the power loss (the tests' `Crash`) is a fault hook raising at an
  operation and at every later one, so the killed process changes nothing more; the recording
  goes on with the next process (recover, or a rerun) as one sequence, and what the killed
  process left undurable stays undurable unless a later fsync covers it.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from stagestore.store import durable

ROOT = 0
META_POLICIES = ("synced", "all", "swap", "random")
DATA_POLICIES = ("dropped", "torn", "garbage", "mix")
_MODEL_SKIP = ("locks",)


class ModelError(AssertionError):
    """The recorder could not follow what the code did: a bug in the model, not in stagestore."""


class _LiveFile:
    __slots__ = ("links", "content", "mode")

    def __init__(self, content: bytes, mode: int | None) -> None:
        self.links: list[tuple[int, str]] = []
        self.content = content
        self.mode = mode


class _LiveDir:
    __slots__ = ("links", "entries")

    def __init__(self) -> None:
        self.links: list[tuple[int, str]] = []
        self.entries: dict[str, int] = {}


class Recording:
    """The event list of one recorded workload; `recorder` and `progress` are the two hooks.

    Events: ("mark", i, op, path, src) where operation i starts; ("file", id, bytes, mode,
    durable) and ("dir", id) for a new node; ("content", id, bytes, mode) when a file's bytes or
    mode changed; ("sync_file", id); ("set", folder, name, id or None, op index);
    ("sync_dir", folder); ("report", run_id, item, stage, output_hash) for a progress event.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.events: list[tuple] = []
        self.ops: list[tuple[str, str, str | None]] = []
        self.marks: list[int] = []  # event index of mark i
        self._nodes: dict[int, _LiveFile | _LiveDir] = {ROOT: _LiveDir()}
        self._watch: set[int] = set()
        self._next = 1
        self._op = -1
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self.events.append(("dir", ROOT))
        self._load_initial()
        self.finished = False

    # --- the initial store: everything durable ---

    def _load_initial(self) -> None:
        def walk(folder: Path, dir_id: int) -> None:
            for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                if dir_id == ROOT and entry.name in _MODEL_SKIP:
                    continue
                path = Path(entry.path)
                st = os.lstat(path)
                if stat.S_ISDIR(st.st_mode):
                    child = self._new_dir()
                    self._set(dir_id, entry.name, child)
                    walk(path, child)
                elif stat.S_ISREG(st.st_mode):
                    child = self._new_file(path.read_bytes(), stat.S_IMODE(st.st_mode), durable=True)
                    self._set(dir_id, entry.name, child)
                else:
                    raise ModelError(f"unexpected {path} in the initial store")
            self.events.append(("sync_dir", dir_id))

        walk(self.root, ROOT)

    # --- the live model ---

    def _new_dir(self) -> int:
        node = self._next
        self._next += 1
        self._nodes[node] = _LiveDir()
        self.events.append(("dir", node))
        return node

    def _new_file(self, content: bytes, mode: int | None, durable: bool = False) -> int:
        node = self._next
        self._next += 1
        self._nodes[node] = _LiveFile(content, mode)
        self.events.append(("file", node, content, mode, durable))
        return node

    def _set(self, folder: int, name: str, node: int | None) -> None:
        entries = self._dir(folder).entries
        old = entries.pop(name, None)
        if old is not None:
            self._nodes[old].links.remove((folder, name))
        if node is not None:
            entries[name] = node
            self._nodes[node].links.append((folder, name))
        self.events.append(("set", folder, name, node, self._op))

    def _dir(self, node: int) -> _LiveDir:
        found = self._nodes[node]
        if not isinstance(found, _LiveDir):
            raise ModelError(f"node {node} is not a folder")
        return found

    def _rel(self, path: str) -> str | None:
        """`path` relative to the store, or None when it is outside (or the root itself)."""
        try:
            rel = Path(os.path.abspath(path)).relative_to(self.root)
        except ValueError:
            return None
        text = rel.as_posix()
        if text in ("", "."):
            return ""
        return text

    def _path_of(self, node: int, depth: int = 0) -> Path | None:
        """A current path of a node, None when no name leads to it from the root."""
        if node == ROOT:
            return self.root
        if depth > 64:
            return None
        for folder, name in self._nodes[node].links:
            parent = self._path_of(folder, depth + 1)
            if parent is not None:
                return parent / name
        return None

    def _resolve(self, rel: str, discover: bool = True) -> int | None:
        """The node at `rel`; a path the model does not know yet but the disk has (written by a
        stage) is added, as an entry change of the current operation."""
        node = ROOT
        if rel == "":
            return node
        parts = rel.split("/")
        for index, part in enumerate(parts):
            if node == ROOT and part in _MODEL_SKIP:
                return None
            entries = self._dir(node).entries
            child = entries.get(part)
            if child is None:
                disk = self.root.joinpath(*parts[:index + 1])
                if not discover or not os.path.lexists(disk):
                    return None
                st = os.lstat(disk)
                if stat.S_ISDIR(st.st_mode):
                    child = self._new_dir()
                elif stat.S_ISREG(st.st_mode):
                    child = self._new_file(disk.read_bytes(), stat.S_IMODE(st.st_mode))
                    self._watch.add(child)
                else:
                    raise ModelError(f"{disk}: neither a file nor a folder")
                self._set(node, part, child)
            node = child
        return node

    def _parent(self, rel: str) -> tuple[int, str]:
        head, _, name = rel.rpartition("/")
        folder = self._resolve(head)
        if folder is None:
            raise ModelError(f"the folder of {rel} is unknown")
        return folder, name

    def _refresh(self, node: int) -> None:
        """Read a file's bytes and mode from the disk; a change is a (not yet durable) write."""
        live = self._nodes[node]
        if not isinstance(live, _LiveFile):
            return
        path = self._path_of(node)
        if path is None:
            self._watch.discard(node)
            return
        try:
            st = os.lstat(path)
            content = path.read_bytes()
        except FileNotFoundError:
            return
        mode = stat.S_IMODE(st.st_mode)
        if content != live.content or mode != live.mode:
            live.content, live.mode = content, mode
            self.events.append(("content", node, content, mode))

    # --- the hooks ---

    def recorder(self, op: str, path: str, src: str | None) -> None:
        with self._lock:
            if self._error is not None or self.finished:
                return
            try:
                self._record(op, path, src)
            except BaseException as exc:  # noqa: BLE001 - re-raised by finish()
                self._error = exc

    def _record(self, op: str, path: str, src: str | None) -> None:
        for node in sorted(self._watch):
            self._refresh(node)
        rel = self._rel(path)
        rel_src = self._rel(src) if src is not None else None
        self._op = len(self.ops)
        self.ops.append((op, rel if rel is not None else path, rel_src if src is not None else None))
        self.marks.append(len(self.events))
        self.events.append(("mark", self._op, op, rel, rel_src))
        if op == "syncfs" and rel == "":
            pass  # syncfs of the store's root (the item log's group commit): the whole store
        elif rel is None or rel == "" or rel.split("/")[0] in _MODEL_SKIP:
            return  # outside the store: not modelled
        disk = self.root / rel
        if op in ("create", "mkdir"):
            if os.path.lexists(disk):
                return  # O_EXCL / EEXIST: the operation fails
            folder, name = self._parent(rel)
            node = self._new_file(b"", None) if op == "create" else self._new_dir()
            self._set(folder, name, node)
            if op == "create":
                self._watch.add(node)
        elif op == "open_append":
            return  # opening a file for appending changes nothing
        elif op in ("write", "chmod", "append", "truncate"):
            node = self._resolve(rel)
            if node is None:
                raise ModelError(f"{op} of unknown {rel}")
            self._refresh(node)  # the bytes and mode before the change
            self._watch.add(node)  # re-read before the next operation
        elif op == "fsync":
            node = self._resolve(rel)
            if node is None:
                raise ModelError(f"fsync of unknown {rel}")
            self._refresh(node)
            self._watch.discard(node)
            self.events.append(("sync_file", node))
        elif op == "fsync_dir":
            node = self._resolve(rel)
            if node is None:
                raise ModelError(f"fsync_dir of unknown {rel}")
            known = set(self._dir(node).entries)
            on_disk = set(os.listdir(disk))
            if not known <= on_disk or (not rel.startswith("tmp") and known != on_disk):
                raise ModelError(f"the model of {rel} is {sorted(known)}, the disk has "
                                 f"{sorted(on_disk)}")
            self.events.append(("sync_dir", node))
        elif op == "syncfs":
            # Everything on the filesystem becomes durable: every file's bytes and mode and
            # every folder's entries, as far as the model knows them.
            for node, live in sorted(self._nodes.items()):
                if isinstance(live, _LiveFile):
                    self._refresh(node)
                    self._watch.discard(node)
                    self.events.append(("sync_file", node))
                else:
                    self.events.append(("sync_dir", node))
        elif op == "rename":
            if rel_src is None:
                raise ModelError(f"rename into the store from outside it: {src} -> {path}")
            node = self._resolve(rel_src)
            if node is None:
                return  # ENOENT: the operation fails
            self._refresh(node)
            src_folder, src_name = self._parent(rel_src)
            folder, name = self._parent(rel)
            if (src_folder, src_name) == (folder, name):
                return
            self._set(src_folder, src_name, None)
            self._set(folder, name, node)
        elif op == "link":
            if rel_src is None:
                raise ModelError(f"link from outside the store: {src} -> {path}")
            node = self._resolve(rel_src)
            if node is None or os.path.lexists(disk):
                return
            folder, name = self._parent(rel)
            self._set(folder, name, node)
        elif op in ("unlink", "rmtree"):
            node = self._resolve(rel)
            if node is None:
                return  # nothing there: nothing happens
            folder, name = self._parent(rel)
            self._set(folder, name, None)
        else:
            raise ModelError(f"unknown durable operation {op!r}")

    def progress(self, event) -> None:  # noqa: ANN001 - a RunEvent
        """The progress callback: a stage reported successful (executed, or reused)."""
        if event.event not in ("succeeded", "cached") or event.stage is None:
            return
        from stagestore.store.store import Store

        manifest = Store(self.root).manifests.read(event.run_id, event.stage, event.item)
        with self._lock:
            self.events.append(("report", event.run_id, event.item, event.stage,
                                manifest.output_hash))

    def finish(self) -> None:
        """End the recording: the last reads, then a check that the model matches the disk."""
        with self._lock:
            if self.finished:
                return
            self.finished = True
            if self._error is not None:
                raise ModelError(f"the recorder failed at operation {self._op}: "
                                 f"{self._error!r}") from self._error
            for node in sorted(self._watch):
                self._refresh(node)
            self.marks.append(len(self.events))
            self.events.append(("mark", len(self.ops), "end", None, None))
            self._check_against_disk()

    def _check_against_disk(self) -> None:
        model: dict[str, tuple] = {}

        def walk(node: int, prefix: str) -> None:
            for name, child in sorted(self._dir(node).entries.items()):
                live = self._nodes[child]
                if isinstance(live, _LiveDir):
                    model[prefix + name] = ("dir",)
                    walk(child, prefix + name + "/")
                else:
                    model[prefix + name] = ("file", live.content, live.mode)

        walk(ROOT, "")
        disk: dict[str, tuple] = {}
        for folder, dirs, files in os.walk(self.root):
            rel = Path(folder).relative_to(self.root).as_posix()
            prefix = "" if rel == "." else rel + "/"
            if prefix == "":
                dirs[:] = [d for d in dirs if d not in _MODEL_SKIP]
                files = [f for f in files if f not in _MODEL_SKIP]
            for name in dirs:
                disk[prefix + name] = ("dir",)
            for name in files:
                path = Path(folder) / name
                disk[prefix + name] = ("file", path.read_bytes(), stat.S_IMODE(os.lstat(path).st_mode))
        # In tmp/, a crashed attempt may have left files a stage wrote that no operation ever
        # named: there the model must be a part of the disk; everywhere else, all of it.
        differ = sorted(k for k in set(model) | set(disk) if model.get(k) != disk.get(k)
                        and not (k.startswith("tmp/") and k not in model))
        if differ:
            raise ModelError(f"after the workload the model and the disk differ at {differ[:5]}")

    # --- replay ---

    @property
    def k(self) -> int:
        """K: the number of durable operations recorded (prefixes are 0..K)."""
        return len(self.ops)

    def state(self, prefix: int) -> State:
        """The model after operations 0..prefix-1 completed (and before operation `prefix`)."""
        if not self.finished:
            raise ModelError("finish() the recording first")
        if not 0 <= prefix <= self.k:
            raise ValueError(f"prefix {prefix} outside 0..{self.k}")
        return State(self, prefix)


@contextmanager
def recording(root: str | os.PathLike[str]) -> Iterator[Recording]:
    """Install a `Recording` of the store at `root` as the durable recorder for the block."""
    rec = Recording(root)
    previous = durable.set_recorder(rec.recorder)
    try:
        yield rec
    finally:
        durable.set_recorder(previous)
    rec.finish()


class _File:
    __slots__ = ("current", "mode", "base_mode", "durable", "durable_mode", "dirty")

    def __init__(self, content: bytes, mode: int | None, is_durable: bool) -> None:
        self.current = content
        self.mode = mode
        self.base_mode = mode
        self.durable = content if is_durable else None
        self.durable_mode = mode if is_durable else None
        self.dirty = not is_durable


class _Dir:
    __slots__ = ("changes", "synced_at")

    def __init__(self) -> None:
        self.changes: list[tuple[int, str, int | None, int]] = []  # (event index, name, node, op)
        self.synced_at = -1  # event index of the last fsync_dir


class Image:
    """A crash image: paths (relative to the store) of folders and of files with their bytes."""

    def __init__(self) -> None:
        self.dirs: list[str] = []
        self.files: dict[str, tuple[int, bytes, int]] = {}  # path -> (node, bytes, mode)

    def digest(self) -> str:
        h = hashlib.sha256()
        first: dict[int, str] = {}
        for path in sorted(self.dirs):
            h.update(b"d\0" + path.encode() + b"\0")
        for path, (node, content, mode) in sorted(self.files.items()):
            link = first.setdefault(node, path)
            h.update(b"f\0" + path.encode() + b"\0" + link.encode() + b"\0"
                     + f"{mode:o}".encode() + b"\0" + hashlib.sha256(content).digest())
        return h.hexdigest()

    def has(self, path: str) -> bool:
        return path in self.files or path in self.dirs

    def materialize(self, dest: Path) -> None:
        """Write the image as a store folder at `dest` (created; must not exist)."""
        dest.mkdir(parents=True)
        (dest / "locks").mkdir()
        for path in sorted(self.dirs, key=lambda p: (p.count("/"), p)):
            (dest / path).mkdir()
        first: dict[int, Path] = {}
        for path, (node, content, mode) in sorted(self.files.items()):
            target = dest / path
            if node in first:
                os.link(first[node], target)
                continue
            first[node] = target
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(content)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.chmod(target, mode)


class State:
    """The model after a prefix: what is current, what is durable, what is pending."""

    def __init__(self, rec: Recording, prefix: int) -> None:
        self.rec = rec
        self.prefix = prefix
        self.files: dict[int, _File] = {}
        self.dirs: dict[int, _Dir] = {}
        self.reported: list[tuple[str, str | None, str, str]] = []
        self.ops_with_changes: set[int] = set()
        end = rec.marks[prefix]
        for index in range(end):
            event = rec.events[index]
            kind = event[0]
            if kind == "set":
                _, folder, name, node, op = event
                self.dirs[folder].changes.append((index, name, node, op))
            elif kind == "content":
                f = self.files[event[1]]
                f.current, f.mode = event[2], event[3]
                if f.base_mode is None:
                    f.base_mode = event[3]
                f.dirty = True
            elif kind == "sync_file":
                f = self.files[event[1]]
                f.durable, f.durable_mode, f.dirty = f.current, f.mode, False
            elif kind == "sync_dir":
                self.dirs[event[1]].synced_at = index
            elif kind == "file":
                self.files[event[1]] = _File(event[2], event[3], event[4])
            elif kind == "dir":
                self.dirs[event[1]] = _Dir()
            elif kind == "report":
                self.reported.append(tuple(event[1:]))  # type: ignore[arg-type]
        for d in self.dirs.values():
            for index, _, _, op in d.changes:
                if index > d.synced_at and op >= 0:
                    self.ops_with_changes.add(op)

    def unforced_ops(self) -> set[int]:
        """Operations with an entry change that no completed fsync_dir has made durable."""
        return set(self.ops_with_changes)

    def swappable(self) -> bool:
        """Whether operation P-2 has an entry change that may be lost while P-1's survive."""
        return self.prefix >= 2 and (self.prefix - 2) in self.ops_with_changes

    def image(self, meta: str, data: str, rng: random.Random) -> Image:
        if meta == "synced":
            persisted: Callable[[int], bool] = lambda op: False  # noqa: E731
        elif meta == "all":
            persisted = lambda op: True  # noqa: E731
        elif meta == "swap":
            persisted = lambda op: op != self.prefix - 2  # noqa: E731
        elif meta == "random":
            chosen = {op for op in sorted(self.ops_with_changes) if rng.random() < 0.5}
            persisted = chosen.__contains__
        else:
            raise ValueError(f"unknown meta policy {meta!r}")
        if data not in DATA_POLICIES:
            raise ValueError(f"unknown data policy {data!r}")
        image = Image()
        contents: dict[int, tuple[bytes, int]] = {}

        def entries(folder: int) -> dict[str, int]:
            found: dict[str, int] = {}
            d = self.dirs[folder]
            for index, name, node, op in d.changes:
                if index < d.synced_at or op < 0 or persisted(op):
                    if node is None:
                        found.pop(name, None)
                    else:
                        found[name] = node
            return found

        def walk(folder: int, prefix: str, seen: tuple[int, ...]) -> None:
            for name, node in sorted(entries(folder).items()):
                if folder == ROOT and name in _MODEL_SKIP:
                    continue
                path = prefix + name
                if node in self.dirs:
                    if node in seen:
                        continue  # a folder inside itself (reordered renames): cut the cycle
                    image.dirs.append(path)
                    walk(node, path + "/", seen + (node,))
                else:
                    if node not in contents:
                        contents[node] = self._content(self.files[node], data, rng)
                    image.files[path] = (node, *contents[node])

        walk(ROOT, "", (ROOT,))
        return image

    @staticmethod
    def _content(f: _File, data: str, rng: random.Random) -> tuple[bytes, int]:
        if not f.dirty:
            assert f.durable is not None and f.durable_mode is not None
            return f.durable, f.durable_mode
        current_mode = f.mode if f.mode is not None else 0o644
        lost_mode = f.durable_mode if f.durable_mode is not None else (
            f.base_mode if f.base_mode is not None else current_mode)
        kind = data if data != "mix" else rng.choice(("dropped", "torn", "garbage", "current"))
        # A file only appended to since its last fsync (an item log segment) keeps the bytes
        # that fsync made durable: only the appended tail is dropped, torn or garbage.
        kept = f.durable if f.durable and f.current.startswith(f.durable) else b""
        tail = f.current[len(kept):]
        if kind == "dropped":
            return (f.durable if f.durable is not None else b""), lost_mode
        if kind == "torn":
            return kept + tail[:len(tail) // 2], current_mode
        if kind == "garbage":
            return kept + rng.randbytes(len(tail)), current_mode
        return f.current, current_mode


def seed_for(base: int, *parts: object) -> int:
    """A per-image seed derived from the session's base seed and the image's coordinates."""
    text = "/".join(str(p) for p in (base, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
