"""`check` and `plan`: what a run would meet and cost, without running anything.

`check` validates a pipeline as a run would (the file, the inputs, the keys of encrypt and decrypt
stages) and lists the compatibility warnings of its built-in kinds.  `plan` says per stage
whether it would run, be reused or pass its input through, and estimates what running it takes:
memory, CPU cores, disk and duration, from the input sizes and from what earlier manifests of
the same stage measured, or stated defaults when there are none (docs/kinds.md, "Planning").
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from ..errors import PipelineError, StagestoreError
from ..model.records import StageManifest, StageSpec
from ..model.reports import CheckReport, CompatProblem, PlanReport, StagePlan
from ..pipeline.kindspec import compatibility, source, stage_config_hash
from ..pipeline.model import Pipeline, stage_input_paths
from ..store.store import Store

MiB = 1 << 20
BASE_MEMORY = 24 * MiB
"""What a built-in kind's process takes before its data: the interpreter and its imports
(measured: 20 to 24 MiB peak for a small input, whatever the kind)."""

BUFFER_FACTOR = {"checksum": 1, "compress": 3, "decompress": 3, "encrypt": 2, "decrypt": 2,
                 "transform": 2, "passthrough": 0}
"""Chunks in memory per worker: the one being read, and for a kind that writes what it made,
the output (and a compressor's own window)."""

DEFAULT_THROUGHPUT = {"checksum": 800e6, "compress": 150e6, "decompress": 400e6,
                      "encrypt": 600e6, "decrypt": 600e6, "transform": 100e6}
"""Bytes per second of one worker when a stage has no history: the defaults `plan` states."""

DEFAULT_RATIO = {"checksum": 0.0, "compress": 0.5, "decompress": 2.0, "encrypt": 1.0,
                 "decrypt": 1.0, "transform": 1.0}
"""Output bytes per input byte when a stage has no history."""

SUMS_LINE = 100  # bytes of one line of a sums file: a checksum's output with no history

HISTORY = 20  # most recent runs read for a stage's history

# Library words; the CLI names its flag instead (`stagestore.cli.cli_hint`).
STRICT_HINT = "fix them, or run without strict"


def compatibility_warnings(pipeline: Pipeline, *, strict: bool = False) -> list[CompatProblem]:
    """The compatibility warnings of the pipeline's built-in kinds (compressing encrypted
    data, compressing or encrypting twice; docs/kinds.md).  With `strict`, any warning is a
    `PipelineError`, which is how a strict run refuses to start."""
    found = compatibility(pipeline.stages)
    if found and strict:
        count = f"{len(found)} compatibility warning" + ("s" if len(found) != 1 else "")
        raise PipelineError(f"{pipeline.display}: {count}, refused when strict",
                            hint=STRICT_HINT)
    return found


def check(pipeline: Pipeline) -> CheckReport:
    """Problems a run would stop at before any stage starts, and the compatibility warnings.
    The pipeline is already validated (`load_pipeline`); this adds what needs the environment:
    the keys of enabled encrypt and decrypt stages."""
    errors = []
    for name, spec in pipeline.stages.items():
        if spec.kind in ("encrypt", "decrypt") and spec.enabled:
            try:
                stage_config_hash(name, spec, pipeline.workdir)
            except StagestoreError as exc:
                errors.append(f"stage {name!r}: {exc.message}")
    return CheckReport(pipeline=pipeline.name, stages=len(pipeline.stages), errors=errors,
                       warnings=compatibility(pipeline.stages))


def plan(pipeline: Pipeline, store: Store | None) -> PlanReport:
    """Per stage in run order: its action and, for one that would run, its estimates."""
    from .status import status

    rows = {row.stage: row for row in status(pipeline, store).stages}
    sizes: dict[str, dict[str, int]] = {}  # stage -> output -> known or estimated bytes
    plans = []
    for name in pipeline.order():
        spec = pipeline.stages[name]
        row = rows[name]
        bytes_in = _input_bytes(pipeline, spec, sizes)
        history = _history(store, name) if store is not None else []
        if not spec.enabled or spec.kind == "passthrough":
            sizes[name] = {spec.outputs[0]: bytes_in} if spec.kind is not None else {}
            action = "disabled" if not spec.enabled else "passthrough"
            reason = ("passes its input through" if spec.kind is not None else
                      "does not run; the stages downstream of it are skipped")
            if not spec.enabled:
                reason = f"disabled (enabled = false): {reason}"
            plans.append(StagePlan(stage=name, action=action, reason=reason,
                                   input_bytes=bytes_in, output_bytes=sum(sizes[name].values())))
            continue
        if not row.would_execute:
            sizes[name] = _reused_sizes(store, name, row.cached_from)
            plans.append(StagePlan(stage=name, action="reuse", reason=row.reason,
                                   input_bytes=bytes_in, output_bytes=sum(sizes[name].values())))
            continue
        plans.append(_estimate(name, spec, row.reason, bytes_in, history))
        sizes[name] = _split(spec, plans[-1].output_bytes, history)
    return PlanReport(pipeline=pipeline.name, stages=plans)


def _estimate(name: str, spec: StageSpec, reason: str, bytes_in: int,
              history: list[StageManifest]) -> StagePlan:
    workers = (spec.workers or min(4, os.cpu_count() or 1)) if spec.parallel else 1
    measured = [_measure(m) for m in history]
    measured = [m for m in measured if m is not None]
    basis = f"{len(measured)} earlier run{'s' if len(measured) != 1 else ''}"
    if measured:
        rate = statistics.median(m[0] for m in measured)
        ratio = statistics.median(m[1] for m in measured)
        peaks = [m[2] for m in measured if m[2]]
    elif spec.kind is not None:
        rate = DEFAULT_THROUGHPUT[spec.kind] * workers
        ratio = DEFAULT_RATIO[spec.kind]
        peaks = []
        basis = "defaults (no earlier run)"
    else:
        return StagePlan(stage=name, action="run", reason=reason, input_bytes=bytes_in,
                         cores=1, basis="no earlier run: nothing to estimate from")
    memory = None
    if spec.kind is not None:
        from ..kinds import DEFAULT_CHUNK_SIZE, parse_chunk_size

        chunk = parse_chunk_size(spec.chunk_size if spec.chunk_size is not None
                                 else DEFAULT_CHUNK_SIZE)
        memory = BASE_MEMORY + chunk * workers * BUFFER_FACTOR[spec.kind]
    if peaks:  # what the stage itself measured beats the formula
        memory = max(peaks)
    # A sums file grows with the number of files, not their bytes: with no history, one line.
    output = int(bytes_in * ratio) or (SUMS_LINE if spec.kind == "checksum" else 0)
    return StagePlan(stage=name, action="run", reason=reason, input_bytes=bytes_in,
                     output_bytes=output, memory_bytes=memory, cores=workers,
                     disk_bytes=output, seconds=round(bytes_in / rate, 3) if rate else None,
                     basis=basis)


def _measure(manifest: StageManifest) -> tuple[float, float, int | None] | None:
    """(input bytes per second, output bytes per input byte, peak memory) of an execution."""
    res = manifest.resources
    if res is not None:
        bytes_in, bytes_out, seconds, peak = res.bytes_in, res.bytes_out, res.seconds, \
            res.peak_rss_bytes
    elif manifest.logs:
        log = manifest.logs[-1]
        bytes_in = sum(ref.size for ref in manifest.inputs.values())
        bytes_out = sum(ref.size for ref in manifest.outputs.values())
        seconds = (log.finished_at - log.started_at).total_seconds()
        peak = None
    else:
        return None
    if bytes_in <= 0 or seconds <= 0:
        return None
    return bytes_in / seconds, bytes_out / bytes_in, peak


def _history(store: Store, stage: str) -> list[StageManifest]:
    """Manifests of executions (not reuses) of `stage` in the most recent runs."""
    found = []
    for run_id in reversed(store.manifests.runs()[-HISTORY:]):
        try:
            manifest = store.manifests.read_optional(run_id, stage)
        except StagestoreError:
            continue
        if manifest is not None and manifest.status == "succeeded" and \
                manifest.cached_from is None and manifest.attempts:
            found.append(manifest)
    return found


def _reused_sizes(store: Store | None, stage: str, run_id: str | None) -> dict[str, int]:
    if store is None or run_id is None:
        return {}
    try:
        manifest = store.manifests.read_optional(run_id, stage)
    except StagestoreError:
        return {}
    return {name: ref.size for name, ref in manifest.outputs.items()} if manifest else {}


def _split(spec: StageSpec, total: int | None, history: list[StageManifest]) -> dict[str, int]:
    """An estimated total over the stage's outputs, in the shares of its latest execution."""
    if not total:
        return {}
    if len(spec.outputs) == 1:
        return {spec.outputs[0]: total}
    shares = {name: ref.size for name, ref in history[0].outputs.items()} if history else {}
    whole = sum(shares.values())
    return {name: int(total * size / whole) for name, size in shares.items()} if whole else {}


def _input_bytes(pipeline: Pipeline, spec: StageSpec, sizes: dict[str, dict[str, int]]) -> int:
    """What the stage reads: for a kind, its one source; else every input and upstream output."""
    if spec.kind is not None:
        ref = source(spec)
        if ref.kind == "upstream":
            return sizes.get(ref.stage, {}).get(ref.name, 0)
        return _path_bytes(pipeline.input_path(spec.inputs[ref.name]))
    total = sum(_path_bytes(pipeline.input_path(rel))
                for rel in stage_input_paths(spec, pipeline.workdir).values())
    return total + sum(sum(sizes.get(up, {}).values()) for up in spec.upstream)


def _path_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder; 0 for what does not exist."""
    try:
        if not path.is_dir():
            return path.stat().st_size
    except OSError:
        return 0
    total = 0
    for folder, _, files in os.walk(path):
        for file in files:
            try:
                total += os.stat(os.path.join(folder, file)).st_size
            except OSError:
                pass
    return total
