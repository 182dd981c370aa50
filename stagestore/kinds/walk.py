"""The files and folders of an input folder, in the one order every kind uses.

The order is bytewise on the UTF-8 relative path with `/` separators, so it does not depend on
the file system, the locale or the order files were created in; a folder always comes before
what it holds, because a path sorts before every longer path it is a prefix of.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import msgspec

from ..errors import InvalidNameError
from ..store.layout import validate_relpath
from .errors import KindError


class Entry(msgspec.Struct, frozen=True):
    """One file or folder below an input folder."""

    relpath: str
    path: str  # a str, not a Path: building 10,000 Path objects costs more than hashing
    is_dir: bool
    size: int
    executable: bool


def walk(root: Path) -> list[Entry]:
    """Every file and folder below `root` (not `root` itself), sorted bytewise by relpath.

    Raises `KindError` for a symlink, a device, FIFO or socket, and a name that is not valid
    UTF-8 or not a portable relative path (the same check stored trees use).
    """
    found: list[Entry] = []
    pending: list[tuple[str | Path, str]] = [(root, "")]
    while pending:
        folder, prefix = pending.pop()
        with os.scandir(folder) as scan:
            for item in scan:
                relpath = _checked_relpath(prefix + item.name)
                info = item.stat(follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    found.append(Entry(relpath, item.path, True, 0, False))
                    pending.append((item.path, relpath + "/"))
                elif stat.S_ISREG(info.st_mode):
                    found.append(Entry(relpath, item.path, False, info.st_size,
                                       bool(info.st_mode & 0o111)))
                else:
                    what = "a symlink" if stat.S_ISLNK(info.st_mode) else "a device, FIFO or socket"
                    raise KindError(f"{relpath} in {root} is {what}; built-in kinds take only "
                                    "regular files and folders")
    found.sort(key=lambda entry: entry.relpath.encode("utf-8"))
    return found


def walk_files(root: Path) -> list[tuple[str, str]]:
    """(relpath, path) of every file below `root`, sorted bytewise by relpath: `walk` without
    its per-entry objects and stats (the kind of an entry comes from the folder listing's type
    field where the filesystem gives one), for kinds that only read files (checksum).  Folders
    are checked as `walk` checks them, and left out."""
    found: list[tuple[str, str]] = []
    pending: list[tuple[str, str]] = [(os.fspath(root), "")]
    while pending:
        folder, prefix = pending.pop()
        with os.scandir(folder) as scan:
            items = list(scan)
        _check_names(prefix, [item.name for item in items])
        for item in items:
            if item.is_file(follow_symlinks=False):
                found.append((prefix + item.name, item.path))
            elif item.is_dir(follow_symlinks=False):
                pending.append((item.path, prefix + item.name + "/"))
            else:
                relpath = prefix + item.name
                info = item.stat(follow_symlinks=False)
                what = "a symlink" if stat.S_ISLNK(info.st_mode) else "a device, FIFO or socket"
                raise KindError(f"{relpath} in {root} is {what}; built-in kinds take only "
                                "regular files and folders")
    # Code-point order is UTF-8 byte order: every name here encoded as UTF-8 (checked above).
    found.sort()
    return found


# What `validate_relpath` would refuse in names that `scandir` returned (never empty, `.`, `..`
# or holding `/`): NUL, a backslash, a drive prefix; looked for in a folder's names at once.
_SUSPECT = re.compile(r"[\x00\\]|(?:^|/)[A-Za-z]:")


def _check_names(prefix: str, names: list[str]) -> None:
    """`_checked_relpath` for every name of one folder, in one pass when nothing is suspect."""
    joined = prefix + "/".join(names)
    try:
        longest = max((len(name) for name in names), default=0)
        if (len(prefix) + longest) * 4 <= 255 and not _SUSPECT.search(joined):
            joined.encode("utf-8")
            return  # short, UTF-8 and nothing suspect: what validate_relpath accepts
    except UnicodeEncodeError:
        pass
    for name in names:
        _checked_relpath(prefix + name)


def _checked_relpath(relpath: str) -> str:
    try:
        return validate_relpath(relpath, "file name")
    except InvalidNameError as exc:
        raise KindError(f"{exc} (built-in kinds take only portable names)") from None
