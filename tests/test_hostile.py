"""Hostile input: the decoders under fuzzing, crafted names, hostile stage outputs, a damaged
object, a read-only store, and a stage (running as root) writing into the inputs it was handed.

Decoders
    `pipeline._decode` / `load_pipeline`, and `decode_record` for every record type followed by
    the checks its reader runs (`check_manifest`, `check_tree`), get arbitrary bytes, structured
    documents built from strategies, and mutations of valid documents (wrong types, huge
    integers, deep nesting, NaN, very long strings, raw invalid UTF-8).  Only `StagestoreError`
    subclasses may escape; each example must finish within a second (hypothesis
    `deadline=1000`) and its traced allocations must peak under 64 MiB.  Inputs of 1 MiB are
    checked separately against the same memory bound and a linear time budget.

    Tiers: 200 examples per target in the default run (every one memory-traced); `-m slow`
    runs 20,000 per target (the pipeline targets trace one example in ten: tracemalloc slows
    tomllib fivefold).

    atheris: not a dependency.  `pip install atheris` works here (PyPI has a prebuilt manylinux
    wheel for CPython 3.11 on x86_64, so neither clang nor a libFuzzer build is needed); when it
    is importable, the slow tier also runs each target under atheris (libFuzzer, 20,000 runs,
    `-timeout=1`, `-rss_limit_mb`).  Without it those tests skip and the hypothesis slow tier
    stands in.

Known bugs
    A bug found here gets its own `xfail(strict=True)` test naming file and line, and the fuzz
    tests tolerate exactly it (`KNOWN_BUGS`: exception type plus where on the traceback it comes
    from) so that they stay useful for finding new ones; when it is fixed, the strict xfail test
    starts passing and fails the suite until the marker and the `KNOWN_BUGS` entry go.  The
    eight found so far (and the drive-prefix gap) are fixed: their tests are the
    `test_regression_*` ones.
"""

from __future__ import annotations

import atexit
import errno
import gc
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
import tracemalloc
import unicodedata
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from stagestore.store import durable
from stagestore.inspection.checkout import checkout
from stagestore.errors import CorruptRecordError, PipelineError, StagestoreError
from stagestore.store.hashing import EMPTY_DIGEST, canonical_json, digest_bytes
from stagestore.store.manifests import check_manifest, output_hash
from stagestore.pipeline.model import Pipeline, _decode, load_pipeline, validate_pipeline
from stagestore.model.records import (ArtifactRef, AttemptLog, CacheEntry, ExecutionOptions,
                                      Failure, FirstFailure, ItemRecord, PipelineDef, PipelineMeta,
                                      PipelineRef, RunRecord, StageEvent, StageManifest, StageSpec,
                                      TreeEntry, TreeListing, decode_record)
from stagestore.inspection.recover import recover
from stagestore.execution.runner import run
from stagestore.store.store import Store
from stagestore.store.trees import check_tree, read_tree
from stagestore.inspection.verify import verify

sys.path.insert(0, str(Path(__file__).parent))
from invariants import check_sentinel, check_store, snapshot_tree  # noqa: E402
from workloads import make as make_workload, sentinel as make_sentinel  # noqa: E402

MEMORY_LIMIT = 64 << 20
FAST = 200
SLOW = 20_000
MIB = 1 << 20


def _fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=1000, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# --- known bugs, tolerated by the fuzz tests only ------------------------------------------


@dataclass(frozen=True)
class KnownBug:
    """An untyped exception the fuzzers may meet: its types, a function (`module.function`)
    that must be on its traceback, optionally the innermost frame's module and a message."""

    name: str
    types: tuple[type[BaseException], ...]
    on_stack: str
    innermost: tuple[str, ...] = ()
    message: str = ""
    test: str = ""

    def matches(self, exc: BaseException) -> bool:
        if not isinstance(exc, self.types) or not re.search(self.message, str(exc)):
            return False
        frames = []
        tb = exc.__traceback__
        while tb is not None:  # no source lines looked up: a RecursionError has ~1000 frames
            code = tb.tb_frame.f_code
            frames.append(f"{Path(code.co_filename).stem}.{code.co_name}")
            tb = tb.tb_next
        if self.on_stack not in frames:
            return False
        return not self.innermost or frames[-1].startswith(self.innermost)


# Untyped exceptions the fuzzers tolerate while a bug is open, each pinned by a strict xfail
# test (see `test_every_known_bug_is_pinned_by_a_strict_xfail_test`). The eight found so far are
# fixed; their tests below are regressions now.
KNOWN_BUGS: tuple[KnownBug, ...] = ()

MET: Counter[str] = Counter()  # known bugs the fuzzers met in this process, by name


def _known(exc: BaseException) -> KnownBug | None:
    return next((bug for bug in KNOWN_BUGS if bug.matches(exc)), None)


def only_typed_errors(call, *, traced: bool = True, limit: int = MEMORY_LIMIT) -> Any:  # noqa: ANN001
    """Run `call()`: a StagestoreError is fine, a known bug is counted, anything else fails the
    test; traced allocations must peak under `limit`.  Returns the result or the error."""
    if traced:
        tracemalloc.start()
    try:
        return call()
    except StagestoreError as exc:
        return exc
    except BaseException as exc:  # noqa: BLE001
        bug = _known(exc)
        if bug is None:
            raise
        MET[bug.name] += 1
        return exc
    finally:
        if traced:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < limit, f"decoding peaked at {peak / MIB:.1f} MiB"


# --- TOML and JSON writers that can express what the standard encoders cannot ----------------


@dataclass(frozen=True)
class Deep:
    """`depth` nested arrays (or tables) around `leaf`: encoded directly, never recursed."""

    depth: int
    table: bool = False


@dataclass(frozen=True)
class Raw:
    """Text put into the document as is (invalid UTF-8, broken syntax)."""

    data: bytes


def _toml_str(text: str) -> str:
    out = json.dumps(text, ensure_ascii=False)
    return out.replace("\x7f", "\\u007F")


def toml_value(value: Any) -> bytes:
    if isinstance(value, Raw):
        return value.data
    if isinstance(value, Deep):
        if value.table:
            return b"{a = " * value.depth + b"1" + b"}" * value.depth
        return b"[" * value.depth + b"]" * value.depth
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, float):
        if math.isnan(value):
            return b"nan"
        if math.isinf(value):
            return b"inf" if value > 0 else b"-inf"
        return repr(value).encode()
    if isinstance(value, datetime):
        return value.isoformat().encode()
    if isinstance(value, str):
        return _toml_str(value).encode("utf-8", "surrogatepass")
    if isinstance(value, (list, tuple)):
        return b"[" + b", ".join(toml_value(v) for v in value) + b"]"
    if isinstance(value, dict):
        return b"{" + b", ".join(toml_key(k) + b" = " + toml_value(v)
                                 for k, v in value.items()) + b"}"
    raise TypeError(type(value))


def toml_key(key: Any) -> bytes:
    return key.data if isinstance(key, Raw) else _toml_str(str(key)).encode("utf-8", "surrogatepass")


def toml_document(top: dict) -> bytes:
    """Top-level tables as `[table]` sections (the usual shape), everything else inline."""
    lines: list[bytes] = []
    for key, value in top.items():
        if isinstance(value, dict) and key in ("pipeline", "stages"):
            if key == "stages" and all(isinstance(v, dict) for v in value.values()):
                for name, table in value.items():
                    lines.append(b"[stages." + toml_key(name) + b"]")
                    lines.extend(toml_key(k) + b" = " + toml_value(v) for k, v in table.items())
                continue
            lines.append(b"[" + toml_key(key) + b"]")
            lines.extend(toml_key(k) + b" = " + toml_value(v) for k, v in value.items())
        else:
            lines.insert(0, toml_key(key) + b" = " + toml_value(value))
    return b"\n".join(lines) + b"\n"


