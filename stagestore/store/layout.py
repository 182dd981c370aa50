"""Where everything lives inside a store, and the one check for every name that becomes a path.

Names that come from users or from records read back (stage, output, input and run names; paths
inside a tree) are validated here on the way in (pipeline load, run id) and on the way out
(reading a manifest or tree back, checkout), so a hostile or damaged record can never make
stagestore read or write outside the folder it means.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import InvalidNameError
from .hashing import digest_hex

FORMAT_NAME = "stagestore"
FORMAT_VERSION = 4
"""Version 2 replaced version 1's SQLite store lock (`locks/store.db`) with `flock` files;
version 3 records the items of a run in its item log (`runs/<run_id>/_items.<hex>.log`);
docs/format.md, "Versions and changes"."""

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_COMPONENT_BYTES = 255
_MAX_PATH_BYTES = 4096
# Separates the owner of a temp entry from the rest of its name; never valid in a name.
TMP_SEP = "~"
# The folder of a format-2 run holding one folder per item (`runs/<run_id>/items/<item>/`), still
# read; format 3 appends item records to the run's item log (`item_log_glob`).  A stage named
# `items` has its manifest at `items.json`, so the two never collide.
ITEMS_DIR = "items"


def validate_name(name: object, what: str = "name") -> str:
    """A plain name: letters, digits, `.`, `_`, `-`; starts with a letter or digit; <= 128."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise InvalidNameError(
            f"invalid {what} {name!r}: use letters, digits, '.', '_' and '-', starting with a "
            "letter or digit (at most 128 characters)")
    return name


_ITEM_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_MAX_ITEM_DIRNAME = 200


def item_dirname(item: object) -> str:
    """The folder name of an item id: reversibly percent-encoded, so any id is a safe name.

    Letters, digits, `.`, `_` and `-` stay; every other character becomes `%XX` per UTF-8
    byte, and so does a leading `.`.  `gcc/12` becomes `gcc%2F12`; `item_id` decodes it.
    Refused: an empty id, leading or trailing whitespace, a NUL, and an encoding over 200 bytes.
    """
    if not isinstance(item, str) or not item or item != item.strip() or "\x00" in item:
        raise InvalidNameError(
            f"invalid item id {item!r}: it must be non-empty, without a NUL and without leading "
            "or trailing whitespace")
    try:
        data = item.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidNameError(f"invalid item id {item!r}: not valid UTF-8") from None
    out = []
    for index, byte in enumerate(data):
        char = chr(byte)
        if char in _ITEM_SAFE and not (index == 0 and char == "."):
            out.append(char)
        else:
            out.append(f"%{byte:02X}")
    name = "".join(out)
    if len(name) > _MAX_ITEM_DIRNAME:
        raise InvalidNameError(f"invalid item id {item[:60]!r}...: too long (its folder name "
                               f"would be {len(name)} bytes; at most {_MAX_ITEM_DIRNAME})")
    return name


def item_id(dirname: str) -> str:
    """The item id an item folder name encodes; `InvalidNameError` if it is not one
    `item_dirname` would write (so every folder name maps to exactly one id and back)."""
    try:
        item = _percent_decode(dirname)
        if item_dirname(item) == dirname:
            return item
    except (ValueError, UnicodeDecodeError, InvalidNameError):
        pass
    raise InvalidNameError(f"{dirname!r} is not a valid item folder name")


def _percent_decode(name: str) -> str:
    data = bytearray()
    index = 0
    while index < len(name):
        if name[index] == "%":
            data.append(int(name[index + 1:index + 3], 16))
            index += 3
        else:
            data.extend(name[index].encode("ascii"))
            index += 1
    return data.decode("utf-8")


# `C:foo` is a drive-relative path on Windows: joined to a folder it leaves that folder.
_DRIVE_RE = re.compile(r"[A-Za-z]:")


