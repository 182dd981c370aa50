"""Every record stagestore writes to disk, as msgspec Structs.

All records derive from `Record`: frozen (a record read back is never mutated in place),
keyword-only (field order is not part of the format), and forbidding unknown fields (a record
with a field this version does not know is either corrupt or newer, never silently truncated).
Each top-level document carries `schema_version` from its first release; `docs/manifest.md`
states the evolution rules and `schemas/*.json` is generated from these classes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

from .failures import Category, Domain, upgrade_failure

MANIFEST_SCHEMA_VERSION = 3
TREE_SCHEMA_VERSION = 2
RUN_SCHEMA_VERSION = 3
CACHE_ENTRY_SCHEMA_VERSION = 2
STAT_CACHE_SCHEMA_VERSION = 2
ITEM_SCHEMA_VERSION = 1
STORE_CONFIG_SCHEMA_VERSION = 1
REMOTE_FORMAT_VERSION = 1
VIEW_SEAL_SCHEMA_VERSION = 1


class Record(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every on-disk record: frozen, keyword-only, unknown fields refused.

    `frozen` and `forbid_unknown_fields` are inherited; `kw_only` is not (msgspec applies it to
    the fields a class itself defines), so every subclass repeats it.
    """


class VersionProbe(msgspec.Struct):
    """Decodes only `schema_version`, so a reader can refuse or upgrade before a full decode."""

    schema_version: int


# --- the pipeline definition (decoded from stagestore.toml, and kept in every run record) ---



def now() -> datetime:
    """The time every record carries: timezone-aware UTC."""
    return datetime.now(UTC)

class PipelineMeta(Record, kw_only=True):
    """The `[pipeline]` table."""

    name: str
    version: str = "1"




class ClassifyRule(Record, kw_only=True):
    """One `[[stages.NAME.classify]]` table: a failure matching it gets this class and category.

    `match` is a regular expression searched in the attempt's stderr, `exit_code` an exit code;
    a rule needs at least one, and matches when all it has match.
    """

    match: str | None = None
    exit_code: int | None = None
    class_: str = msgspec.field(name="class")
    category: Category


class Check(Record, kw_only=True):
    """One `[[stages.NAME.checks]]` table: a quality gate on a stage's outputs.

    Built in (`check` = `nonempty`, `max_bytes` with `limit`, `json`) or a command (`cmd`).
    `output` names the output checked (default: every output).  A non-`critical` check becomes
    a recorded warning in sampling mode instead of a `ValidationFailure`.
    """

    check: Literal["nonempty", "max_bytes", "json"] | None = None
    cmd: str | list[str] | None = None
    output: str | None = None
    limit: int | str | None = None
    critical: bool = False


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
    domain: Domain = "build"
    classify: list[ClassifyRule] = []
    checks: list[Check] = []
    on_failure: Literal["fail", "skip", "use_last_good"] = "fail"
    disk: int | str | None = None
    per_item: bool = False
    enabled: bool = True
    # Built-in stage kinds (docs/kinds.md): `kind` instead of `cmd`/`call`, one input, one output.
    kind: Literal["checksum", "compress", "decompress", "encrypt", "decrypt", "transform",
                  "passthrough"] | None = None
    input: str | None = None
    algorithm: str | None = None
    chunk_size: int | str | None = None
    parallel: bool = False
    workers: int | None = None
    expect: str | None = None
    key_env: str | None = None
    key_file: str | None = None


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
    """Why a stage failed: class, category, one-paragraph signal, exit code if there was one.

    `domain` is where the failure belongs: `infrastructure` when the stage is an infrastructure
    stage or the class is one of the infrastructure classes, else `build`;
    `taxonomy_eligible` is true exactly for `build` failures (docs/failures.md).
    """

    class_: str = msgspec.field(name="class")
    category: Category = "fatal"
    domain: Domain = "build"
    taxonomy_eligible: bool = False
    signal: str
    exit_code: int | None = None
    rule: int | None = None


class StageEvent(Record, kw_only=True):
    """Something the runner did about a stage that is not its plain success: a retry, a
    fallback, a skip, a check warning, a fast failure of an open circuit, a preflight refusal."""

    at: datetime
    kind: Literal["retry", "fallback", "skip", "warning", "circuit_open", "preflight"]
    message: str