def json_value(value: Any, nan_tokens: bool = False) -> bytes:
    if isinstance(value, Raw):
        return value.data
    if isinstance(value, Deep):
        if value.table:
            return b'{"a":' * value.depth + b"1" + b"}" * value.depth
        return b"[" * value.depth + b"]" * value.depth
    if isinstance(value, float) and not math.isfinite(value):
        return (b"NaN" if math.isnan(value) else b"Infinity" if value > 0 else b"-Infinity") \
            if nan_tokens else b"null"
    if isinstance(value, datetime):
        return json.dumps(value.isoformat()).encode()
    if isinstance(value, (list, tuple)):
        return b"[" + b",".join(json_value(v, nan_tokens) for v in value) + b"]"
    if isinstance(value, dict):
        return b"{" + b",".join(json_value(k if isinstance(k, Raw) else str(k), nan_tokens)
                                + b":" + json_value(v, nan_tokens)
                                for k, v in value.items()) + b"}"
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


# --- strategies ---------------------------------------------------------------------------

PIPELINE_KEYS = ["pipeline", "stages", "name", "version", *StageSpec.__struct_fields__, "match",
                 "exit_code", "class", "category", "check", "output", "limit", "critical"]
RECORD_KEYS = sorted({*StageManifest.__struct_fields__, *TreeListing.__struct_fields__,
                      *TreeEntry.__struct_fields__, *RunRecord.__struct_fields__,
                      *ItemRecord.__struct_fields__, *CacheEntry.__struct_fields__,
                      *ArtifactRef.__struct_fields__, *AttemptLog.__struct_fields__,
                      *Failure.__struct_fields__, "class"})
TRICKY_STRINGS = [
    "", " ", "true", "{inputs.x}", "{upstream.a.o}", "{params.p}", "{item}", "{run_id}", "{", "}}",
    "{{", "{unknown}", "512MiB", "1.5 GB", "-1", "9" * 400, "../x", "/etc/passwd", "a/../b", ".",
    "..", "a//b", "C:foo", "C:\\x", "a\\b", "a\x00b", "\u00e9", "e\u0301", "x" * 256,
    "a{99999999999}", "(" * 300 + ")" * 300, "[", "(?P<", "mod:fn", "a.b:c", "sh -c 'x", "\"",
    "blake3:" + "0" * 64, EMPTY_DIGEST, "fatal", "retryable", "file", "tree", "dir", "succeeded",
    "failed", "degraded", "nonempty", "max_bytes", "json", "BuildFailure", "XFailure",
    "2024-01-01T00:00:00Z", "infrastructure", "build", "use_last_good", "skip",
]
texts = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
scalars = st.one_of(
    texts, st.sampled_from(TRICKY_STRINGS), st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.datetimes(min_value=datetime(1000, 1, 1), max_value=datetime(9999, 12, 31)),
)
SPECIALS = [
    *(Deep(n, table) for n in (1, 10, 100, 300, 600, 1000, 2500) for table in (False, True)),
    *("x" * n for n in (300, 5000, 20_000)), "\u00e9" * 3000,
    Raw(b'"\xff"'), Raw(b'"\xc3"'), Raw(b'"\xed\xa0\x80"'), Raw(b'"a\x00"'), Raw(b"1" * 5000),
    Raw(b"-" + b"9" * 4400), Raw(b"1e999"), Raw(b"'"), Raw(b"nan"), Raw(b"-inf"),
]
hostile_scalars = st.one_of(scalars, st.sampled_from(SPECIALS),
                            st.builds(Deep, st.integers(min_value=1, max_value=2500), st.booleans()))


def documents(keys: list[str], leaves: st.SearchStrategy) -> st.SearchStrategy:
    key = st.one_of(st.sampled_from(keys), texts)
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(key, inner, max_size=5)), max_leaves=15)


@st.composite
def pipeline_documents(draw: st.DrawFn) -> dict:
    """A dict shaped like a pipeline file: `[pipeline]` and `[stages.NAME]` with random keys."""
    key = st.one_of(st.sampled_from(PIPELINE_KEYS), texts)
    value = documents(PIPELINE_KEYS, hostile_scalars)
    stage = st.dictionaries(key, value, max_size=8)
    names = st.one_of(st.sampled_from(["a", "b", "s0", "s-1", "x.y", "..", "a/b", "a b", ""]), texts)
    top: dict = {}
    if draw(st.booleans()):
        top["pipeline"] = draw(st.dictionaries(key, value, max_size=3) | st.just({"name": "p"}))
    if draw(st.booleans()):
        top["stages"] = draw(st.dictionaries(names, stage, max_size=4))
    top.update(draw(st.dictionaries(key, value, max_size=2)))
    return top


