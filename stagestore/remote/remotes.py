"""A store's remotes: their settings in `config.json`, the remote's key layout, and the
capability probe that refuses a server which does not honour create-only writes.

The remote layout (docs/remote.md) mirrors the local store's:

    stagestore-remote.json                         RemoteFormat, written once
    objects/<2 hex>/<62 hex>                       object bytes, as in the local store
    runs/<run_id>/<stage>.json                     manifest, byte for byte; create-only
    runs/<run_id>/items/<item>/<stage>.json        manifest of an item's stage; create-only
    runs/<run_id>/<stage>~failed~<16 hex>.json     a failed manifest (hash-named; also in items/)
    runs/<run_id>/_run.<16 hex>.json               a version of the run record (hash-named)
    runs/<run_id>/items/<item>/_item.<16 hex>.json a version of an item record (hash-named)
    cache/<2 hex>/<62 hex>.json                    CacheEntry: key -> manifest; create-only
    probe/<32 hex>                                 the capability probe's key, removed after
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from ..errors import CorruptRecordError, FormatVersionError, InvalidNameError, UsageError
from ..model.records import (REMOTE_FORMAT_VERSION, RemoteFormat, RemoteSpec, StoreConfig,
                             decode_record, encode_record, now)
from ..store import durable
from ..store.hashing import PREFIX, digest_bytes, digest_hex
from ..store.layout import item_dirname, item_id, validate_name
from .storage import RemoteError, RemoteNotFound, Storage, open_storage

if TYPE_CHECKING:
    from ..store.layout import StoreLayout
    from ..store.store import Store

FORMAT_KEY = "stagestore-remote.json"
OBJECTS = "objects/"
RUNS = "runs/"
CACHE = "cache/"
PROBE = "probe/"
# Library words; the CLI names its flag instead (`stagestore.cli.cli_hint`).
REMOTE_NAME_HINT = "name the remote"
_RECORD_RE = re.compile(r"_(run|item)\.([0-9a-f]{16})\.json")
_OBJECT_KEY_RE = re.compile(r"objects/([0-9a-f]{2})/([0-9a-f]{62})")
_FAILED_RE = re.compile(r"(.+)~failed~([0-9a-f]{16})\.json")


def object_key(digest: str) -> str:
    hexdigest = digest_hex(digest)
    return f"{OBJECTS}{hexdigest[:2]}/{hexdigest[2:]}"


def object_digest(key: str) -> str | None:
    """The digest an `objects/<2 hex>/<62 hex>` key names, or None for any other key."""
    match = _OBJECT_KEY_RE.fullmatch(key)
    return PREFIX + match.group(1) + match.group(2) if match else None


def scope_key(run_id: str, item: str | None) -> str:
    base = f"{RUNS}{validate_name(run_id, 'run id')}/"
    return base if item is None else f"{base}items/{item_dirname(item)}/"


def manifest_key(run_id: str, stage: str, item: str | None = None) -> str:
    return f"{scope_key(run_id, item)}{validate_name(stage, 'stage name')}.json"


def remote_manifest_key(run_id: str, stage: str, item: str | None, status: str,
                        data: bytes) -> str:
    """Where a manifest goes on a remote.  A result (succeeded, degraded, disabled) is the
    stage's one manifest, written create-only.  A failed manifest is named by its content
    (`~` is never part of a stage name): the same run may still succeed the stage, and a
    remote key is never overwritten."""
    if status != "failed":
        return manifest_key(run_id, stage, item)
    return (f"{scope_key(run_id, item)}{validate_name(stage, 'stage name')}~failed~"
            f"{digest_hex(digest_bytes(data))[:16]}.json")


def record_key(run_id: str, item: str | None, data: bytes) -> str:
    """A version of the run record (item None) or of an item record, named by its content:
    records change as a run goes on, and a remote key is never overwritten."""
    name = "_run" if item is None else "_item"
    return f"{scope_key(run_id, item)}{name}.{digest_hex(digest_bytes(data))[:16]}.json"


def cache_entry_key(key: str) -> str:
    hexdigest = digest_hex(key)
    return f"{CACHE}{hexdigest[:2]}/{hexdigest[2:]}.json"


@dataclass(frozen=True)
class RunKey:
    """What a key under `runs/<run_id>/` is: a manifest (stage set) or a record version."""

    item: str | None
    stage: str | None  # None: a record version
    failed: bool = False  # a failed manifest's version


def parse_run_key(run_id: str, key: str) -> RunKey | None:
    """Classify a key listed under `runs/<run_id>/`; None for anything else (reported by
    `verify --remote` as a stray)."""
    rest = key[len(scope_key(run_id, None)):]
    item = None
    if rest.startswith("items/"):
        parts = rest.split("/")
        if len(parts) != 3:
            return None
        try:
            item = item_id(parts[1])
        except InvalidNameError:  # not an item folder name
            return None
        rest = parts[2]
    match = _RECORD_RE.fullmatch(rest)
    if match:
        return RunKey(item=item, stage=None) if (match.group(1) == "item") == (item is not None) \
            else None
    match = _FAILED_RE.fullmatch(rest)
    if match:
        try:
            return RunKey(item=item, stage=validate_name(match.group(1), "stage name"),
                          failed=True)
        except InvalidNameError:  # a key that no stage name of ours could have made
            return None
    if rest.endswith(".json"):
        try:
            return RunKey(item=item, stage=validate_name(rest[:-5], "stage name"))
        except InvalidNameError:  # a key that no stage name of ours could have made
            return None
    return None


# --- the store's config ---


def read_config(layout) -> StoreConfig:  # noqa: ANN001 - StoreLayout
    try:
        data = layout.config_file.read_bytes()
    except FileNotFoundError:
        return StoreConfig()
    return decode_record(data, StoreConfig, str(layout.config_file))


def write_config(layout, config: StoreConfig) -> None:  # noqa: ANN001
    durable.write_file_atomic(layout.config_file, encode_record(config),
                              layout.new_tmp_path("config", "config"))


@contextmanager
def config_locked(layout) -> Iterator[StoreConfig]:  # noqa: ANN001
    """The config, read under the config's own owner lock (so two `remote add` do not lose
    each other's remote)."""
    from ..store.locking import owner_locked

    durable.makedirs(layout.tmp)
    with owner_locked(layout, "config", "the store's config"):
        yield read_config(layout)


