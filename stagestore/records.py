"""Every record stagestore writes to disk, as msgspec Structs.

All records derive from `Record`: frozen (a record read back is never mutated in place),
keyword-only (field order is not part of the format), and forbidding unknown fields (a record
with a field this version does not know is either corrupt or newer, never silently truncated).
Each top-level document carries `schema_version` from its first release; `docs/manifest.md`
states the evolution rules and `schemas/*.json` is generated from these classes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

MANIFEST_SCHEMA_VERSION = 1
TREE_SCHEMA_VERSION = 1
RUN_SCHEMA_VERSION = 1
CACHE_ENTRY_SCHEMA_VERSION = 1


class Record(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every on-disk record: frozen, keyword-only, unknown fields refused.

    `frozen` and `forbid_unknown_fields` are inherited; `kw_only` is not (msgspec applies it to
    the fields a class itself defines), so every subclass repeats it.
    """


class VersionProbe(msgspec.Struct):
    """Decodes only `schema_version`, so a reader can refuse or upgrade before a full decode."""

    schema_version: int


# --- the pipeline definition (decoded from stagestore.toml, and kept in every run record) ---


class PipelineMeta(Record, kw_only=True):
    """The `[pipeline]` table."""

    name: str
    version: str = "1"


class StageSpec(Record, kw_only=True):
    """One `[stages.NAME]` table: what a stage runs, reads and must produce."""

    cmd: str | list[str] | None = None
    call: str | None = None
    shell: bool = False
    inputs: dict[str, str] = {}
    upstream: list[str] = []
    outputs: list[str] = []
    params: dict[str, Any] = {}
    env: dict[str, str] = {}
    timeout: float | None = None
    retries: int = 0
    retry_delay: float = 0.5
    allow_empty: list[str] = []
    description: str = ""


class PipelineDef(Record, kw_only=True):
    """A whole pipeline file."""

    pipeline: PipelineMeta
    stages: dict[str, StageSpec] = {}


# --- the store's records ---


class PipelineRef(Record, kw_only=True):
    """Which pipeline a manifest or run belongs to."""

    name: str
    version: str


ArtifactKind = Literal["file", "tree"]


class ArtifactRef(Record, kw_only=True):
    """A stored artifact: a file object, or a tree object listing a folder."""

    hash: str
    size: int
    kind: ArtifactKind


class Failure(Record, kw_only=True):
    """Why a stage failed: a class, a one-paragraph signal and the exit code if there was one."""

    class_: str = msgspec.field(name="class")
    signal: str
    exit_code: int | None = None


class AttemptLog(Record, kw_only=True):
    """One attempt of a stage: its captured stdout and stderr (objects) and how it ended."""

    attempt: int
    stdout: str
    stderr: str
    exit_code: int | None
    started_at: datetime
    finished_at: datetime
    failure: Failure | None = None


class StageManifest(Record, kw_only=True):
    """`runs/<run_id>/<stage>.json`: the record of one stage in one run."""

    schema_version: int = MANIFEST_SCHEMA_VERSION
    stage: str
    run_id: str
    pipeline: PipelineRef
    status: Literal["succeeded", "failed"]
    input_hash: str
    config_hash: str
    output_hash: str | None
    inputs: dict[str, ArtifactRef]
    upstream: dict[str, str] = {}
    outputs: dict[str, ArtifactRef]
    started_at: datetime
    finished_at: datetime
    cached_from: str | None = None
    attempts: int
    logs: list[AttemptLog] = []
    failure: Failure | None = None


class TreeEntry(Record, kw_only=True):
    """One path inside a tree: a file (with its object hash) or a folder."""

    path: str
    kind: Literal["file", "dir"]
    executable: bool = False
    size: int = 0
    hash: str | None = None


class TreeListing(Record, kw_only=True):
    """A folder output, stored as an object: every path under it, sorted, canonical JSON."""

    schema_version: int = TREE_SCHEMA_VERSION
    entries: list[TreeEntry]


StageOutcome = Literal["succeeded", "cached", "failed", "skipped"]


class RunRecord(Record, kw_only=True):
    """`runs/<run_id>/_run.json`: what a run set out to do, with what, and how it ended."""

    schema_version: int = RUN_SCHEMA_VERSION
    run_id: str
    pipeline: PipelineRef
    pipeline_file: str
    workdir: str
    definition: PipelineDef
    selected: list[str]
    inputs: dict[str, dict[str, ArtifactRef]]
    started_at: datetime
    finished_at: datetime | None = None
    outcomes: dict[str, StageOutcome] = {}


class CacheEntry(Record, kw_only=True):
    """`cache/<key>.json`: where a succeeded manifest for a (input_hash, config_hash) lives."""

    schema_version: int = CACHE_ENTRY_SCHEMA_VERSION
    run_id: str
    stage: str
    input_hash: str
    config_hash: str


class StoreFormat(Record, kw_only=True):
    """`stagestore.json` at the store's root: which format this folder holds."""

    format: Literal["stagestore"] = "stagestore"
    version: int


DOCUMENTS: dict[str, type[Record]] = {
    "stage-manifest": StageManifest,
    "run-record": RunRecord,
    "tree-listing": TreeListing,
    "cache-entry": CacheEntry,
    "pipeline": PipelineDef,
}


# --- encoding and decoding ---

_CURRENT_VERSIONS: dict[type[Record], int] = {
    StageManifest: MANIFEST_SCHEMA_VERSION,
    TreeListing: TREE_SCHEMA_VERSION,
    RunRecord: RUN_SCHEMA_VERSION,
    CacheEntry: CACHE_ENTRY_SCHEMA_VERSION,
}

# Upgraders from version N to N+1, per record type: `_UPGRADES[StageManifest][1]` would turn a
# version-1 document (as a dict) into a version-2 one.  Empty while every type is at version 1.
_UPGRADES: dict[type[Record], dict[int, Any]] = {}


def encode_record(record: Record) -> bytes:
    """Readable JSON (indented, keys in a stable order) with a trailing newline."""
    return msgspec.json.format(msgspec.json.encode(record, order="deterministic"), indent=2) + b"\n"


def decode_record(data: bytes, type_: type[Record], where: str) -> Any:
    """Decode a versioned record: refuse newer versions, upgrade older ones, then validate.

    Raises `FormatVersionError` for a newer version and `CorruptRecordError` for anything that
    does not decode; `where` (a path or object name) is named in both.
    """
    from .errors import CorruptRecordError, FormatVersionError

    what = type_.__name__
    current = _CURRENT_VERSIONS[type_]
    try:
        version = msgspec.json.decode(data, type=VersionProbe).schema_version
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise CorruptRecordError(f"{where}: not a valid {what}: {exc}", path=where) from None
    if version > current:
        raise FormatVersionError(
            f"{where}: {what} has schema_version {version}, but this stagestore reads only "
            f"versions up to {current}", hint="upgrade stagestore to read this store")
    if version < 1:
        raise CorruptRecordError(f"{where}: invalid schema_version {version}", path=where)
    try:
        if version < current:
            raw = msgspec.json.decode(data)
            while raw["schema_version"] < current:
                raw = _UPGRADES[type_][raw["schema_version"]](raw)
            return msgspec.convert(raw, type_)
        return msgspec.json.decode(data, type=type_)
    except (msgspec.ValidationError, msgspec.DecodeError, KeyError) as exc:
        raise CorruptRecordError(f"{where}: not a valid {what}: {exc}", path=where) from None