VALID_PIPELINE = textwrap.dedent("""
    [pipeline]
    name = "valid"
    version = "2"

    [stages.make]
    cmd = ["python", "{inputs.src}", "{outputs.out}", "{params.n}"]
    inputs = { src = "data.txt" }
    outputs = ["out"]
    params = { n = 3, label = "x" }
    env = { LANG = "C" }
    timeout = 10.0
    retries = 2
    retry_delay = 0.1
    disk = "1MiB"
    description = "make it"
    domain = "infrastructure"
    on_failure = "use_last_good"

    [[stages.make.classify]]
    match = "flaky"
    exit_code = 3
    class = "FlakyFailure"
    category = "retryable"

    [[stages.make.checks]]
    check = "max_bytes"
    limit = "10 KiB"
    output = "out"

    [stages.use]
    upstream = ["make"]
    cmd = "cat {upstream.make.out} > {outputs.o}"
    shell = true
    outputs = ["o"]
    allow_empty = []
    checks = [{ cmd = "test -s {outputs.o}", critical = true }]
""")


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and indexes) into a nested document, the root included."""
    found = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            found.extend(_paths(v, (*prefix, k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found.extend(_paths(v, (*prefix, i)))
    return found


def _replace_at(doc: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(doc, dict):
        return {**doc, head: _replace_at(doc[head], rest, new)}
    copy = list(doc)
    copy[head] = _replace_at(doc[head], rest, new)
    return copy


def _delete_at(doc: Any, path: tuple) -> Any:
    if len(path) == 1:
        if isinstance(doc, dict):
            return {k: v for k, v in doc.items() if k != path[0]}
        return [v for i, v in enumerate(doc) if i != path[0]]
    head = path[0]
    if isinstance(doc, dict):
        return {**doc, head: _delete_at(doc[head], path[1:])}
    copy = list(doc)
    copy[head] = _delete_at(doc[head], path[1:])
    return copy


@st.composite
def mutated(draw: st.DrawFn, base: Any, keys: list[str]) -> Any:
    """`base` with one to three mutations: a value replaced by a hostile one (wrong type, huge
    integer, deep nesting, NaN, a long string, invalid UTF-8), a key removed, a key added."""
    doc = base
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
        if action == "delete" and path:
            doc = _delete_at(doc, path)
        elif action == "add":
            container_paths = [p for p in paths if isinstance(_get(doc, p), dict)]
            if container_paths:
                where = draw(st.sampled_from(container_paths))
                key = draw(st.one_of(st.sampled_from(keys), texts))
                target = _get(doc, where)
                doc = _replace_at(doc, where, {**target, key: draw(documents(keys, hostile_scalars))})
        else:
            doc = _replace_at(doc, path, draw(documents(keys, hostile_scalars)))
    return doc


def _get(doc: Any, path: tuple) -> Any:
    for part in path:
        doc = doc[part]
    return doc


# --- valid records to mutate --------------------------------------------------------------

D1, D2, D3 = (digest_bytes(bytes([i])) for i in range(3))
T0 = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


def _valid_records() -> dict[str, tuple[type, Any]]:
    ref = ArtifactRef(hash=D1, size=3, kind="file")
    tree_ref = ArtifactRef(hash=D2, size=0, kind="tree")
    failure = Failure(class_="BuildFailure", signal="boom", exit_code=2)
    log = AttemptLog(attempt=1, stdout=EMPTY_DIGEST, stderr=D3, exit_code=2, started_at=T0,
                     finished_at=T0, failure=failure)
    outputs = {"o": ref, "t": tree_ref}
    succeeded = StageManifest(
        stage="s", run_id="r", pipeline=PipelineRef(name="p", version="1"), status="succeeded",
        input_hash=D1, config_hash=D2, output_hash=output_hash(outputs),
        inputs={"inputs.x": ref, "upstream.a.o": ref}, upstream={"a": D3}, outputs=outputs,
        started_at=T0, finished_at=T0, attempts=1,
        logs=[AttemptLog(attempt=1, stdout=D1, stderr=D2, exit_code=0, started_at=T0, finished_at=T0)],
        events=[StageEvent(at=T0, kind="retry", message="again")], warnings=["w"])
    failed = StageManifest(
        stage="s", run_id="r", item="i/1", pipeline=PipelineRef(name="p", version="1"),
        status="failed", input_hash=D1, config_hash=D2, output_hash=None, inputs={}, outputs={},
        started_at=T0, finished_at=T0, attempts=1, logs=[log], failure=failure)
    tree = TreeListing(schema_version=1, entries=[TreeEntry(path="d", kind="dir"),
                                TreeEntry(path="d/f", kind="file", size=3, hash=D1),
                                TreeEntry(path="x", kind="file", executable=True, size=0, hash=EMPTY_DIGEST)])
    definition = _decode(VALID_PIPELINE.encode(), "v.toml")
    run_record = RunRecord(run_id="r", pipeline=PipelineRef(name="p", version="1"),
                           pipeline_file="/w/stagestore.toml", workdir="/w", definition=definition,
                           selected=["make", "use"], inputs={"make": {"src": ref}}, started_at=T0,
                           finished_at=T0, outcomes={"make": "succeeded"}, items=["a", "b"],
                           execution=ExecutionOptions(mode="sampling"), status="succeeded")
    item = ItemRecord(run_id="r", item="a", status="failed", inputs={"make": {"src": ref}},
                      first_failure=FirstFailure(stage="make", failure=failure, at=T0),
                      fallbacks=[], started_at=T0, finished_at=T0)
    cache = CacheEntry(run_id="r", stage="s", input_hash=D1, config_hash=D2)
    v1 = msgspec.to_builtins(failed)
    v1.update(schema_version=1)
    for key in ("item", "degraded_from", "events", "warnings"):
        v1.pop(key, None)
    for f in [v1["failure"], *(lg["failure"] for lg in v1["logs"])]:
        for key in ("category", "domain", "taxonomy_eligible", "rule"):
            f.pop(key, None)
    return {
        "manifest-succeeded": (StageManifest, msgspec.to_builtins(succeeded)),
        "manifest-failed": (StageManifest, msgspec.to_builtins(failed)),
        "manifest-v1": (StageManifest, v1),
        "tree": (TreeListing, msgspec.to_builtins(tree)),
        "run": (RunRecord, msgspec.to_builtins(run_record)),
        "run-v1": (RunRecord, {**msgspec.to_builtins(run_record), "schema_version": 1}),
        "item": (ItemRecord, msgspec.to_builtins(item)),
        "cache": (CacheEntry, msgspec.to_builtins(cache)),
        "cache-v1": (CacheEntry, {**msgspec.to_builtins(cache), "schema_version": 1}),
    }


VALID_RECORDS = _valid_records()


def test_every_known_bug_is_pinned_by_a_strict_xfail_test():
    for bug in KNOWN_BUGS:
        test = globals()[bug.test]
        marks = [m for m in getattr(test, "pytestmark", []) if m.name == "xfail"]
        assert marks and marks[0].kwargs.get("strict") is True, bug.name


def test_the_valid_bases_are_valid(tmp_path):
    """The mutation fuzzers start from documents that decode and pass their checks."""
    for name, (type_, doc) in VALID_RECORDS.items():
        record = decode_record(json_value(doc), type_, name)
        if type_ is StageManifest:
            check_manifest(record, record.run_id, record.stage, name, record.item)
        if type_ is TreeListing:
            check_tree(record, name)
    (tmp_path / "data.txt").write_text("x")
    (tmp_path / "stagestore.toml").write_text(VALID_PIPELINE)
    assert load_pipeline(tmp_path / "stagestore.toml").order() == ["make", "use"]
    again = toml_document(tomllib.loads(VALID_PIPELINE))
    assert _decode(again, "again.toml") == _decode(VALID_PIPELINE.encode(), "v.toml")


# --- the targets --------------------------------------------------------------------------

_WORKDIR: Path | None = None  # where load_pipeline's file goes; made on first use


def _pipeline_file(data: bytes) -> Path:
    global _WORKDIR
    if _WORKDIR is None:
        _WORKDIR = Path(tempfile.mkdtemp(prefix="stagestore-hostile-"))
        atexit.register(shutil.rmtree, _WORKDIR, True)
    (_WORKDIR / "data.txt").write_text("x")
    path = _WORKDIR / "stagestore.toml"
    path.write_bytes(data)
    return path


def target_pipeline(data: bytes, traced: bool = True) -> None:
    """`_decode` on the bytes, then the whole way a file is read: `load_pipeline`, which
    decodes again and validates (memory is traced there only: it does all `_decode` does)."""
    only_typed_errors(lambda: _decode(data, "x.toml"), traced=False)
    only_typed_errors(lambda: load_pipeline(_pipeline_file(data)), traced=traced)


def _check_record(data: bytes, type_: type) -> None:
    record = decode_record(data, type_, "where")
    if type_ is StageManifest:
        check_manifest(record, record.run_id, record.stage, "where", record.item)
        check_manifest(record, "r", "s", "where")
    elif type_ is TreeListing:
        check_tree(record, "where")


RECORD_TYPES = [StageManifest, TreeListing, RunRecord, ItemRecord, CacheEntry]


def target_record(data: bytes, type_: type, traced: bool = True) -> None:
    only_typed_errors(lambda: _check_record(data, type_), traced=traced)


# --- hypothesis: fast tier ----------------------------------------------------------------


@_fuzz_settings(FAST)
@given(st.binary(max_size=4096))
def test_pipeline_decoder_on_arbitrary_bytes(data):
    target_pipeline(data)


@_fuzz_settings(FAST)
@given(pipeline_documents())
def test_pipeline_decoder_on_structured_toml(doc):
    target_pipeline(toml_document(doc))


@_fuzz_settings(FAST)
@given(mutated(tomllib.loads(VALID_PIPELINE), PIPELINE_KEYS))
def test_pipeline_decoder_on_mutated_valid_pipelines(doc):
    assume(isinstance(doc, dict))
    target_pipeline(toml_document(doc))


@pytest.mark.parametrize("type_", RECORD_TYPES, ids=lambda t: t.__name__)
@_fuzz_settings(FAST)
@given(data=st.binary(max_size=4096))
def test_record_decoder_on_arbitrary_bytes(type_, data):
    target_record(data, type_)


@pytest.mark.parametrize("type_", RECORD_TYPES, ids=lambda t: t.__name__)
@_fuzz_settings(FAST)
@given(doc=documents(RECORD_KEYS, hostile_scalars), version=st.sampled_from([None, 0, 1, 2, 3]))
def test_record_decoder_on_structured_json(type_, doc, version):
    if isinstance(doc, dict) and version is not None:
        doc = {"schema_version": version, **doc}
    target_record(json_value(doc), type_)


@pytest.mark.parametrize("base", sorted(VALID_RECORDS))
@_fuzz_settings(FAST)
@given(data=st.data(), nan_tokens=st.booleans())
def test_record_decoder_on_mutated_valid_records(base, data, nan_tokens):
    type_, doc = VALID_RECORDS[base]
    doc = data.draw(mutated(doc, RECORD_KEYS))
    target_record(json_value(doc, nan_tokens), type_)


# --- hypothesis: slow tier (20,000 examples per target) ------------------------------------

def _one_in(n: int, data: bytes) -> bool:
    """True for about one input in `n`, always the same ones (a replayed example is traced
    again, so its timing stays comparable): the slow pipeline targets trace memory for one
    example in ten, since tracemalloc makes tomllib ~5x slower; the fast tier traces every
    example and the 1 MiB tests bound memory directly."""
    return zlib.crc32(data) % n == 0


@pytest.mark.slow
@_fuzz_settings(SLOW)
@given(st.binary(max_size=4096))
def test_slow_pipeline_decoder_on_arbitrary_bytes(data):
    target_pipeline(data, traced=_one_in(10, data))


@pytest.mark.slow
@_fuzz_settings(SLOW)
@given(pipeline_documents())
def test_slow_pipeline_decoder_on_structured_toml(doc):
    data = toml_document(doc)
    target_pipeline(data, traced=_one_in(10, data))


@pytest.mark.slow
@_fuzz_settings(SLOW)
@given(mutated(tomllib.loads(VALID_PIPELINE), PIPELINE_KEYS))
def test_slow_pipeline_decoder_on_mutated_valid_pipelines(doc):
    assume(isinstance(doc, dict))
    data = toml_document(doc)
    target_pipeline(data, traced=_one_in(10, data))


@pytest.mark.slow
@pytest.mark.parametrize("type_", RECORD_TYPES, ids=lambda t: t.__name__)
@_fuzz_settings(SLOW)
@given(data=st.binary(max_size=4096))
def test_slow_record_decoder_on_arbitrary_bytes(type_, data):
    target_record(data, type_)


@pytest.mark.slow
@pytest.mark.parametrize("type_", RECORD_TYPES, ids=lambda t: t.__name__)
@_fuzz_settings(SLOW)
@given(doc=documents(RECORD_KEYS, hostile_scalars), version=st.sampled_from([None, 0, 1, 2, 3]))
def test_slow_record_decoder_on_structured_json(type_, doc, version):
    if isinstance(doc, dict) and version is not None:
        doc = {"schema_version": version, **doc}
    target_record(json_value(doc), type_)


@pytest.mark.slow
@pytest.mark.parametrize("base", sorted(VALID_RECORDS))
@_fuzz_settings(SLOW)
@given(data=st.data(), nan_tokens=st.booleans())
def test_slow_record_decoder_on_mutated_valid_records(base, data, nan_tokens):
    type_, doc = VALID_RECORDS[base]
    doc = data.draw(mutated(doc, RECORD_KEYS))
    target_record(json_value(doc, nan_tokens), type_)


# --- regressions: the bugs the fuzzers found, each fixed ------------------------------------

BASE_TOML = b"[pipeline]\nname = 'p'\n[stages.a]\ncmd = 'true'\n"


def test_regression_pipeline_with_invalid_utf8_is_a_pipeline_error():
    """msgspec.toml.decode raised UnicodeDecodeError out of pipeline._decode."""
    with pytest.raises(PipelineError, match="not UTF-8 \\(line 2\\)"):
        _decode(b"[pipeline]\nname = '\xff'\n", "x.toml")


def test_regression_pipeline_with_a_5000_digit_integer_is_a_pipeline_error():
    """tomllib raised ValueError (int max str digits), not TOMLDecodeError."""
    pytest.raises(PipelineError, lambda: _decode(BASE_TOML + b"retries = " + b"9" * 5000 + b"\n", "x.toml"))


@pytest.mark.parametrize("nested", [b"[" * 1000 + b"]" * 1000, b"{a = " * 1000 + b"1" + b"}" * 1000],
                         ids=["arrays", "tables"])
def test_regression_deeply_nested_pipeline_is_a_pipeline_error(nested):
    """tomllib parses nesting by recursion: ~500 levels raised RecursionError."""
    pytest.raises(PipelineError, lambda: _decode(BASE_TOML + b"params = { x = " + nested + b" }\n", "x.toml"))


@pytest.mark.parametrize("key", ["disk", "limit"])
def test_regression_a_size_of_400_digits_is_a_pipeline_error(key):
    extra = (b"disk = '" + b"9" * 400 + b"'\n" if key == "disk" else
             b"outputs = ['o']\nchecks = [{check = 'max_bytes', limit = '" + b"9" * 400 + b"'}]\n")
    # parse_size made float() infinite and int() raise OverflowError
    pytest.raises(PipelineError, lambda: _decode_and_validate(BASE_TOML + extra))


@pytest.mark.parametrize("pattern", ["a{99999999999}", "(" * 3000 + ")" * 3000],
                         ids=["repeat-count", "nested-groups"])
def test_regression_a_classify_regex_that_re_cannot_compile_is_a_pipeline_error(pattern):
    extra = ("classify = [{match = " + _toml_str(pattern) + ", class = 'XFailure', "
             "category = 'fatal'}]\n").encode()
    # re.compile raised OverflowError / RecursionError, not re.error
    pytest.raises(PipelineError, lambda: _decode_and_validate(BASE_TOML + extra))


def _decode_and_validate(data: bytes) -> Pipeline:
    pipeline = Pipeline(_decode(data, "x.toml"), Path("/nonexistent/x.toml"), Path("/nonexistent"))
    validate_pipeline(pipeline, check_inputs=False)
    return pipeline


@pytest.mark.parametrize("key", ["timeout", "retry_delay"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_regression_nan_timeout_or_retry_delay_is_refused(key, value):
    """`timeout <= 0` and `retry_delay < 0` are both false for NaN, so NaN was accepted."""
    with pytest.raises(PipelineError, match=key):
        _decode_and_validate(BASE_TOML + f"{key} = {value}\n".encode())


@pytest.mark.parametrize("type_", RECORD_TYPES, ids=lambda t: t.__name__)
def test_regression_deeply_nested_record_is_corrupt(type_):
    data = b'{"schema_version": 1, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(CorruptRecordError):
        decode_record(data, type_, "where")


@pytest.mark.parametrize("type_", [StageManifest, TreeListing], ids=lambda t: t.__name__)
def test_regression_record_with_invalid_utf8_is_corrupt(type_):
    doc = VALID_RECORDS["tree" if type_ is TreeListing else "manifest-failed"][1]
    data = json_value(doc).replace(b'"d/f"' if type_ is TreeListing else b'"boom"',
                                   b'"d/\xff"' if type_ is TreeListing else b'"bo\xffm"')
    with pytest.raises(CorruptRecordError):
        decode_record(data, type_, "where")


V1_MALFORMED = {
    "failure-is-a-string": {"failure": "boom"},
    "failure-class-is-a-list": {"failure": {"class": ["x"], "signal": "s"}},
    "signal-failure-exit-code-is-a-string": {"failure": {"class": "SignalFailure", "signal": "s",
                                                         "exit_code": "9"}},
    "logs-is-null": {"logs": None},
    "logs-is-a-number": {"logs": 5},
    "a-log-is-a-string": {"logs": ["x"]},
}


@pytest.mark.parametrize("change", sorted(V1_MALFORMED))
def test_regression_malformed_version_1_manifest_is_corrupt(change):
    doc = {**VALID_RECORDS["manifest-v1"][1], **V1_MALFORMED[change]}
    with pytest.raises(CorruptRecordError):
        decode_record(json_value(doc), StageManifest, "where")


@pytest.fixture
def linear_run(ws):
    """The shell `linear` workload (make: folder `out`; count: file `n`; report), run as `a`."""
    make_workload("linear", ws.root)
    store = ws.open_store()
    assert run(ws.load(), store, run_id="a").ok
    return ws, store


@pytest.mark.parametrize("damage", ["manifest-invalid-utf8", "manifest-deep", "manifest-v1-malformed",
                                    "tree-invalid-utf8"])
def test_regression_verify_reports_a_damaged_record_instead_of_crashing(linear_run, damage):
    ws, store = linear_run
    path = store.layout.manifest_path("a", "count")
    if damage.startswith("tree"):
        path = store.objects.path(store.manifests.read("a", "make").outputs["out"].hash)
        data = path.read_bytes().replace(b"f0.txt", b"f0.t\xfft")
    elif damage == "manifest-invalid-utf8":
        data = path.read_bytes().replace(b'"count"', b'"co\xffnt"')
    elif damage == "manifest-deep":
        data = b'{"schema_version": 2, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    else:
        data = json_value({**VALID_RECORDS["manifest-v1"][1], "run_id": "a", "stage": "count",
                           "failure": "boom"})
    os.chmod(path, 0o644)
    path.write_bytes(data)
    report = verify(store)
    assert not report.ok
    assert {f.kind for f in report.problems} & {"manifest_invalid", "tree_invalid", "object_corrupt"}


def _chain_pipeline(size: int) -> bytes:
    lines = [b"[pipeline]\nname = 'chain'\n"]
    total, i = 0, 0
    while total < size:
        line = f"[stages.s{i}]\ncmd = 'true'\n".encode() + (
            f"upstream = ['s{i - 1}']\n".encode() if i else b"")
        lines.append(line)
        total += len(line)
        i += 1
    return b"".join(lines)


def _flat_pipeline(size: int) -> bytes:
    """As many stages as `_chain_pipeline(size)`, none upstream of another: the peer that the
    chain and the cycle are timed against in the same test (growth, not a fixed cost)."""
    flat = _chain_pipeline(size).replace(b"upstream = ['s", b"description = ['s")
    return re.sub(rb"description = \['s\d+'\]", b"description = 'x'", flat)


def _assert_linear(took: float | None, peer: float | None, what: str) -> None:
    # Linear code takes about as long as the flat peer (~0.2 s here); the quadratic code this
    # guards against took 15 to 150 times as long.  5x leaves room for a noisy machine.
    assert peer is not None, "the flat peer pipeline did not validate in time"
    assert took is not None and took < 5 * peer + 0.5, f"{what}: {took} s, flat peer {peer:.2f} s"


def _validate_in_child(data: bytes, tmp_path: Path, kill_after: float = 8.0) -> float | None:
    """Seconds `validate_pipeline` took on `data` (decoded first, untimed: tomllib alone is
    about a second per MiB), in a fresh interpreter; None when it was still busy after
    `kill_after` seconds."""
    path = tmp_path / "stagestore.toml"
    path.write_bytes(data)
    code = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from stagestore.errors import StagestoreError
        from stagestore.pipeline.model import Pipeline, _decode, validate_pipeline
        path = Path(sys.argv[1])
        pipeline = Pipeline(_decode(path.read_bytes(), str(path)), path, path.parent)
        started = time.perf_counter()
        try:
            validate_pipeline(pipeline, check_inputs=False)
        except StagestoreError:
            pass
        print(time.perf_counter() - started)
    """)
    try:
        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                              text=True, timeout=kill_after, check=True)
    except subprocess.TimeoutExpired:
        return None
    return float(done.stdout)