class AttemptLog(Record, kw_only=True):
    """One attempt of a stage: its captured stdout and stderr (objects) and how it ended."""

    attempt: int
    stdout: str
    stderr: str
    exit_code: int | None
    started_at: datetime
    finished_at: datetime
    failure: Failure | None = None


class Resources(Record, kw_only=True):
    """What a built-in kind's attempt measured (docs/kinds.md): bytes read and written, wall
    time, and the peak resident memory of its process; `stagestore plan` estimates from these."""

    bytes_in: int
    bytes_out: int
    seconds: float
    peak_rss_bytes: int
    workers: int


class StageManifest(Record, kw_only=True):
    """`runs/<run_id>/<stage>.json`, or `runs/<run_id>/items/<item>/<stage>.json` for a stage
    that runs per item: the record of one stage in one run."""

    schema_version: int = MANIFEST_SCHEMA_VERSION
    stage: str
    run_id: str
    item: str | None = None
    pipeline: PipelineRef
    status: Literal["succeeded", "failed", "degraded", "disabled"]
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
    degraded_from: str | None = None
    events: list[StageEvent] = []
    warnings: list[str] = []
    resources: Resources | None = None


class TreeEntry(Record, kw_only=True):
    """One entry of a tree: a file (with its object hash) or a folder.

    Version 2 (a tree of trees): `path` is one name, and a folder's `hash` is its own tree
    object's digest and `size` the bytes of every file below it.  Version 1 (flat): `path` is
    the `/`-separated path below the listed folder, and a folder has no hash and size 0."""

    path: str
    kind: Literal["file", "dir"]
    executable: bool = False
    size: int = 0
    hash: str | None = None


class TreeListing(Record, kw_only=True):
    """A folder, stored as an object in canonical JSON.  Version 2: the folder's direct
    entries, sorted by name, a subfolder by its tree's digest.  Version 1 (still read): every
    path under the folder, sorted.  `trees.read_tree` returns either as a version-1 (flat) view.
    """

    schema_version: int = TREE_SCHEMA_VERSION
    entries: list[TreeEntry]


StageOutcome = Literal["succeeded", "cached", "failed", "skipped", "degraded", "disabled"]


class ExecutionOptions(Record, kw_only=True):
    """How a run treats failures: `--execution-mode` and the limits that go with it."""

    mode: Literal["production", "sampling"] = "production"
    systemic_min_items: int = 20
    systemic_threshold: float = 0.80
    max_consecutive_failures: int | None = None


class SystemicFailure(Record, kw_only=True):
    """Why a sampling run aborted: too many items failed at one infrastructure stage."""

    trigger_stage: str
    processed_items: int
    stage_failures: int
    failure_ratio: float
    threshold_ratio: float
    item_samples: list[str]
    dominant_failure_signals: list[str]


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
    items: list[str] = []
    execution: ExecutionOptions = ExecutionOptions()
    systemic: SystemicFailure | None = None
    status: Literal["succeeded", "degraded", "failed", "aborted"] | None = None


class FirstFailure(Record, kw_only=True):
    """The first failure of an item: where, what, when."""

    stage: str
    failure: Failure
    at: datetime


class ItemRecord(Record, kw_only=True):
    """`runs/<run_id>/items/<item>/_item.json`: one item of an item run.

    Written when the item starts (`running`, with the snapshots of its own inputs), again the
    moment a failure happens, and when it ends.  `first_failure` is the failure that stopped
    the item (status `failed`); `fallbacks` are failures a fallback covered (`on_failure` =
    `use_last_good` or `skip`), after which the item went on (status `degraded` at the end).
    """

    schema_version: int = ITEM_SCHEMA_VERSION
    run_id: str
    item: str
    status: Literal["running", "succeeded", "degraded", "failed"]
    inputs: dict[str, dict[str, ArtifactRef]] = {}
    first_failure: FirstFailure | None = None
    fallbacks: list[FirstFailure] = []
    started_at: datetime
    finished_at: datetime | None = None


class CacheEntry(Record, kw_only=True):
    """`cache/<key>.json`: where a succeeded manifest for a (input_hash, config_hash) lives."""

    schema_version: int = CACHE_ENTRY_SCHEMA_VERSION
    run_id: str
    item: str | None = None
    stage: str
    input_hash: str
    config_hash: str


