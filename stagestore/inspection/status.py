"""Read-only views of a store and a pipeline: runs, show, logs, status, contracts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import StagestoreError
from ..model.records import ArtifactRef, RunRecord, StageManifest
from ..model.reports import (AttemptOutput, ContractsReport, RunDetail, RunsReport, RunSummary,
                             StageContract, StageRow, StageStatus, StatusReport)
from ..store.layout import run_owner
from ..store.locking import owner_is_live
from ..store.store import Store

# Library words; the CLI names its flag instead (`stagestore.cli.cli_hint`).
ITEM_HINT = "in an item run, a stage that runs per item is stored per item: name the item"

if TYPE_CHECKING:
    from ..pipeline.model import Pipeline

# `runs`, `show` and `logs` read records only; the pipeline model, the cache keys and hashing
# are imported by the functions that need them, so those commands start as fast as `--help`.


def _iso(value) -> str | None:  # noqa: ANN001
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def _state(store: Store, record: RunRecord) -> str:
    if owner_is_live(store.layout, run_owner(record.run_id)):
        return "running"
    if record.finished_at is None:
        return "incomplete"
    if record.status is not None:  # written by every run since run records version 2
        return {"succeeded": "complete"}.get(record.status, record.status)
    if any(outcome in ("failed", "skipped") for outcome in record.outcomes.values()):
        return "failed"
    if record.items and _items_failed(store, record):
        return "failed"
    return "complete"


def _items_failed(store: Store, record: RunRecord) -> bool:
    for item in record.items:
        try:
            item_record = store.manifests.read_item_optional(record.run_id, item)
        except StagestoreError:
            return True
        if item_record is not None and item_record.status == "failed":
            return True
    return False


def list_runs(store: Store) -> RunsReport:
    """The runs in the store, oldest first, each with its state and stage counts."""
    runs = []
    for run_id in store.manifests.runs():
        try:
            record = store.manifests.read_run(run_id)
        except StagestoreError:
            runs.append(RunSummary(run_id=run_id, pipeline="?", started_at=None, finished_at=None,
                                   state="unknown", stages={}))
            continue
        stages = dict(record.outcomes) if record.finished_at else {
            s: _manifest_status(store, run_id, s) for s in record.selected}
        runs.append(RunSummary(run_id=run_id, pipeline=record.pipeline.name,
                               started_at=_iso(record.started_at), finished_at=_iso(record.finished_at),
                               state=_state(store, record), stages=stages))  # type: ignore[arg-type]
    runs.sort(key=lambda r: (r.started_at or "", r.run_id))
    return RunsReport(runs=runs)


def _manifest_status(store: Store, run_id: str, stage: str) -> str:
    try:
        manifest = store.manifests.read_optional(run_id, stage)
    except StagestoreError:
        return "invalid"
    if manifest is None:
        return "pending"
    return "cached" if manifest.cached_from else manifest.status


def show_run(store: Store, run_id: str) -> RunDetail:
    """A run's stages (and items) with their outcomes.  Raises `RunNotFoundError` for an
    unknown run."""
    from ..pipeline.model import item_stages

    record = store.manifests.read_run(run_id)
    rows = []
    per_item = item_stages(record.definition.stages)
    for stage in record.selected:
        if stage in per_item:
            rows.append(StageRow(stage=stage, status="per item"))
            continue
        try:
            manifest = store.manifests.read_optional(run_id, stage)
        except StagestoreError:
            rows.append(StageRow(stage=stage, status="invalid"))
            continue
        if manifest is None:
            rows.append(StageRow(stage=stage, status=record.outcomes.get(stage, "pending")))
            continue
        rows.append(StageRow(stage=stage, status="cached" if manifest.cached_from else manifest.status,
                             cached_from=manifest.cached_from, attempts=manifest.attempts,
                             output_hash=manifest.output_hash, outputs=dict(manifest.outputs),
                             failure=manifest.failure))
    items: dict[str, int] = {}
    for item in record.items:
        try:
            item_record = store.manifests.read_item_optional(run_id, item)
            status = "not_processed" if item_record is None or item_record.status == "running" \
                else item_record.status
        except StagestoreError:
            status = "invalid"
        items[status] = items.get(status, 0) + 1
    return RunDetail(run_id=run_id, pipeline=record.pipeline.name, pipeline_file=record.pipeline_file,
                     started_at=_iso(record.started_at), finished_at=_iso(record.finished_at),
                     state=_state(store, record), stages=rows, items=items)


def show_stage(store: Store, run_id: str, stage: str, item: str | None = None) -> StageManifest:
    """The manifest of a run's stage (in an item run, of `item`'s stage for a stage that runs
    per item).  Raises `RunNotFoundError` or `StageNotFoundError`."""
    from ..errors import StageNotFoundError, UsageError
    from ..store.layout import item_dirname

    if item is not None:
        try:
            item_dirname(item)
        except StagestoreError as exc:
            raise UsageError(str(exc)) from None
    manifest = store.manifests.read_optional(run_id, stage, item)
    if manifest is None:
        if not store.manifests.has_run(run_id):
            store.manifests.read_run(run_id)
        if item is not None and item not in store.manifests.items(run_id):
            raise StageNotFoundError(f"run {run_id} has no item {item!r}",
                                     hint=f"`stagestore report {run_id}` lists failed items")
        where = f"run {run_id}" + (f" item {item!r}" if item is not None else "")
        known = store.manifests.stages(run_id, item)
        hint = None
        if item is None and store.manifests.items(run_id):
            hint = ITEM_HINT
        raise StageNotFoundError(f"{where} has no manifest for stage {stage!r}; stages: "
                                 + (", ".join(known) or "none"), hint=hint)
    return manifest


def stage_logs(store: Store, run_id: str, stage: str, item: str | None = None) -> list[AttemptOutput]:
    """The stored stdout and stderr of each attempt of a stage, as `show_stage` finds it."""
    manifest = show_stage(store, run_id, stage, item)
    out = []
    for log in manifest.logs:
        out.append(AttemptOutput(
            attempt=log.attempt, exit_code=log.exit_code,
            stdout=store.objects.read_bytes(log.stdout).decode("utf-8", "replace"),
            stderr=store.objects.read_bytes(log.stderr).decode("utf-8", "replace")))
    return out


def _latest_manifest(store: Store, stage: str) -> StageManifest | None:
    best = None
    for run_id in store.manifests.runs():
        try:
            manifest = store.manifests.read_optional(run_id, stage)
        except StagestoreError:
            continue
        if manifest is not None and manifest.status == "succeeded" and (
                best is None or manifest.finished_at > best.finished_at):
            best = manifest
    return best


def status(pipeline: Pipeline, store: Store | None) -> StatusReport:
    """Which stages a run would execute now, and why; stores nothing."""
    from ..pipeline.keys import input_hash, input_key
    from ..pipeline.model import stage_input_paths
    from ..pipeline.kindspec import source, stage_config_hash
    from ..store.trees import artifact_present, hash_artifact

    outputs_of: dict[str, dict[str, ArtifactRef]] = {}  # stages that would not execute
    rows: list[StageStatus] = []
    hashed: dict[str, ArtifactRef] = {}
    per_item = pipeline.item_stages()
    for stage in pipeline.order():
        spec = pipeline.stages[stage]
        if stage in per_item:
            # Its key holds the item id and the item's own inputs (`data/{item}.txt`): without
            # a list of items there is nothing to look up, so say so rather than guess.
            rows.append(StageStatus(stage=stage, would_execute=True, reason=(
                "runs once per item: status does not look at items; a run with items reuses "
                "each item whose inputs and upstream results are unchanged")))
            continue
        if not spec.enabled and spec.kind is None:
            rows.append(StageStatus(stage=stage, would_execute=False,
                                    reason="disabled (enabled = false)"))
            continue
        pending = [u for u in spec.upstream if u not in outputs_of]
        if pending:
            why = (f"upstream stage {pending[0]} is disabled" if pipeline.stages[pending[0]].kind
                   is None and not pipeline.stages[pending[0]].enabled else
                   f"upstream stage {pending[0]} would execute")
            rows.append(StageStatus(stage=stage, would_execute=True, reason=why))
            continue
        flat: dict[str, ArtifactRef] = {}
        for name, rel in stage_input_paths(spec, pipeline.workdir).items():
            if rel not in hashed:
                # The stat cache is read (an unchanged folder is not hashed again), not written.
                hashed[rel] = hash_artifact(pipeline.input_path(rel), f"input {name!r}",
                                            store.objects.stat_cache if store is not None else None)
            flat[input_key("inputs", name)] = hashed[rel]
        for up in spec.upstream:
            for name, ref in outputs_of[up].items():
                flat[input_key("upstream", name, up)] = ref
        if spec.kind == "passthrough" or not spec.enabled:
            ref = source(spec)
            outputs_of[stage] = {spec.outputs[0]: flat[input_key(
                ref.kind, ref.name, ref.stage if ref.kind == "upstream" else None)]}
            rows.append(StageStatus(stage=stage, would_execute=False, reason=(
                "passes its input through" if spec.enabled else
                "disabled (enabled = false): passes its input through")))
            continue
        try:
            keys = (input_hash(flat), stage_config_hash(stage, spec, pipeline.workdir))
        except StagestoreError as exc:  # an encrypt or decrypt stage's key cannot be read
            rows.append(StageStatus(stage=stage, would_execute=True, reason=exc.message))
            continue
        hit = store.cache.lookup(*keys) if store is not None else None
        if hit is not None and all(artifact_present(store.objects, r)  # type: ignore[union-attr]
                                   for r in hit.outputs.values()):
            outputs_of[stage] = dict(hit.outputs)
            rows.append(StageStatus(stage=stage, would_execute=False, reason="up to date",
                                    cached_from=hit.cached_from or hit.run_id))
            continue
        rows.append(StageStatus(stage=stage, would_execute=True,
                                reason=_why(store, stage, keys, flat)))
    return StatusReport(pipeline=pipeline.name, stages=rows)


def _why(store: Store | None, stage: str, keys: tuple[str, str], flat: dict[str, ArtifactRef]) -> str:
    last = _latest_manifest(store, stage) if store is not None else None
    if last is None:
        return "never run: no succeeded manifest for this stage"
    reasons = []
    if last.config_hash != keys[1]:
        reasons.append(f"config (cmd, params, env or outputs) changed since run {last.run_id}")
    changed = sorted(k for k in set(flat) | set(last.inputs)
                     if (flat.get(k) and flat[k].hash) != (last.inputs.get(k) and last.inputs[k].hash))
    if changed:
        reasons.append(f"inputs changed since run {last.run_id}: {', '.join(changed)}")
    return "; ".join(reasons) or f"the outputs of run {last.run_id} are no longer in the store"


def contracts(pipeline: Pipeline) -> ContractsReport:
    """For every stage: its inputs, outputs, entry and exit criteria, and manifest path."""
    from ..pipeline.model import CODE_INPUT, stage_input_paths

    rows = []
    for stage in pipeline.order():
        spec = pipeline.stages[stage]
        entry = [f"upstream stage {u} has a succeeded manifest in the same run" for u in spec.upstream]
        for name, rel in spec.inputs.items():
            entry.append(f"input {name} ({rel}) exists as a file or folder")
            if name not in spec.allow_empty:
                entry.append(f"if input {name} is a folder, it holds at least one file")
        exit_ = ["exits with code 0" + (f" within {spec.timeout:g}s" if spec.timeout else "")]
        exit_ += [f"creates output {o} (a file or a folder of files and folders; no symlinks, "
                  "FIFOs or devices)" for o in spec.outputs]
        code = stage_input_paths(spec, pipeline.workdir).get(CODE_INPUT)
        if code:
            entry.append(f"the code of {spec.call} ({code}) is snapshotted and hashed as an input")
        upstream_used = {u: list(pipeline.stages[u].outputs) for u in spec.upstream}
        rows.append(StageContract(
            stage=stage, description=spec.description, command=spec.cmd, call=spec.call,
            kind=_kind_line(spec),
            inputs=dict(spec.inputs), upstream=upstream_used, outputs=list(spec.outputs),
            entry_criteria=entry, exit_criteria=exit_,
            manifest_path=f"runs/<run_id>/{stage}.json"))
    return ContractsReport(pipeline=pipeline.name, stages=rows)


def _kind_line(spec) -> str | None:  # noqa: ANN001 - a StageSpec
    if spec.kind is None:
        return None
    from ..kinds import DEFAULT_ALGORITHMS

    how = spec.algorithm or DEFAULT_ALGORITHMS.get(spec.kind, "")
    return " ".join(filter(None, [spec.kind, how and f"({how})", f"of {spec.input}",
                                  "" if spec.enabled else "[disabled]"]))
