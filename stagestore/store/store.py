"""`Store`: one store folder, with its objects, manifests, cache index and locks."""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec

from ..errors import FormatVersionError, StoreError, StoreNotFoundError
from ..model.records import STORE_FORMAT_DECODER, StoreFormat
from . import durable
from .layout import FORMAT_VERSION, StoreLayout
from .locking import OwnerLock
from .manifests import CacheIndex, ManifestStore
from .objects import ObjectStore
from .statcache import StatCache

DEFAULT_STORE_DIR = ".stagestore"
STORE_ENV = "STAGESTORE_STORE"

_README = """\
This folder is a stagestore store (its format version is in stagestore.json).

Do not edit it by hand: objects are named by the BLAKE3 hash of their bytes and manifests
point at them.  `stagestore verify` checks it; `stagestore recover` repairs interrupted runs;
`stagestore gc` reclaims unreferenced objects.  The layout is specified in docs/format.md of
the stagestore project.
"""


class Store:
    """A store folder.  `Store.open` needs an existing one; `Store.create` makes it if absent."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.layout = StoreLayout(root)
        self.objects = ObjectStore(self.layout, StatCache(self.layout))
        self.manifests = ManifestStore(self.layout)
        self.cache = CacheIndex(self.layout, self.manifests)

    @property
    def root(self) -> Path:
        return self.layout.root

    @classmethod
    def open(cls, root: str | os.PathLike[str], *, readonly: bool = False) -> Store:
        """With `readonly` (doctor), nothing is created: a missing `tmp/` or `locks/` is left
        missing, and only reads and lock probes may follow."""
        store = cls(root)
        store._check_format(create_folders=not readonly)
        return store

    @classmethod
    def create(cls, root: str | os.PathLike[str]) -> Store:
        """Open the store at `root`, creating its folders first when it does not exist yet."""
        store = cls(root)
        layout = store.layout
        if not layout.format_file.exists():
            durable.makedirs(layout.root)
            for folder in (layout.locks, layout.tmp, layout.objects, layout.runs, layout.cache):
                durable.mkdir(folder)
            owner = "init"
            lock = OwnerLock(layout, owner)
            while not lock.try_acquire():  # another process is creating this store right now
                time.sleep(0.01)
            try:
                # Written last: a folder without a format file is an unfinished `create`, which
                # the next call simply finishes.
                if not layout.format_file.exists():
                    durable.write_file_atomic(
                        layout.readme, _README.encode(),
                        layout.new_tmp_path(owner, "readme"))
                    durable.write_file_atomic(
                        layout.format_file,
                        msgspec.json.encode(StoreFormat(version=FORMAT_VERSION)) + b"\n",
                        layout.new_tmp_path(owner, "format"))
            finally:
                lock.release()
        store._check_format()
        return store

    def _check_format(self, create_folders: bool = True) -> None:
        path = self.layout.format_file
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreNotFoundError(
                f"no stagestore store at {self.root}",
                ) from None
        except NotADirectoryError:
            raise StoreNotFoundError(f"{self.root} is not a folder") from None
        try:
            fmt = STORE_FORMAT_DECODER.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise StoreError(f"{path}: not a stagestore format file: {exc}") from None
        if fmt.version < 1:
            raise StoreError(f"{path}: invalid format version {fmt.version}")
        if fmt.version > FORMAT_VERSION:
            raise FormatVersionError(
                f"store {self.root} has format version {fmt.version}, but this stagestore "
                f"handles only version {FORMAT_VERSION}", hint="upgrade stagestore")
        self.layout.format_version = fmt.version  # 1 is upgraded by the first store lock
        if not create_folders:
            return
        for folder in (self.layout.tmp, self.layout.locks):
            if not folder.is_dir():
                durable.mkdir(folder)
        if fmt.version == 2:
            self._upgrade_2_to_3()

    def _upgrade_2_to_3(self) -> None:
        """Move a format-2 store to format 3 in place (docs/format.md, Versions and changes),
        under the `init` owner lock, idempotently: a crash part-way is finished by the next open.

        Snapshots (this part): tree objects become trees of trees (version-2 listings) and the
        stat cache moves from `stat-cache.json` to `stat-cache/`.  Version-1 trees stay as they
        are and are still read; `stat-cache.json` is derived, so it is deleted, not converted.
        """
        layout = self.layout
        lock = OwnerLock(layout, "init")
        while not lock.try_acquire():  # another process is upgrading (or creating) right now
            time.sleep(0.01)
        try:
            current = STORE_FORMAT_DECODER.decode(layout.format_file.read_bytes())
            if current.version == 2:
                durable.unlink(layout.legacy_stat_cache)
                durable.write_file_atomic(
                    layout.format_file, msgspec.json.encode(StoreFormat(version=3)) + b"\n",
                    layout.new_tmp_path("init", "format"))
        finally:
            lock.release()
        layout.format_version = 3


def default_store_root(pipeline_file: str | os.PathLike[str] | None = None) -> Path:
    """`$STAGESTORE_STORE`, else `.stagestore` beside the pipeline file (or in the cwd)."""
    env = os.environ.get(STORE_ENV)
    if env:
        return Path(env)
    base = Path(pipeline_file).absolute().parent if pipeline_file else Path.cwd()
    return base / DEFAULT_STORE_DIR