def test_regression_a_1_mib_chain_of_stages_loads_in_linear_time(tmp_path):
    """topological_order rescanned every stage left once per wave: O(n^2), ~30 s for 23,000
    stages in one chain."""
    peer = _validate_in_child(_flat_pipeline(MIB), tmp_path)
    _assert_linear(_validate_in_child(_chain_pipeline(MIB), tmp_path), peer, "chain")


def test_regression_a_1_mib_cycle_is_refused_in_linear_time(tmp_path):
    """_cycle_error tested `nxt in path` on a list: O(n^2), ~3 s for a 21,000-stage cycle."""
    lines = [b"[pipeline]\nname = 'cycle'\n"]
    n = 21_000
    lines += [f"[stages.s{i}]\ncmd = 'true'\nupstream = ['s{(i + 1) % n}']\n".encode() for i in range(n)]
    peer = _validate_in_child(_flat_pipeline(len(b"".join(lines))), tmp_path)
    _assert_linear(_validate_in_child(b"".join(lines), tmp_path), peer, "cycle")


# --- 1 MiB inputs: bounded memory, linear time ---------------------------------------------


def _big_inputs(flat_size: int = MIB) -> dict[str, tuple[str, bytes]]:
    """name -> (target, about 1 MiB of input)."""
    noise = __import__("random").Random(1).randbytes(MIB)
    flat = [b"[pipeline]\nname = 'flat'\n"]
    i = 0
    while sum(map(len, flat)) < flat_size:
        flat.append(f"[stages.s{i}]\ncmd = ['echo', '{{params.p}}']\nparams = {{ p = {i} }}\n".encode())
        i += 1
    manifest = dict(VALID_RECORDS["manifest-failed"][1])
    manifest["failure"] = {**manifest["failure"], "signal": "x" * MIB}
    many_outputs = dict(VALID_RECORDS["manifest-succeeded"][1])
    outputs = {f"o{i}": {"hash": D1, "size": 1, "kind": "file"} for i in range(14_000)}
    many_outputs["outputs"] = outputs
    many_outputs["output_hash"] = digest_bytes(canonical_json(sorted((k, D1) for k in outputs)))
    entries = [{"path": "d", "kind": "dir"}] + [
        {"path": f"d/{i:06d}", "kind": "file", "size": 1, "hash": D1} for i in range(11_000)]
    return {
        "noise-pipeline": ("pipeline", noise),
        "noise-manifest": ("StageManifest", noise),
        "noise-tree": ("TreeListing", noise),
        "long-string-pipeline": ("pipeline", BASE_TOML + b"description = '" + b"x" * MIB + b"'\n"),
        "flat-pipeline": ("pipeline", b"".join(flat)),
        "long-signal-manifest": ("StageManifest", json_value(manifest)),
        "many-outputs-manifest": ("StageManifest", json_value(many_outputs)),
        "big-tree": ("TreeListing", json_value({"schema_version": 1, "entries": entries})),
        "big-run-record": ("RunRecord", json_value({**VALID_RECORDS["run"][1],
                                                    "selected": ["stage"] * 140_000})),
    }


