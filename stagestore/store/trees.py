"""Folders as tree objects: build one from a folder, read one back, materialise one.

A tree listing names every path under the folder (files with size, executable bit and object
hash; folders so that empty ones survive), sorted by path and encoded canonically, so the same
content always gives the same tree digest whatever the mtimes or listing order.  Symlinks,
FIFOs, sockets and devices are refused: a stored tree holds only files and folders.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from ..errors import CorruptRecordError, InvalidNameError, OutputError
from ..model.records import ArtifactRef, TreeEntry, TreeListing, decode_record
from . import durable
from .hashing import canonical_json, digest_bytes, hash_file, is_digest
from .layout import contained, validate_relpath
from .objects import ObjectStore, SyncBatch


def _walk(root: Path, follow_symlinks: bool, what: str) -> list[tuple[str, Path, os.stat_result]]:
    """Every (relative path, path, stat) under `root`, parents before children."""
    found: list[tuple[str, Path, os.stat_result]] = []

    def visit(folder: Path, prefix: str) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            rel = f"{prefix}{entry.name}"
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                raise OutputError(f"{what}: {os.fsencode(rel)!r} is not a valid UTF-8 name") from None
            try:
                validate_relpath(rel, "file name")
            except InvalidNameError as exc:
                raise OutputError(f"{what}: {exc}; stored trees hold only portable names") from None
            path = Path(entry.path)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                if not follow_symlinks:
                    raise OutputError(
                        f"{what}: {rel} is a symlink; stored outputs hold only files and folders",
                        hint="write the file itself (or a copy) instead of a link")
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    raise OutputError(f"{what}: {rel} is a dangling symlink") from None
                if stat.S_ISDIR(st.st_mode):
                    raise OutputError(f"{what}: {rel} is a symlink to a folder, which is not "
                                      "followed", hint="replace it with the folder itself")
            if stat.S_ISDIR(st.st_mode):
                found.append((rel, path, st))
                visit(path, rel + "/")
            elif stat.S_ISREG(st.st_mode):
                found.append((rel, path, st))
            else:
                raise OutputError(f"{what}: {rel} is not a regular file or folder "
                                  "(a FIFO, socket or device)")

    visit(root, "")
    return found


def build_listing(folder: Path, file_digests: Callable[[list[Path]], list[tuple[str, int]]], *,
                  follow_symlinks: bool, what: str) -> tuple[TreeListing, int]:
    """The listing of `folder`, with `file_digests(paths) -> [(digest, size), ...]` called once
    with every file (so that it can batch their syncs)."""
    found = _walk(folder, follow_symlinks=follow_symlinks, what=what)
    files = [(rel, path, st) for rel, path, st in found if not stat.S_ISDIR(st.st_mode)]
    entries = [TreeEntry(path=rel, kind="dir") for rel, _, st in found if stat.S_ISDIR(st.st_mode)]
    total = 0
    digests = file_digests([path for _, path, _ in files]) if files else []
    for (rel, _, st), (digest, size) in zip(files, digests, strict=True):
        executable = bool(st.st_mode & stat.S_IXUSR)
        entries.append(TreeEntry(path=rel, kind="file", executable=executable, size=size,
                                 hash=digest))
        total += size
    entries.sort(key=lambda e: e.path)
    return TreeListing(entries=entries), total


def store_tree(folder: Path, objects: ObjectStore, owner: str, batch: SyncBatch, *,
               move: bool, what: str) -> ArtifactRef:
    """Store every file under `folder` and the listing itself; returns the tree's ref.

    `move=True` renames the files into the store (a stage's output in `tmp/`); `move=False`
    copies them (a workspace input, which must stay where it is; symlinks to files are followed).
    """
    if move:
        listing, total = build_listing(folder, lambda ps: objects.commit_files(ps, owner, batch),
                                       follow_symlinks=False, what=what)
    else:
        listing, total = build_listing(
            folder, lambda ps: objects.ingest_files(ps, owner, batch),
            follow_symlinks=True, what=what)
    digest = objects.put_bytes(encode_tree(listing), owner, batch)
    return ArtifactRef(hash=digest, size=total, kind="tree")


def hash_artifact(path: Path, what: str) -> ArtifactRef:
    """The ref a workspace file or folder would get if stored now, without storing anything."""
    return describe_artifact(path, what)[0]


def describe_artifact(path: Path, what: str) -> tuple[ArtifactRef, TreeListing | None]:
    """`hash_artifact`, plus the tree listing for a folder."""
    if path.is_dir():
        listing, total = build_listing(
            path, lambda ps: [(hash_file(p), os.stat(p).st_size) for p in ps],
            follow_symlinks=True, what=what)
        return ArtifactRef(hash=digest_bytes(encode_tree(listing)), size=total, kind="tree"), listing
    return ArtifactRef(hash=hash_file(path), size=os.stat(path).st_size, kind="file"), None


def artifact_present(objects: ObjectStore, ref: ArtifactRef,
                     gone: Callable[[str], bool] | None = None) -> bool:
    """Whether every object an artifact needs is in the store: the object itself and, for a
    tree, every file it lists.  `gone(digest)` marks objects to treat as absent."""
    def present(digest: str) -> bool:
        return not (gone and gone(digest)) and objects.exists(digest)

    if not present(ref.hash):
        return False
    if ref.kind != "tree":
        return True
    try:
        listing = read_tree(objects, ref.hash)
    except (CorruptRecordError, InvalidNameError, OSError):
        return False
    return all(present(e.hash) for e in listing.entries if e.hash is not None)


def encode_tree(listing: TreeListing) -> bytes:
    return canonical_json(listing)


def read_tree(objects: ObjectStore, digest: str) -> TreeListing:
    """Decode and check a tree object: sorted unique safe paths, files with hashes."""
    data = objects.read_bytes(digest)
    listing: TreeListing = decode_record(data, TreeListing, f"tree {digest}")
    check_tree(listing, f"tree {digest}")
    return listing


def check_tree(listing: TreeListing, where: str) -> None:
    previous = None
    kinds: dict[str, str] = {}
    for entry in listing.entries:
        try:
            validate_relpath(entry.path, "tree path")
        except InvalidNameError as exc:
            raise CorruptRecordError(f"{where}: {exc}", path=where) from None
        if previous is not None and entry.path <= previous:
            raise CorruptRecordError(f"{where}: paths not sorted or repeated at {entry.path!r}",
                                     path=where)
        parent = entry.path.rpartition("/")[0]
        if parent and kinds.get(parent) != "dir":
            raise CorruptRecordError(f"{where}: {entry.path!r} has no folder entry for its parent",
                                     path=where)
        if entry.kind == "file" and not is_digest(entry.hash):
            raise CorruptRecordError(f"{where}: file {entry.path!r} has no valid hash", path=where)
        if entry.kind == "dir" and entry.hash is not None:
            raise CorruptRecordError(f"{where}: folder {entry.path!r} has a hash", path=where)
        kinds[entry.path] = entry.kind
        previous = entry.path


def materialize(listing: TreeListing, objects: ObjectStore, dest: Path, *, link: bool) -> None:
    """Create `dest` (which must not exist) holding the tree's files.

    `link=True` hard-links read-only objects into place (a stage's read-only view of an input);
    executables are copied so they keep an executable mode.  `link=False` copies every file
    (checkout).  Every path is checked to stay inside `dest` before anything is written.
    """
    durable.temp_dir(dest)
    for entry in listing.entries:
        target = contained(dest, entry.path)
        if entry.kind == "dir":
            durable.temp_dir(target)
            continue
        assert entry.hash is not None
        source = objects.path(entry.hash)
        if link and not entry.executable:
            durable.temp_link(source, target)
        else:
            copy_out(source, target, 0o755 if entry.executable else 0o644)


def copy_out(source: Path, target: Path, mode: int) -> None:
    """Copy an object into a new file with `mode`: an executable in a view, or a checkout."""
    durable.copy_file(source, target)
    durable.chmod(target, mode)
