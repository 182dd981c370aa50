"""Deferred durability for item stages, and the guard that makes it safe after a power loss.

An item stage's objects (its outputs, its logs, the item's input snapshots), their folder
entries and its cache entry are written without an fsync each: the item log's group commit
makes them durable with one `syncfs(2)` just before it would fsync its segment, and only then
reports the items done (`durable.Deferral`, itemlog.SegmentWriter.sync).  A process crash loses
nothing (the page cache survives it); a power loss can leave an object whose name is there but
whose bytes are not, which a later run would trust.

So before its first deferred write, a writer creates the **marker** `tmp/<owner>~<hex>~unsynced`
durably (create, write, fsync, folder fsync), holding this boot's id, and removes it after the
sync that follows its last deferred write (`close`).  A marker whose owner holds no lock is
checked by every `run`, `checkout` and `push` (`check`):

* written during this boot: its owner crashed, its writes are in the page cache; one `syncfs`
  makes them durable, and the marker goes;
* written during another boot: the machine stopped while those writes were not durable.  The
  command refuses (`StoreNeedsRecoverError`) until `recover`, which re-hashes every object and
  removes the damaged ones, has run; `recover` removes the marker after that.

docs/format.md specifies the marker (`tmp/<owner>~<hex>~unsynced`) and rule 18.
"""

from __future__ import annotations

import os
import threading

from ..errors import StoreNeedsRecoverError
from . import durable
from .layout import TMP_SEP, StoreLayout
from .locking import OwnerLock

LABEL = "unsynced"
_MAGIC = "stagestore unsynced writes; boot "

# (store root, owner) -> the marker this process made; root -> the store's Deferral.
_MARKERS: dict[tuple[str, str], str] = {}
_DEFERRALS: dict[str, durable.Deferral] = {}
_LOCK = threading.Lock()


def deferral(layout: StoreLayout) -> durable.Deferral | None:
    """The store's Deferral in this process, or None where writes cannot be deferred safely
    (no `syncfs`, or no boot id to tell a crash from a power loss)."""
    root = str(layout.root)
    with _LOCK:
        found = _DEFERRALS.get(root)
        if found is None:
            if not durable.syncfs_available() or durable.boot_id() is None:
                return None
            found = _DEFERRALS[root] = durable.Deferral(layout.root)
        return found


def begin(layout: StoreLayout, owner: str) -> durable.Deferral | None:
    """Make sure `owner` has its durable marker, then return the Deferral its writes may use
    (None: write durably as usual)."""
    found = deferral(layout)
    if found is None:
        return None
    key = (str(layout.root), owner)
    with _LOCK:
        if key in _MARKERS:
            return found
        boot = durable.boot_id()
        path = layout.new_tmp_path(owner, LABEL)
        fd = durable.create_exclusive(path)
        try:
            durable.write_all(fd, f"{_MAGIC}{boot}\n".encode(), path)
            durable.fsync_fd(fd, path)
        finally:
            os.close(fd)
        durable.fsync_dir(layout.tmp)
        _MARKERS[key] = str(path)
    return found


def close(layout: StoreLayout, owner: str) -> None:
    """Make `owner`'s deferred writes durable and remove its marker (a run's end)."""
    key = (str(layout.root), owner)
    with _LOCK:
        path = _MARKERS.pop(key, None)
        found = _DEFERRALS.get(str(layout.root))
    if path is None:
        return
    if found is not None:
        found.sync()
    durable.unlink(path)
    durable.fsync_dir(layout.tmp)


def markers(layout: StoreLayout) -> list[os.DirEntry]:
    """The markers in `tmp/`, of live owners and dead ones."""
    try:
        with os.scandir(layout.tmp) as entries:
            return sorted((e for e in entries if e.name.endswith(TMP_SEP + LABEL)),
                          key=lambda e: e.name)
    except FileNotFoundError:
        return []


def _boot_of(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(200)
    except OSError:
        return None
    return text[len(_MAGIC):].strip() if text.startswith(_MAGIC) else None


def check(layout: StoreLayout) -> None:
    """Before a command trusts that an object's name holds its bytes: settle the markers of
    dead owners (see the module's docstring).  Raises `StoreNeedsRecoverError` for one written
    during another boot, or unreadable (its write may have been cut by the power loss)."""
    boot = durable.boot_id()
    for entry in markers(layout):
        owner = StoreLayout.tmp_owner(entry.name)
        if owner is None:
            continue
        lock = OwnerLock(layout, owner)
        if not lock.try_acquire():
            continue  # live: its own sync comes before anything it reports
        try:
            written = _boot_of(entry.path)
            if written is None or boot is None or written != boot:
                raise StoreNeedsRecoverError(
                    f"the machine stopped while {owner} had writes that were not yet durable "
                    f"({entry.path}): its newest objects may be damaged")
            durable.syncfs(layout.root)
            durable.unlink(entry.path)
            durable.fsync_dir(layout.tmp)
        finally:
            lock.release()


def remove_dead(layout: StoreLayout) -> list[str]:
    """`recover`, once every object has been re-hashed and the damaged ones removed: the
    markers of dead owners go (after one `syncfs`); returns their paths."""
    removed = []
    for entry in markers(layout):
        owner = StoreLayout.tmp_owner(entry.name)
        lock = OwnerLock(layout, owner) if owner is not None else None
        if lock is not None and not lock.try_acquire():
            continue
        try:
            if not removed:
                durable.syncfs(layout.root)
            durable.unlink(entry.path)
            removed.append(entry.path)
        finally:
            if lock is not None:
                lock.release()
    if removed:
        durable.fsync_dir(layout.tmp)
    return removed