BIG = _big_inputs()


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=[pytest.mark.slow] if name == "flat-pipeline" else [])
    for name in sorted(BIG)])
def test_a_1_mib_input_stays_under_64_mib_and_takes_linear_time(name):
    """(The 1 MiB flat pipeline takes ~15 s under tracemalloc: slow tier; the fast tier has a
    128 KiB one below.)"""
    target, data = BIG[name]
    assert MIB <= len(data) < 2 * MIB
    _bounded(name, target, data, seconds=5.0)


def test_a_128_kib_pipeline_of_2000_stages_stays_under_64_mib_and_takes_linear_time():
    target, data = _big_inputs(128 << 10)["flat-pipeline"]
    _bounded("flat-pipeline-128k", target, data, seconds=2.0)


def _bounded(name: str, target: str, data: bytes, seconds: float) -> None:
    def call(traced: bool) -> None:
        if target == "pipeline":
            target_pipeline(data, traced)
        else:
            target_record(data, {t.__name__: t for t in RECORD_TYPES}[target], traced)

    gc.collect()
    gc.freeze()  # the garbage collector's cost here grows with what earlier tests left alive
    try:
        started = time.perf_counter()
        call(traced=False)  # timed untraced: tracemalloc slows pure-Python parsing tenfold
        took = time.perf_counter() - started
    finally:
        gc.unfreeze()
    call(traced=True)  # the memory bound (asserted inside)
    # tomllib is pure Python: a 1 MiB file of 16,000 small stages takes about a second to
    # parse and validate, twice over here (decode, then load); anything superlinear is far above.
    assert took < seconds, f"{name}: {took:.2f}s"


# --- atheris (slow tier, when installed) ---------------------------------------------------