class StatCacheFolder(Record, kw_only=True):
    """`stat-cache/<32 hex>`: one workspace folder's files as last hashed (docs/format.md).

    Stored as msgpack followed by the BLAKE3 of those bytes, so a torn record is detected.
    `files[i]` is (name, ino, size, mtime_ns, ctime_ns, executable) and `hashes[i]` the digest
    of that file's bytes; only entries that were not racy when recorded are kept.  `tree` and
    `total` are the folder's tree digest and bytes, valid while `files` is exactly the folder's
    files and `dirs` (name, tree digest, bytes) exactly its subfolders."""

    schema_version: int = STAT_CACHE_SCHEMA_VERSION
    path: str  # the folder's absolute path
    dev: int  # the folder's device and inode
    ino: int
    files: list[tuple[str, int, int, int, int, bool]] = []
    hashes: list[str] = []
    dirs: list[tuple[str, str, int]] = []
    tree: str | None = None
    total: int = 0


class ViewFolder(Record, kw_only=True):
    """The stat of one folder of a view when it was sealed: an entry added, removed or renamed
    in it, or a chmod, changes its mtime or ctime (docs/format.md, `views/`)."""

    path: str  # relative to the view's `tree/`; "" for `tree/` itself
    ino: int
    mtime_ns: int
    ctime_ns: int


class ViewSeal(Record, kw_only=True):
    """`views/<tree hex>/seal.json`: the view in `tree/` holds exactly tree `tree`."""

    schema_version: int = VIEW_SEAL_SCHEMA_VERSION
    tree: str
    files: int
    boot_id: str  # the boot the view was checked in; another boot means a full check first
    sealed_ns: int  # wall clock when it was checked: a file changed since has a newer ctime
    folders: list[ViewFolder]


class StoreFormat(Record, kw_only=True):
    """`stagestore.json` at the store's root: which format this folder holds."""

    format: Literal["stagestore"] = "stagestore"
    version: int


class RemoteSpec(Record, kw_only=True):
    """One remote of a store: where it is.  Never a credential (docs/remote.md)."""

    name: str
    url: str  # s3://BUCKET/PREFIX, or file:///PATH
    endpoint: str | None = None  # an S3-compatible server's URL; None: AWS
    region: str | None = None
    probed_at: datetime | None = None  # when create-only writes were last seen to hold


class StoreConfig(Record, kw_only=True):
    """`config.json` at the store's root: the store's settings (today: its remotes)."""

    schema_version: int = STORE_CONFIG_SCHEMA_VERSION
    remotes: list[RemoteSpec] = []


class RemoteFormat(Record, kw_only=True):
    """`stagestore-remote.json` at a remote's root: which format the remote holds."""

    schema_version: int = REMOTE_FORMAT_VERSION
    format: Literal["stagestore-remote"] = "stagestore-remote"


DOCUMENTS: dict[str, type[Record]] = {
    "stage-manifest": StageManifest,
    "run-record": RunRecord,
    "item-record": ItemRecord,
    "tree-listing": TreeListing,
    "cache-entry": CacheEntry,
    "stat-cache": StatCacheFolder,
    "pipeline": PipelineDef,
    "store-config": StoreConfig,
    "remote-format": RemoteFormat,
    "view-seal": ViewSeal,
}


# --- encoding and decoding ---

_CURRENT_VERSIONS: dict[type[Record], int] = {
    StageManifest: MANIFEST_SCHEMA_VERSION,
    TreeListing: TREE_SCHEMA_VERSION,
    RunRecord: RUN_SCHEMA_VERSION,
    CacheEntry: CACHE_ENTRY_SCHEMA_VERSION,
    ItemRecord: ITEM_SCHEMA_VERSION,
    StatCacheFolder: STAT_CACHE_SCHEMA_VERSION,
    StoreConfig: STORE_CONFIG_SCHEMA_VERSION,
    RemoteFormat: REMOTE_FORMAT_VERSION,
    ViewSeal: VIEW_SEAL_SCHEMA_VERSION,
}