def find_remote(config: StoreConfig, name: str | None) -> RemoteSpec:
    """The remote called `name`; with None, the only one (an error when there are 0 or 2+)."""
    if name is None:
        if len(config.remotes) == 1:
            return config.remotes[0]
        if not config.remotes:
            raise UsageError("this store has no remote",
                             hint="add one: stagestore remote add NAME s3://BUCKET/PREFIX")
        names = ", ".join(r.name for r in config.remotes)
        raise UsageError(f"this store has {len(config.remotes)} remotes ({names}): say which",
                         hint=REMOTE_NAME_HINT)
    for spec in config.remotes:
        if spec.name == name:
            return spec
    known = ", ".join(r.name for r in config.remotes) or "none"
    raise UsageError(f"no remote named {name!r} (remotes: {known})",
                     hint="`stagestore remote list` shows them")


def _layout(store: Store | StoreLayout) -> StoreLayout:
    return getattr(store, "layout", store)


def list_remotes(store: Store) -> list[RemoteSpec]:
    """The store's remotes, as added: name, URL, endpoint and region."""
    return list(read_config(_layout(store)).remotes)


def add_remote(store: Store | StoreLayout, name: str, url: str, *,
               endpoint: str | None = None, region: str | None = None) -> RemoteSpec:
    """Add remote `name` at `url` (`s3://BUCKET/PREFIX`, or `file:///PATH` for a folder) to the
    store's config, after checking that it can be reached, that it is a stagestore remote or
    empty, and that the server refuses a second create-only write.  Credentials come from the
    AWS environment variables or profile and are never stored.  Raises `InvalidNameError` for
    a bad name, `UsageError` for a bad URL or a name already taken, `RemoteError` when the
    remote cannot be used."""
    layout = _layout(store)
    validate_name(name, "remote name")
    storage = open_storage(url, endpoint=endpoint, region=region)
    with config_locked(layout) as config:
        if any(r.name == name for r in config.remotes):
            raise UsageError(f"remote {name!r} already exists",
                             hint=f"remove it first: stagestore remote remove {name}")
        prepare(storage, name)
        spec = RemoteSpec(name=name, url=url, endpoint=endpoint, region=region,
                          probed_at=now())
        write_config(layout, msgspec.structs.replace(config, remotes=[*config.remotes, spec]))
    return spec