ATHERIS_HARNESS = """
import sys
import atheris

sys.path.insert(0, {tests!r})
with atheris.instrument_imports():
    import stagestore.pipeline.model, stagestore.model.records, stagestore.store.manifests, stagestore.store.trees
    import test_hostile as hostile

hostile._WORKDIR = __import__("pathlib").Path.cwd()  # libFuzzer exits without Python's atexit
TYPES = {{t.__name__: t for t in hostile.RECORD_TYPES}}
TARGET = sys.argv.pop(1)


def one_input(data):
    if TARGET == "pipeline":
        hostile.target_pipeline(data, traced=False)
    else:
        hostile.target_record(data, TYPES[TARGET], traced=False)


atheris.Setup(sys.argv, one_input)
atheris.Fuzz()
"""


def _atheris_seeds(target: str, folder: Path) -> None:
    folder.mkdir()
    if target == "pipeline":
        seeds = [VALID_PIPELINE.encode(), BASE_TOML]
    else:
        seeds = [json_value(doc) for type_, doc in VALID_RECORDS.values() if type_.__name__ == target]
    for i, seed in enumerate(seeds):
        (folder / f"seed{i}").write_bytes(seed)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["pipeline", *(t.__name__ for t in RECORD_TYPES)])
def test_atheris(target, tmp_path):
    """libFuzzer through atheris: 20,000 runs per target, each under a second (`-timeout=1`)
    and the process under 2 GiB RSS; only typed errors and the known bugs may escape."""
    pytest.importorskip("atheris")
    harness = tmp_path / "harness.py"
    harness.write_text(ATHERIS_HARNESS.format(tests=str(Path(__file__).parent)))
    corpus = tmp_path / "corpus"
    _atheris_seeds(target, corpus)
    done = subprocess.run(
        [sys.executable, str(harness), target, f"-runs={SLOW}", "-timeout=1", "-rss_limit_mb=2048",
         "-max_len=16384", f"-artifact_prefix={tmp_path}/", str(corpus)],
        cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]


# --- crafted names ------------------------------------------------------------------------

CRAFTED = {
    "absolute": "/etc/passwd",
    "dotdot": "..",
    "dotdot-inside": "a/../b",
    "dotdot-last": "a/..",
    "dotdot-escape": "../escape",
    "dot": ".",
    "dot-inside": "a/./b",
    "empty": "",
    "empty-component": "a//b",
    "trailing-slash": "a/",
    "nul": "a\x00b",
    "backslash": "a\\b",
    "drive-relative": "C:foo",
    "drive-absolute": "C:\\x",
    "component-256-bytes": "x" * 256,
    "path-5000-bytes": "/".join(["y" * 200] * 25),
    "surrogate": "\udcff",
}
assert len(CRAFTED["path-5000-bytes"].encode()) > 4096

def _crafted(marks_for: dict[str, Any] | None = None) -> list:
    marks_for = marks_for or {}
    return [pytest.param(value, id=key, marks=marks_for.get(key, [])) for key, value in CRAFTED.items()]


@pytest.mark.parametrize("name", _crafted())
@pytest.mark.parametrize("role", ["stage", "output", "input", "upstream"])
def test_a_crafted_name_in_a_pipeline_definition_is_refused(name, role):
    """Through `validate_pipeline` directly: every crafted name, the surrogate included."""
    stages = {"ok": StageSpec(cmd="true", outputs=["o"])}
    if role == "stage":
        stages[name] = StageSpec(cmd="true")
    elif role == "output":
        stages["s"] = StageSpec(cmd="true", outputs=[name])
    elif role == "input":
        stages["s"] = StageSpec(cmd="true", inputs={name: "data.txt"})
    else:
        stages["s"] = StageSpec(cmd="true", upstream=[name])
    definition = PipelineDef(pipeline=PipelineMeta(name="p"), stages=stages)
    with pytest.raises(PipelineError):
        validate_pipeline(Pipeline(definition, Path("/nonexistent/x.toml"), Path("/nonexistent")),
                          check_inputs=False)


@pytest.mark.parametrize("name", _crafted())
@pytest.mark.parametrize("role", ["stage", "output"])
def test_a_crafted_name_in_a_pipeline_file_is_refused(name, role, tmp_path):
    """Through a real file, every name written as a TOML escape (the surrogate's `\\udcff` is
    refused as invalid TOML; a raw invalid UTF-8 byte is the xfail below)."""
    key = json.dumps(name).encode()  # ASCII: \\uXXXX escapes, which TOML shares with JSON
    if role == "stage":
        text = b"[pipeline]\nname = 'p'\n[stages." + key + b"]\ncmd = 'true'\n"
    else:
        text = b"[pipeline]\nname = 'p'\n[stages.s]\ncmd = 'true'\noutputs = [" + key + b"]\n"
    (tmp_path / "stagestore.toml").write_bytes(text)
    with pytest.raises(PipelineError):
        load_pipeline(tmp_path / "stagestore.toml")


def test_a_stage_name_with_a_raw_invalid_utf8_byte_is_refused(tmp_path):
    (tmp_path / "stagestore.toml").write_bytes(b"[pipeline]\nname = 'p'\n[stages.\"a\xff\"]\ncmd = 'true'\n")
    with pytest.raises(PipelineError):
        load_pipeline(tmp_path / "stagestore.toml")


def _tree_bytes(path: str) -> bytes:
    """A one-file tree naming `path`, written by hand (a surrogate cannot be encoded)."""
    escaped = json.dumps(path)  # ASCII-only: a surrogate becomes the JSON escape \\udcff
    return (b'{"entries":[{"executable":false,"hash":"' + EMPTY_DIGEST.encode() +
            b'","kind":"file","path":' + escaped.encode() + b',"size":0}],"schema_version":1}')


@pytest.mark.parametrize("name", _crafted())
def test_a_crafted_path_in_a_tree_object_is_refused(name, tmp_path):
    store = Store.create(tmp_path / "store")
    store.objects.put_bytes(b"", "test")
    digest = store.objects.put_bytes(_tree_bytes(name), "test")
    with pytest.raises(CorruptRecordError):
        read_tree(store.objects, digest)
    with pytest.raises(StagestoreError):
        check_tree(TreeListing(entries=[TreeEntry(path=name, kind="file", hash=EMPTY_DIGEST)]), "t")


def _rewrite_manifest(store: Store, run_id: str, stage: str, mutate) -> None:  # noqa: ANN001
    path = store.layout.manifest_path(run_id, stage)
    raw = json.loads(path.read_bytes())
    mutate(raw)
    os.chmod(path, 0o644)
    path.write_bytes(json.dumps(raw).encode())


def _outside_dest(root: Path, dest: Path) -> dict:
    return {k: v for k, v in snapshot_tree(root).items()
            if not (root / k).is_relative_to(dest) and "/locks/" not in f"/{k}/"}


@pytest.mark.parametrize("name", _crafted())
def test_checkout_refuses_a_tree_naming_a_crafted_path_and_writes_nothing_outside(
        linear_run, tmp_path, name):
    ws, store = linear_run
    store.objects.put_bytes(b"", "test")
    tree = store.objects.put_bytes(_tree_bytes(name), "test")
    refs = {"out": ArtifactRef(hash=tree, size=0, kind="tree")}

    def mutate(raw):  # noqa: ANN001
        raw["outputs"] = {"out": {"hash": tree, "size": 0, "kind": "tree"}}
        raw["output_hash"] = output_hash(refs)

    _rewrite_manifest(store, "a", "make", mutate)
    dest = tmp_path / "deep" / "er" / "dest"
    dest.parent.mkdir(parents=True)  # checkout creates DEST's parents (mkdir -p) before it reads
    before = _outside_dest(tmp_path, dest)
    with pytest.raises(StagestoreError):
        checkout(store, "a", "make", dest)
    assert _outside_dest(tmp_path, dest) == before
    assert not (dest / "out").exists() and not (tmp_path / "escape").exists()
    assert not any(dest.iterdir()) if dest.exists() else True