def validate_relpath(path: object, what: str = "path") -> str:
    """A relative path inside a tree: `/`-separated plain components, no `.`, `..` or empties."""
    if not isinstance(path, str) or not path:
        raise InvalidNameError(f"invalid {what} {path!r}: empty")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidNameError(f"invalid {what} {path!r}: not valid UTF-8") from None
    if len(encoded) > _MAX_PATH_BYTES:
        raise InvalidNameError(f"invalid {what} {path[:60]!r}...: longer than {_MAX_PATH_BYTES} bytes")
    if "\x00" in path or "\\" in path:
        raise InvalidNameError(f"invalid {what} {path!r}: contains NUL or a backslash")
    if path.startswith("/"):
        raise InvalidNameError(f"invalid {what} {path!r}: absolute")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise InvalidNameError(f"invalid {what} {path!r}: empty, '.' or '..' component")
        if _DRIVE_RE.match(part):
            raise InvalidNameError(f"invalid {what} {path!r}: a component starts with a drive "
                                   "prefix such as 'C:'")
        if len(part.encode("utf-8")) > _MAX_COMPONENT_BYTES:
            raise InvalidNameError(f"invalid {what} {path!r}: a component is over 255 bytes")
    return path


def contained(root: Path, relpath: str) -> Path:
    """`root / relpath`, after checking on resolved paths that it stays inside `root`."""
    validate_relpath(relpath)
    target = root / relpath
    resolved_root = root.resolve()
    resolved = target.resolve()
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise InvalidNameError(f"path {relpath!r} leads outside {root}")
    return target


class StoreLayout:
    """Maps the store's records to paths; creates nothing."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.runs = self.root / "runs"
        self.locks = self.root / "locks"
        self.cache = self.root / "cache"
        self.views = self.root / "views"  # derived: read-only views of trees (store/views.py)
        self.format_file = self.root / "stagestore.json"
        self.config_file = self.root / "config.json"  # StoreConfig: the remotes
        self.readme = self.root / "README.md"
        self.stat_cache = self.root / "stat-cache"  # StatCacheFolder records
        self.legacy_stat_cache = self.root / "stat-cache.json"  # format 2's, removed by 2 -> 3
        self.store_lock = self.locks / "store.lock"
        self.store_gate = self.locks / "store.gate"
        self.legacy_store_lock = self.locks / "store.db"  # format 1's store lock
        self.format_version = FORMAT_VERSION  # as read from format_file by `Store.open`

    def object_path(self, digest: str) -> Path:
        hexdigest = digest_hex(digest)
        return self.objects / hexdigest[:2] / hexdigest[2:]

    def run_dir(self, run_id: str) -> Path:
        return self.runs / validate_name(run_id, "run id")

    def scope_dir(self, run_id: str, item: str | None = None) -> Path:
        """Where a run's manifests live: the run folder, or an item's folder inside it."""
        if item is None:
            return self.run_dir(run_id)
        return self.run_dir(run_id) / ITEMS_DIR / item_dirname(item)

    def items_dir(self, run_id: str) -> Path:
        return self.run_dir(run_id) / ITEMS_DIR

    def manifest_path(self, run_id: str, stage: str, item: str | None = None) -> Path:
        return self.scope_dir(run_id, item) / f"{validate_name(stage, 'stage name')}.json"

    def item_record_path(self, run_id: str, item: str) -> Path:
        # `_item.json` cannot collide with a stage manifest, as `_run.json` cannot.
        return self.scope_dir(run_id, item) / "_item.json"

    def run_record_path(self, run_id: str) -> Path:
        # Stage names start with a letter or digit, so `_run.json` never collides with one.
        return self.run_dir(run_id) / "_run.json"

    def item_log_glob(self, run_id: str) -> str:
        """The segments of a run's item log (`store/itemlog.py`): `_items.<16 hex>.log` in the
        run folder; a stage name cannot start with `_`, so none collides with a manifest."""
        return str(self.run_dir(run_id) / "_items.*.log")

    def cache_entry_path(self, key: str) -> Path:
        hexdigest = digest_hex(key)
        return self.cache / hexdigest[:2] / f"{hexdigest[2:]}.json"

    def owner_lock_path(self, owner: str) -> Path:
        return self.locks / f"{owner}.lock"

    def new_tmp_path(self, owner: str, label: str) -> Path:
        return self.tmp / f"{owner}{TMP_SEP}{os.urandom(8).hex()}{TMP_SEP}{label}"

    @staticmethod
    def tmp_owner(entry_name: str) -> str | None:
        owner, sep, _ = entry_name.partition(TMP_SEP)
        return owner if sep and owner else None


def run_owner(run_id: str) -> str:
    """The owner name under which a run's temps and lock live."""
    return f"run-{run_id}"
