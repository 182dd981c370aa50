"""Built-in stage kinds in a pipeline: their validation, their compatibility rules, and what of
them goes into the config hash.  The streaming work itself is `stagestore.kinds`, run in a child
process by `stagestore.execution.kindstage`; docs/kinds.md specifies both.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from ..errors import PipelineError
from ..model.records import StageSpec
from ..model.reports import CompatProblem
from .syntax import Placeholder, placeholders

KEYED = frozenset({"encrypt", "decrypt"})


def source(spec: StageSpec) -> Placeholder:
    """The one placeholder of a kind stage's `input` (validated beforehand)."""
    return placeholders(spec.input or "")[0]


def validate_kind_stage(name: str, spec: StageSpec, fail: Callable[..., PipelineError]) -> None:
    """The rules a stage with `kind` follows on top of every stage's; raises `fail(...)`.
    Whether its placeholders name declared inputs and upstream outputs is checked with every
    stage's (`syntax.command_template` gives a kind stage's `input` and `expect`)."""
    from .. import kinds

    kind = spec.kind
    if spec.cmd is not None:
        raise fail(f"a `kind` stage has no `cmd` (kind {kind!r} is the command)", name, "cmd")
    if spec.shell:
        raise fail("`shell` applies to `cmd` only", name, "shell")
    if len(spec.outputs) != 1:
        raise fail(f"kind {kind!r} produces exactly one output; declare one name in `outputs`",
                   name, "outputs")
    _one_placeholder(name, spec.input, "input", fail)
    if spec.expect is not None:
        _one_placeholder(name, spec.expect, "expect", fail)
    problems = kinds.validate(
        kind, spec.algorithm, spec.params,
        chunk_size=spec.chunk_size if spec.chunk_size is not None else kinds.DEFAULT_CHUNK_SIZE,
        workers=spec.workers if spec.workers is not None else kinds.DEFAULT_WORKERS,
        call=spec.call, expect=spec.expect, key_env=spec.key_env, key_file=spec.key_file)
    if problems:
        raise fail(f"kind {kind!r}: " + "; ".join(problems), name, "kind")


def _one_placeholder(name: str, text: str | None, key: str,
                     fail: Callable[..., PipelineError]) -> None:
    if text is None:
        raise fail(f"a `kind` stage needs `{key}`: one input or upstream output, written as its "
                   "placeholder, e.g. \"{inputs.data}\" or \"{upstream.STAGE.OUTPUT}\"", name, key)
    try:
        refs = placeholders(text)
    except ValueError as exc:
        raise fail(f"`{key}`: {exc}", name, key) from None
    if len(refs) != 1 or refs[0].text != text or refs[0].kind not in ("inputs", "upstream"):
        raise fail(f"`{key}` must be exactly one placeholder of an input or an upstream output, "
                   f"e.g. \"{{inputs.data}}\" or \"{{upstream.STAGE.OUTPUT}}\"; got {text!r}",
                   name, key)


def config(spec: StageSpec, workdir: Path, environ: Mapping[str, str] = os.environ) -> dict:
    """What of a kind stage decides its output, for the config hash: the kind, its input and
    expect as written, algorithm and params with their defaults filled in (so a new default
    re-runs the stage), chunk size in bytes, and for encrypt/decrypt
    the key's id (a keyed hash of the key; never the key).  Not `parallel` or `workers`, which
    decide how fast, not what.  Raises `kinds.KindError` when the key cannot be read."""
    from .. import kinds

    opts = kinds.with_defaults(kinds.KindOptions(
        kind=spec.kind, algorithm=spec.algorithm, params=spec.params, call=spec.call,
        expect=spec.expect,
        chunk_size=kinds.parse_chunk_size(spec.chunk_size if spec.chunk_size is not None
                                          else kinds.DEFAULT_CHUNK_SIZE)))
    found = {"kind": spec.kind, "input": spec.input, "expect": spec.expect,
             "algorithm": opts.algorithm, "params": opts.params, "chunk_size": opts.chunk_size}
    if spec.kind in KEYED:
        key = kinds.load_key(spec.key_env, spec.key_file, workdir, environ)
        found["key_id"] = kinds.key_id(key)
    return found


def stage_config_hash(stage: str, spec: StageSpec, workdir: Path,
                      environ: Mapping[str, str] = os.environ) -> str:
    """`keys.config_hash` of any stage, with a kind stage's `config`; raises `kinds.KindError`
    when an enabled encrypt or decrypt stage's key cannot be read."""
    from .keys import config_hash

    if spec.kind is None:
        return config_hash(stage, spec)
    if not spec.enabled:  # its key may be unavailable; a disabled manifest is never reused
        return config_hash(stage, spec, {})
    return config_hash(stage, spec, config(spec, workdir, environ))


def compatibility(stages: Mapping[str, StageSpec]) -> list[CompatProblem]:
    """Compressing after encrypting, compressing twice and encrypting twice, along the chain
    of kind stages each kind stage's input comes through.  Passthrough and disabled stages pass
    their input on unchanged; decompress and decrypt undo the layer below them; checksum and
    transform make new data, so a chain starts again after them."""
    warnings = []
    for name, spec in stages.items():
        if spec.kind not in ("compress", "encrypt") or not spec.enabled:
            continue
        layers = _layers(stages, spec, set())
        encrypted = [stage for stage, layer in layers if layer == "encrypt"]
        if spec.kind == "compress" and layers and layers[-1][1] == "compress":
            warnings.append(CompatProblem(stage=name, stages=[layers[-1][0], name], message=(
                f"stage {name!r} compresses the output of {layers[-1][0]!r}, which is already "
                "compressed: the second pass costs time and saves nothing")))
        elif spec.kind == "compress" and encrypted:
            warnings.append(CompatProblem(stage=name, stages=[encrypted[-1], name], message=(
                f"stage {name!r} compresses the output of {encrypted[-1]!r}, which is "
                "encrypted: encrypted data does not compress; compress before encrypting")))
        elif spec.kind == "encrypt" and encrypted:
            warnings.append(CompatProblem(stage=name, stages=[encrypted[-1], name], message=(
                f"stage {name!r} encrypts the output of {encrypted[-1]!r}, which is already "
                "encrypted: one layer is enough")))
    return warnings


def _layers(stages: Mapping[str, StageSpec], spec: StageSpec,
            seen: set[str]) -> list[tuple[str, str]]:
    """The (stage, kind) layers of compression and encryption on a kind stage's input."""
    ref = source(spec)
    if ref.kind != "upstream" or ref.stage in seen or ref.stage not in stages:
        return []
    seen.add(ref.stage)
    up = stages[ref.stage]
    if up.kind is None:
        return []
    below = _layers(stages, up, seen)
    if not up.enabled or up.kind == "passthrough":
        return below
    if up.kind in ("compress", "encrypt"):
        return [*below, (ref.stage, up.kind)]
    undoes = {"decompress": "compress", "decrypt": "encrypt"}.get(up.kind)
    if undoes and below and below[-1][1] == undoes:
        return below[:-1]
    return []  # checksum, transform, or an undo of nothing: new data