@pytest.mark.parametrize("name", _crafted())
@pytest.mark.parametrize("field", ["outputs", "upstream", "inputs"])
def test_a_crafted_key_in_a_manifest_is_refused_by_read_verify_and_checkout(
        linear_run, tmp_path, name, field):
    ws, store = linear_run

    def mutate(raw):  # noqa: ANN001
        if field == "outputs":
            raw["outputs"] = {name: raw["outputs"]["n"]}
            try:  # so that only the name is wrong
                raw["output_hash"] = output_hash({name: ArtifactRef(**raw["outputs"][name])})
            except UnicodeEncodeError:  # canonical JSON cannot hold a surrogate
                pass
        elif field == "upstream":
            raw["upstream"] = {name: raw["upstream"]["make"]}
        else:
            raw["inputs"] = {f"upstream.{name}.out": raw["inputs"]["upstream.make.out"]}

    _rewrite_manifest(store, "a", "count", mutate)
    with pytest.raises(CorruptRecordError, match="invalid|neither inputs|surrogate"):
        store.manifests.read("a", "count")
    report = verify(store)
    assert [(f.kind, f.stage) for f in report.problems] == [("manifest_invalid", "count")]
    dest = tmp_path / "dest"
    before = _outside_dest(tmp_path, dest)
    with pytest.raises(StagestoreError):
        checkout(store, "a", "count", dest)
    assert _outside_dest(tmp_path, dest) == before
    assert not dest.exists() or not any(dest.iterdir())


def test_names_equal_after_case_or_unicode_folding_are_kept_distinct(linear_run, tmp_path):
    """Observed behaviour, pinned: a tree may hold `A.txt` and `a.txt`, and `é` as NFC (U+00E9)
    and NFD (e + U+0301): they are distinct strings and distinct names on Linux, so check_tree
    accepts them and checkout writes each to its own file, none overwriting another."""
    ws, store = linear_run
    nfc, nfd = unicodedata.normalize("NFC", "\u00e9"), unicodedata.normalize("NFD", "\u00e9")
    assert nfc != nfd and unicodedata.normalize("NFC", nfd) == nfc
    names = sorted(["A.txt", "a.txt", nfc, nfd, f"d{nfc}", f"d{nfd}"])
    entries = []
    for name in names:
        digest = store.objects.put_bytes(name.encode(), "test")
        entries.append(TreeEntry(path=name, kind="file", size=len(name.encode()), hash=digest))
    tree = store.objects.put_bytes(canonical_json(TreeListing(entries=entries)), "test")
    assert [e.path for e in read_tree(store.objects, tree).entries] == names
    refs = {"out": ArtifactRef(hash=tree, size=0, kind="tree")}

    def mutate(raw):  # noqa: ANN001
        raw["outputs"] = {"out": {"hash": tree, "size": 0, "kind": "tree"}}
        raw["output_hash"] = output_hash(refs)

    _rewrite_manifest(store, "a", "make", mutate)
    checkout(store, "a", "make", tmp_path / "dest")
    written = sorted(os.listdir(tmp_path / "dest" / "out"))
    assert written == names
    for name in names:
        assert (tmp_path / "dest" / "out" / name).read_bytes() == name.encode()


# --- hostile outputs ----------------------------------------------------------------------

HOSTILE = """
[pipeline]
name = "hostile"

[stages.s]
cmd = {cmd}
shell = true
inputs = {{ x = "data.txt" }}
outputs = ["o"]
"""