def _manifest_1_to_2(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 2 added `item`, `degraded_from`, `events`, `warnings` and, in `failure`,
    `category`, `domain`, `taxonomy_eligible` and `rule`; version-1 failures were classified by
    class alone, so they get the category their class has now."""
    raw = dict(raw, schema_version=2)
    if raw.get("failure") is not None:
        raw["failure"] = upgrade_failure(raw["failure"])
    raw["logs"] = [dict(log, failure=upgrade_failure(log["failure"])) if log.get("failure")
                   else log for log in raw.get("logs", [])]
    return raw


def _run_1_to_2(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 2 added `items`, `execution` and `systemic` (all defaulted) and the stage
    fields of the failure model to the definition (defaulted too)."""
    return dict(raw, schema_version=2)


def _manifest_2_to_3(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 3 added the status `disabled` and `resources` (defaulted)."""
    return dict(raw, schema_version=3)


def _run_2_to_3(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 3 added the outcome `disabled` and, in the definition, `enabled` and the keys of
    built-in kinds (all defaulted)."""
    return dict(raw, schema_version=3)


# Upgraders from version N to N+1, per record type: `_UPGRADES[StageManifest][1]` turns a
# version-1 document (as a dict) into a version-2 one.
_UPGRADES: dict[type[Record], dict[int, Any]] = {
    StageManifest: {1: _manifest_1_to_2, 2: _manifest_2_to_3},
    RunRecord: {1: _run_1_to_2, 2: _run_2_to_3},
    CacheEntry: {1: lambda raw: dict(raw, schema_version=2)},  # added `item`
}

# Types whose older versions decode unchanged, the reader telling the versions apart: a
# version-1 tree is flat and a version-2 one nests subtrees, which no upgrade of one record
# can turn into each other (`trees.read_tree` reads both).
_READ_AS_IS: set[type[Record]] = {TreeListing}


def encode_record(record: Record) -> bytes:
    """Readable JSON (indented, keys in a stable order) with a trailing newline."""
    return msgspec.json.format(msgspec.json.encode(record, order="deterministic"), indent=2) + b"\n"


# One decoder per record type, built at import: msgspec builds a type's decoding plan on its
# first use, and two threads doing that at once for the same type have crashed the interpreter
# (SIGSEGV, seen with `run -j 2`); prebuilt decoders are also faster.
_PROBE_DECODER = msgspec.json.Decoder(VersionProbe)
_RAW_DECODER = msgspec.json.Decoder()
_DECODERS: dict[type[Record], msgspec.json.Decoder] = {
    type_: msgspec.json.Decoder(type_) for type_ in _CURRENT_VERSIONS}
STORE_FORMAT_DECODER = msgspec.json.Decoder(StoreFormat)

# What a malformed document can raise besides msgspec's own errors: bad UTF-8, nesting deeper
# than the interpreter's recursion limit, and (in an upgrader) a field of the wrong shape.
_MALFORMED = (msgspec.ValidationError, msgspec.DecodeError, KeyError, TypeError, AttributeError,
              ValueError, RecursionError)


def decode_record(data: bytes, type_: type[Record], where: str) -> Any:
    """Decode a versioned record: refuse newer versions, upgrade older ones, then validate.

    Raises `FormatVersionError` for a newer version and `CorruptRecordError` for anything that
    does not decode; `where` (a path or object name) is named in both.
    """
    from ..errors import CorruptRecordError, FormatVersionError

    what = type_.__name__
    current = _CURRENT_VERSIONS[type_]
    try:
        version = _PROBE_DECODER.decode(data).schema_version
    except _MALFORMED as exc:
        raise CorruptRecordError(f"{where}: not a valid {what}: {_reason(exc)}",
                                 path=where) from None
    if version > current:
        raise FormatVersionError(
            f"{where}: {what} has schema_version {version}, but this stagestore reads only "
            f"versions up to {current}", hint="upgrade stagestore to read this store")
    if version < 1:
        raise CorruptRecordError(f"{where}: invalid schema_version {version}", path=where)
    try:
        if version < current and type_ in _READ_AS_IS:
            return _DECODERS[type_].decode(data)
        if version < current:
            raw = _RAW_DECODER.decode(data)
            while raw["schema_version"] < current:
                raw = _UPGRADES[type_][raw["schema_version"]](raw)
            return msgspec.convert(raw, type_)
        return _DECODERS[type_].decode(data)
    except _MALFORMED as exc:
        raise CorruptRecordError(f"{where}: not a valid {what}: {_reason(exc)}",
                                 path=where) from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 at byte {exc.start}"
    return str(exc) or type(exc).__name__