def remove_remote(store: Store | StoreLayout, name: str) -> RemoteSpec:
    """Forget remote `name`'s settings; the remote's own data is left as it is.  Raises
    `UsageError` when the store has no such remote."""
    layout = _layout(store)
    with config_locked(layout) as config:
        spec = find_remote(config, name)
        write_config(layout, msgspec.structs.replace(
            config, remotes=[r for r in config.remotes if r.name != name]))
    return spec


def open_remote(layout, name: str | None) -> tuple[RemoteSpec, Storage]:  # noqa: ANN001
    """The remote's storage, ready to use: on first use (no probe recorded) its format and
    create-only writes are checked, and the probe's time is saved."""
    spec = find_remote(read_config(layout), name)
    storage = open_storage(spec.url, endpoint=spec.endpoint, region=spec.region)
    if spec.probed_at is None:
        prepare(storage, spec.name)
        with config_locked(layout) as config:
            remotes = [msgspec.structs.replace(r, probed_at=now()) if r.name == spec.name else r
                       for r in config.remotes]
            write_config(layout, msgspec.structs.replace(config, remotes=remotes))
    else:
        check_format(storage, spec.name)
    return spec, storage


def check_format(storage: Storage, name: str) -> bool:
    """Whether the remote holds a format marker this stagestore reads; raises for another
    format or a newer version."""
    try:
        data = storage.read(FORMAT_KEY)
    except RemoteNotFound:
        return False
    where = storage.where(FORMAT_KEY)
    try:
        decode_record(data, RemoteFormat, where)
    except FormatVersionError:
        raise
    except CorruptRecordError as exc:
        raise RemoteError(f"remote {name!r}: {where} is not a stagestore remote's marker "
                          f"({getattr(exc, 'message', exc)})",
                          hint="use an empty prefix, or one a stagestore remote uses") from None
    return True


def prepare(storage: Storage, name: str) -> None:
    """Before a remote is first used: it is a stagestore remote or an empty prefix (anything
    else is refused before a byte is written), its create-only writes hold (`probe`), and
    then it is marked as a stagestore remote."""
    if check_format(storage, name):
        probe(storage, name)
        return
    for page in storage.list(""):
        strangers = [b.key for b in page if not b.key.startswith(PROBE)]
        if strangers:
            raise RemoteError(
                f"remote {name!r}: {storage.url} is not empty and is not a stagestore remote "
                f"(it holds {strangers[0]!r})",
                hint="use an empty bucket or prefix, e.g. s3://BUCKET/stagestore")
        break
    probe(storage, name)
    storage.create(FORMAT_KEY, encode_record(RemoteFormat(schema_version=REMOTE_FORMAT_VERSION)))


def probe(storage: Storage, name: str) -> None:
    """Refuse a server that does not honour create-only writes.

    Two conditional PUTs (`If-None-Match: *`) of one fresh key: the first must create it, the
    second must be refused, and the key must still hold the first's bytes.  A server that
    silently overwrites would let two machines replace each other's manifests.
    """
    key = f"{PROBE}{os.urandom(16).hex()}"
    first, second = b"stagestore probe: first writer\n", b"stagestore probe: second writer\n"
    try:
        if not storage.create(key, first):
            raise RemoteError(f"remote {name!r}: the probe key {storage.where(key)} existed "
                              "before it was written")
        refused = not storage.create(key, second)
        held = storage.read(key) == first
    finally:
        try:
            storage.delete(key)
        except RemoteError:
            pass
    if not (refused and held):
        raise RemoteError(
            f"remote {name!r} ({storage.url}) does not honour create-only writes: a second "
            "PUT with 'If-None-Match: *' to an existing key "
            + ("succeeded and replaced its content" if not held else "was not refused")
            + "; two machines pushing the same run could overwrite each other's manifests",
            hint="use a server that supports conditional writes (AWS S3, SeaweedFS, MinIO, "
                 "Ceph RGW, ...)")