@contextmanager
def _deadline(seconds: float):  # noqa: ANN202
    """Fail with TimeoutError instead of hanging (a FIFO opened for reading would block)."""
    def expired(signum, frame):  # noqa: ANN001
        raise TimeoutError(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _hostile_stage(ws, cmd: str, **paths: Path):  # noqa: ANN001, ANN202
    """Run one shell stage `cmd` (KEY replaced by `paths[KEY]`) with a 30 s bound."""
    for key, path in paths.items():
        cmd = cmd.replace(key, str(path))
    ws.write("data.txt", "input\n")
    ws.pipeline(HOSTILE.format(cmd=_toml_str(cmd)))
    store = ws.open_store()
    with _deadline(30):
        report = run(ws.load(), store, run_id="a")
    return report, store


@pytest.fixture
def sentinel(tmp_path):  # noqa: ANN201
    root = make_sentinel(tmp_path)
    hop = tmp_path / "hop"  # a link outside the sentinel: the first of a chain of two
    hop.symlink_to(root / "note.txt")
    return root, snapshot_tree(root), hop


SYMLINKS = {
    "absolute": "ln -s SENT/note.txt {outputs.o}",
    "dotdot-to-outside": 'ln -s "$(realpath --relative-to="$STAGESTORE_OUT" SENT/note.txt)" {outputs.o}',
    "dotdot": "echo x > $STAGESTORE_OUT/../x && ln -s ../x {outputs.o}",
    "chain-of-two": "ln -s HOP {outputs.o}",
    "to-a-folder": "ln -s SENT/sub {outputs.o}",
    "to-a-read-only-file": "ln -s SENT/sub/ro.txt {outputs.o}",
    "dangling": "ln -s /nonexistent/x {outputs.o}",
}


@pytest.mark.parametrize("how", sorted(SYMLINKS))
def test_an_output_that_is_a_symlink_is_refused_and_nothing_outside_changes(ws, sentinel, how):
    root, before, hop = sentinel
    report, store = _hostile_stage(ws, SYMLINKS[how], SENT=root, HOP=hop)
    assert not report.ok
    failure = report.stages[0].failure
    assert failure.class_ == "OutputInvalidFailure" and "symlink" in failure.signal
    check_sentinel(before, root)
    assert os.readlink(hop) == str(root / "note.txt")
    check_store(store)


@pytest.mark.parametrize("how", sorted(set(SYMLINKS) - {"dotdot"}))
def test_a_folder_output_holding_a_symlink_is_refused_and_nothing_outside_changes(ws, sentinel, how):
    root, before, hop = sentinel
    cmd = "mkdir -p {outputs.o}/sub && echo ok > {outputs.o}/sub/f && " + SYMLINKS[how].replace(
        "{outputs.o}", "{outputs.o}/sub/link").replace('"$STAGESTORE_OUT"', '"$STAGESTORE_OUT/o/sub"')
    report, store = _hostile_stage(ws, cmd, SENT=root, HOP=hop)
    assert not report.ok
    failure = report.stages[0].failure
    assert failure.class_ == "OutputInvalidFailure" and "symlink" in failure.signal
    check_sentinel(before, root)
    check_store(store)


def _identity(path: Path) -> tuple:
    st = os.lstat(path)
    return stat.S_IMODE(st.st_mode), st.st_ino, st.st_nlink, st.st_uid, path.read_bytes()


@pytest.mark.parametrize("shape", ["file", "file-in-folder"])
def test_an_output_hard_linked_to_a_file_outside_is_copied_and_the_file_left_alone(ws, tmp_path, shape):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious\n")
    os.chmod(outside, 0o640)
    before = _identity(outside)
    cmd = ("ln OUT {outputs.o}" if shape == "file" else
           "mkdir {outputs.o} && ln OUT {outputs.o}/linked && echo own > {outputs.o}/own")
    report, store = _hostile_stage(ws, cmd, OUT=outside)
    assert report.ok, report.stages[0].failure
    assert _identity(outside) == before  # mode, inode, one link again, owner, content
    ref = store.manifests.read("a", "s").outputs["o"]
    digest = ref.hash if shape == "file" else next(
        e.hash for e in read_tree(store.objects, ref.hash).entries if e.path == "linked")
    obj = os.lstat(store.objects.path(digest))
    assert obj.st_nlink == 1 and obj.st_ino != before[1] and stat.S_IMODE(obj.st_mode) == 0o444
    assert store.objects.path(digest).read_bytes() == b"precious\n"
    check_store(store)


def test_an_output_hard_linked_to_its_own_input_view_is_copied(ws):
    """The view of an input is a hard link to an object: linking it out as the output must
    neither move the object nor leave it with a second link."""
    report, store = _hostile_stage(ws, "ln {inputs.x} {outputs.o}")
    assert report.ok, report.stages[0].failure
    manifest = store.manifests.read("a", "s")
    assert manifest.outputs["o"].hash == manifest.inputs["inputs.x"].hash
    check_store(store)


def _special_outputs(tmp_path: Path) -> dict[str, str]:
    py = sys.executable
    found = {
        "fifo": "mkfifo {outputs.o}",
        # bound by a relative name: an absolute one would pass AF_UNIX's 108-byte limit
        "socket": f"cd $STAGESTORE_OUT && {py} -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"o\")'",
        "fifo-in-folder": "mkdir {outputs.o} && echo a > {outputs.o}/a && mkfifo {outputs.o}/pipe",
    }
    try:  # a character device needs CAP_MKNOD, which a container may not grant
        os.mknod(tmp_path / "probe", stat.S_IFCHR | 0o600, os.makedev(1, 5))
    except OSError:
        pass
    else:
        # /dev/zero: a runner that read it would never finish hashing
        found["char-device"] = "mknod {outputs.o} c 1 5"
        found["char-device-in-folder"] = "mkdir {outputs.o} && mknod {outputs.o}/zero c 1 5"
    return found


@pytest.mark.parametrize("kind", ["fifo", "socket", "fifo-in-folder", "char-device",
                                  "char-device-in-folder"])
def test_a_fifo_socket_or_device_output_is_refused_without_hanging(ws, tmp_path, kind):
    cmds = _special_outputs(tmp_path)
    if kind not in cmds:
        pytest.skip("mknod is not permitted here")
    started = time.monotonic()
    report, store = _hostile_stage(ws, cmds[kind])
    assert time.monotonic() - started < 20
    assert not report.ok
    failure = report.stages[0].failure
    assert failure.class_ == "OutputInvalidFailure", failure
    check_store(store)


def test_a_folder_output_holding_a_name_that_is_not_utf8_is_refused(ws):
    cmd = f"mkdir {{outputs.o}} && {sys.executable} -c \"import os, sys; open(os.path.join(os.fsencode(sys.argv[1]), b'bad\\\\xff'), 'w')\" {{outputs.o}}"
    report, store = _hostile_stage(ws, cmd)
    assert not report.ok
    failure = report.stages[0].failure
    assert failure.class_ == "OutputInvalidFailure" and "UTF-8" in failure.signal
    check_store(store)


# --- an object replaced by another file of the right name ----------------------------------


@pytest.mark.parametrize("size", ["same-size", "other-size"])
def test_an_object_replaced_by_another_file_is_named_by_verify_and_redone_by_recover(
        linear_run, tmp_path, size):
    ws, store = linear_run
    digest = store.manifests.read("a", "count").outputs["n"].hash
    path = store.objects.path(digest)
    original = path.read_bytes()
    impostor = tmp_path / "impostor"
    impostor.write_bytes(bytes([original[0] ^ 1]) + original[1:] if size == "same-size"
                         else b"not the count at all\n")
    os.chmod(impostor, 0o444)
    os.replace(impostor, path)  # a different inode under the object's name, mode 0444 kept
    report = verify(store)
    assert [(f.kind, f.object) for f in report.problems] == [("object_corrupt", digest)]
    assert "run a stage count" in report.problems[0].message
    fixed = recover(store)
    assert fixed.ok, fixed.unresolved
    assert {a.action for a in fixed.actions} >= {"remove_object"}
    assert path.read_bytes() == original
    check_store(store)


# --- a read-only store --------------------------------------------------------------------


def test_a_read_only_store_fails_a_run_with_one_clear_error(linear_run, capsys):
    """Root ignores modes, so the store is made read-only at the seam: every durable
    operation fails with EROFS.  The library raises that OSError; the CLI prints one `error:`
    line and a hint, no traceback; the store is unchanged, and usable again afterwards."""
    from stagestore.cli import main

    ws, store = linear_run
    (ws.root / "data" / "f9.txt").write_text("new\n")  # so the run has something to store
    before = _outside_dest(store.root, store.layout.locks)

    def read_only(op: str, path: str) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    previous = durable.set_fault_hook(read_only)
    try:
        with pytest.raises(OSError) as err:
            run(ws.load(), store, run_id="b")
        capsys.readouterr()
        code = main(["-q", "run", "-p", str(ws.pipeline_file), "--run-id", "c"])
        captured = capsys.readouterr()
    finally:
        durable.set_fault_hook(previous)
    assert err.value.errno == errno.EROFS
    assert code == 1, captured.err
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err
    assert lines[0].startswith("error: Read-only file system"), captured.err
    assert [line for line in lines if line.startswith("error:")] == lines[:1]
    assert all(line.startswith(("error:", "hint:")) for line in lines), captured.err
    assert _outside_dest(store.root, store.layout.locks) == before
    assert recover(store).ok
    check_store(store)


# --- a stage writing into an input it was handed (as root) ---------------------------------

TAMPER = """
import os, sys
path, out = sys.argv[1], sys.argv[2]
before = os.stat(path)
with open(path, "r+b") as f:  # root: mode 0444 does not stop this
    first = f.read(1)
    f.seek(0)
    f.write(bytes([first[0] ^ 1]))  # same size
os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # `touch -d`: mtime put back
after = os.stat(path)
same = (after.st_size, after.st_mtime_ns, after.st_mode) == (before.st_size, before.st_mtime_ns, before.st_mode)
open(os.environ["EVIDENCE"], "w").write(f"{same} {after.st_ctime_ns != before.st_ctime_ns}")
open(out, "w").write("done")
"""

TAMPER_PIPELINES = {
    "file-input": ("{inputs.x}", ""),
    "upstream-file": ("{upstream.up.o}", "up"),
    "file-in-upstream-folder": ("{upstream.up.d}/f", "up"),
}


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can write through a 0444 object")
@pytest.mark.parametrize("where", sorted(TAMPER_PIPELINES))
def test_a_stage_that_writes_into_a_handed_in_object_and_restores_its_mtime_fails(ws, tmp_path, where):
    """Same size, mtime put back with ns precision, same mode: only ctime and the bytes
    change.  The stage must fail with InputModifiedFailure and verify must name the damaged
    object; once the stage behaves, recover repairs the store."""
    target, up = TAMPER_PIPELINES[where]
    evidence = tmp_path / "evidence"
    ws.write("data.txt", "handed in\n")
    ws.write("tamper.py", TAMPER)
    upstream = textwrap.dedent("""
        [stages.up]
        cmd = "echo upstream > {outputs.o} && mkdir {outputs.d} && echo in-folder > {outputs.d}/f"
        shell = true
        outputs = ["o", "d"]
    """) if up else ""
    ws.pipeline(textwrap.dedent(f"""
        [pipeline]
        name = "tamper"
        {upstream}
        [stages.b]
        cmd = ["{sys.executable}", "tamper.py", "{target}", "{{outputs.o}}"]
        inputs = {{ x = "data.txt" }}
        upstream = [{'"up"' if up else ""}]
        outputs = ["o"]
        env = {{ EVIDENCE = "{evidence}" }}
    """))
    store = ws.open_store()
    report = run(ws.load(), store, run_id="a")
    assert evidence.read_text() == "True True"  # the premise: size, mtime, mode unchanged
    stage = report.stages[-1]
    assert stage.stage == "b" and stage.failure is not None
    assert stage.failure.class_ == "InputModifiedFailure", stage.failure
    if where == "file-input":
        damaged = store.manifests.read_run("a").inputs["b"]["x"].hash
    elif where == "upstream-file":
        damaged = store.manifests.read("a", "up").outputs["o"].hash
    else:
        tree = store.manifests.read("a", "up").outputs["d"].hash
        damaged = read_tree(store.objects, tree).entries[0].hash
    problems = verify(store).problems
    assert ("object_corrupt", damaged) in {(f.kind, f.object) for f in problems}, problems
    ws.write("tamper.py", "import sys\nopen(sys.argv[2], 'w').write('done')\n")
    fixed = recover(store)
    assert fixed.ok, fixed.unresolved
    check_store(store)
