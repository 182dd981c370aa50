"""`run`: execute a pipeline's stages in dependency order, reusing identical work.

A run first snapshots every workspace input it needs into the store and writes its run record
(`runs/<run_id>/_run.json`: the pipeline definition and those snapshots), so that a rerun or a
`recover` of the run sees exactly what the run started with.  Then each stage, once its upstream
stages have succeeded:

1. computes its input_hash (over its inputs' and upstream outputs' content hashes) and its
   config_hash (over its definition as written);
2. reuses a succeeded manifest with the same two keys, from this run or any other (unless
   `force`), or else runs attempts until one succeeds or the retries are spent;
3. writes its manifest last, after every object the manifest names is durable.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from . import durable, executor
from .errors import CorruptRecordError, OutputError, PipelineError, UsageError
from .executor import StageInputs, now
from .keys import config_hash, input_hash, input_key
from .layout import run_owner, validate_name
from .locking import OwnerLock, owner_locked, store_lock
from .manifests import cache_key, output_hash
from .objects import SyncBatch
from .pipeline import CODE_INPUT, Pipeline, code_path, stage_input_paths
from .records import ArtifactRef, Failure, PipelineRef, RunRecord, StageManifest, StageSpec
from .reports import RunReport, StageReport
from .store import Store
from .trees import artifact_present, store_tree

ProgressCallback = Callable[[str, str, str], None]
"""`progress(event, stage, detail)`; events: start, cached, succeeded, failed, skipped, retry,
note (a step of a long stage, such as storing a large output)."""


def work_owner(keys: tuple[str, str]) -> str:
    """The lock held while a stage with these keys executes: `work-<cache key hex>`."""
    return "work-" + cache_key(*keys).removeprefix("blake3:")


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def run(pipeline: Pipeline, store: Store, *, run_id: str | None = None,
        stages: Iterable[str] = (), jobs: int = 1, force: bool = False,
        progress: ProgressCallback | None = None) -> RunReport:
    """Run `stages` (all when empty) and whatever they need upstream, as run `run_id`."""
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    selected = pipeline.closure(list(stages) or pipeline.order())
    run_id = validate_name(run_id, "run id") if run_id else new_run_id()
    owner = run_owner(run_id)
    with store_lock(store.layout, exclusive=False), \
            owner_locked(store.layout, owner, f"run {run_id!r}"):
        record = _open_or_start_run(pipeline, store, run_id, selected, owner)
        return Execution(store, record, selected, jobs=jobs, force=force, progress=progress).run()


def resume(store: Store, run_id: str, *, jobs: int = 1,
           progress: ProgressCallback | None = None) -> RunReport:
    """Complete run `run_id` with the definition and inputs it recorded; caller holds locks."""
    record = store.manifests.read_run(run_id)
    if record.finished_at is not None:
        record = _replace(record, finished_at=None)
        store.manifests.write_run(record, run_owner(run_id))
    return Execution(store, record, list(record.selected), jobs=jobs, force=False,
                     progress=progress).run()


def _open_or_start_run(pipeline: Pipeline, store: Store, run_id: str, selected: list[str],
                       owner: str) -> RunRecord:
    if store.manifests.layout.run_record_path(run_id).exists():
        record = store.manifests.read_run(run_id)
        if record.definition != pipeline.definition:
            raise UsageError(
                f"run {run_id!r} was started from a different pipeline definition",
                hint=f"use a new --run-id, or `stagestore recover --run-id {run_id}` to complete "
                     "it as it was defined")
        inputs = dict(record.inputs)
        missing = [s for s in selected if s not in inputs]
        inputs.update(snapshot_inputs(pipeline, store, missing, owner))
        # finished_at goes back to None until this invocation finishes, so that a crash now
        # leaves the run marked as interrupted for verify and recover.
        record = _replace(record, inputs=inputs, selected=_merge(record.selected, selected, pipeline),
                          finished_at=None)
    else:
        record = RunRecord(
            run_id=run_id, pipeline=PipelineRef(name=pipeline.name, version=pipeline.version),
            pipeline_file=str(pipeline.path), workdir=str(pipeline.workdir),
            definition=pipeline.definition, selected=selected,
            inputs=snapshot_inputs(pipeline, store, selected, owner), started_at=now())
    store.manifests.write_run(record, owner)
    return record


def _merge(old: list[str], new: list[str], pipeline: Pipeline) -> list[str]:
    wanted = set(old) | set(new)
    return [s for s in pipeline.order() if s in wanted]


def _replace(record: RunRecord, **changes) -> RunRecord:  # noqa: ANN003
    import msgspec

    return msgspec.structs.replace(record, **changes)


def snapshot_inputs(pipeline: Pipeline, store: Store, stages: Iterable[str],
                    owner: str) -> dict[str, dict[str, ArtifactRef]]:
    """Copy every workspace input of `stages` into the store; each path once per run."""
    batch = SyncBatch()
    seen: dict[Path, ArtifactRef] = {}
    result: dict[str, dict[str, ArtifactRef]] = {}
    for stage in stages:
        refs: dict[str, ArtifactRef] = {}
        for name, relpath in stage_input_paths(pipeline.stages[stage], pipeline.workdir).items():
            path = pipeline.input_path(relpath)
            key = path.resolve()
            if key not in seen:
                seen[key] = _snapshot(store, path, owner, batch, f"stage {stage!r} input {name!r}")
            refs[name] = seen[key]
        result[stage] = refs
    batch.flush()
    return result


def _snapshot(store: Store, path: Path, owner: str, batch: SyncBatch, what: str) -> ArtifactRef:
    try:
        if path.is_dir():
            return store_tree(path, store.objects, owner, batch, move=False, what=what)
        digest, size = store.objects.ingest_file(path, owner, batch)
        return ArtifactRef(hash=digest, size=size, kind="file")
    except FileNotFoundError:
        raise PipelineError(f"{what}: {path} disappeared before it could be stored",
                            hint="keep inputs in place while a run starts") from None
    except OutputError as exc:
        raise PipelineError(f"{exc.message} ({path})", hint=exc.hint) from None


class Execution:
    """One pass over a run's selected stages."""

    def __init__(self, store: Store, record: RunRecord, selected: list[str], *, jobs: int,
                 force: bool, progress: ProgressCallback | None) -> None:
        self.store = store
        self.record = record
        self.selected = selected
        self.jobs = jobs
        self.force = force
        self.progress = progress or (lambda event, stage, detail: None)
        self.owner = run_owner(record.run_id)
        self.stages = record.definition.stages
        self.workdir = Path(record.workdir)

    def run(self) -> RunReport:
        executor.stopping.clear()
        reports: dict[str, StageReport] = {}
        pending = list(self.selected)
        running: dict[Future[StageReport], str] = {}
        with ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="stage") as pool:
            try:
                while pending or running:
                    for stage in list(pending):
                        ups = self.stages[stage].upstream
                        blocked = [u for u in ups if u in reports and reports[u].outcome in
                                   ("failed", "skipped")]
                        if blocked:
                            pending.remove(stage)
                            reports[stage] = self._skip(stage, blocked[0])
                        elif all(u in reports for u in ups) and len(running) < self.jobs:
                            pending.remove(stage)
                            running[pool.submit(self.process, stage)] = stage
                    if running:
                        done, _ = wait(running, return_when=FIRST_COMPLETED)
                        for future in done:
                            stage = running.pop(future)
                            reports[stage] = future.result()
            except BaseException:
                executor.kill_all()
                for future in running:
                    future.cancel()
                raise
        ordered = [reports[s] for s in self.selected]
        self._finish(ordered)
        return RunReport(run_id=self.record.run_id, pipeline=self.record.pipeline.name,
                         ok=all(r.outcome in ("succeeded", "cached") for r in ordered),
                         stages=ordered, store=str(self.store.root))

    def _skip(self, stage: str, blocker: str) -> StageReport:
        """A stage whose upstream did not succeed: not run, and a manifest it has in this run
        from an earlier invocation is removed, since this run no longer records the upstream
        outputs it was made from."""
        path = self.store.layout.manifest_path(self.record.run_id, stage)
        if path.exists():
            durable.unlink(path)
            durable.fsync_dir(path.parent)
        reason = f"upstream stage {blocker!r} did not succeed"
        self.progress("skipped", stage, reason)
        return StageReport(stage=stage, outcome="skipped", reason=reason)

    def _finish(self, reports: list[StageReport]) -> None:
        outcomes = dict(self.record.outcomes)
        outcomes.update({r.stage: r.outcome for r in reports})
        self.record = _replace(self.record, outcomes=outcomes, finished_at=now())
        self.store.manifests.write_run(self.record, self.owner)

    # --- one stage ---

    def _inputs(self, stage: str, spec: StageSpec) -> tuple[StageInputs, dict[str, ArtifactRef], dict[str, str]]:
        workspace = dict(self.record.inputs.get(stage, {}))
        upstream: dict[str, dict[str, ArtifactRef]] = {}
        upstream_hashes: dict[str, str] = {}
        flat = {input_key("inputs", n): ref for n, ref in workspace.items()}
        for up in spec.upstream:
            manifest = self.store.manifests.read(self.record.run_id, up)
            upstream[up] = dict(manifest.outputs)
            upstream_hashes[up] = manifest.output_hash or ""
            for n, ref in manifest.outputs.items():
                flat[input_key("upstream", n, up)] = ref
        # From the definition and the snapshot alone: the workspace may have changed since.
        paths = {n: (code_path(spec, ref.kind) if n == CODE_INPUT else spec.inputs[n])
                 for n, ref in workspace.items()}
        basenames = {n: Path(p).name or n for n, p in paths.items()}
        return StageInputs(workspace, upstream, basenames), flat, upstream_hashes

    def process(self, stage: str) -> StageReport:
        started = time.monotonic()
        spec = self.stages[stage]
        run_id = self.record.run_id
        try:
            inputs, flat, upstream_hashes = self._inputs(stage, spec)
        except (FileNotFoundError, CorruptRecordError) as exc:
            # An upstream manifest vanished or was damaged after its stage succeeded here.
            failure = Failure(class_=executor.UPSTREAM_MISSING, signal=(
                f"cannot read an upstream manifest: {getattr(exc, 'message', exc)}"))
            self.progress("failed", stage, "")
            return StageReport(stage=stage, outcome="failed", failure=failure,
                               duration_s=round(time.monotonic() - started, 3))
        keys = (input_hash(flat), config_hash(spec))
        manifests = self.store.manifests
        path = str(manifests.layout.manifest_path(run_id, stage))

        def report(outcome, manifest: StageManifest, **extra) -> StageReport:  # noqa: ANN001
            rep = StageReport(stage=stage, outcome=outcome, cached_from=manifest.cached_from,
                              attempts=manifest.attempts, failure=manifest.failure,
                              duration_s=round(time.monotonic() - started, 3), manifest=path, **extra)
            self.progress(outcome, stage, manifest.cached_from or "")
            return rep

        if self.force:
            # An earlier result with the same keys, to tell whether the stage is deterministic.
            previous = self.store.cache.lookup(*keys)
            return self._execute(stage, spec, inputs, keys, flat, upstream_hashes, previous, report)
        try:
            existing = manifests.read_optional(run_id, stage)
        except CorruptRecordError:  # damaged: redo the stage and replace it
            existing = None
        if existing is not None and existing.status == "succeeded" and \
                (existing.input_hash, existing.config_hash) == keys and self._present(existing):
            return report("cached" if existing.cached_from else "succeeded", existing)
        reused = self._reuse(stage, spec, keys, flat, upstream_hashes)
        if reused is not None:
            return report("cached", reused)
        # Identical work is done once: another process, or a stage of this run with the same
        # keys, may be doing it right now.  Wait for it to finish, then look again.
        lock = OwnerLock(self.store.layout, work_owner(keys))
        if not lock.try_acquire():
            self.progress("note", stage, "waiting for identical work in progress elsewhere")
            while not lock.try_acquire():  # polled, so that an interrupt is not held up
                if executor.stopping.wait(0.05):
                    raise executor.Interrupted()
        try:
            reused = self._reuse(stage, spec, keys, flat, upstream_hashes)
            if reused is not None:
                return report("cached", reused)
            return self._execute(stage, spec, inputs, keys, flat, upstream_hashes, None, report)
        finally:
            lock.release()

    def _reuse(self, stage: str, spec: StageSpec, keys: tuple[str, str],
               flat: dict[str, ArtifactRef], upstream_hashes: dict[str, str]) -> StageManifest | None:
        """Record a cache hit as this run's manifest for the stage, if there is one."""
        hit = self.store.cache.lookup(*keys)
        if hit is None or not self._present(hit):
            return None
        manifest = self._manifest(stage, spec, keys, flat, upstream_hashes, status="succeeded",
                                  outputs=dict(hit.outputs), started_at=now(), attempts=0,
                                  logs=[], failure=None, cached_from=hit.cached_from or hit.run_id)
        self.store.manifests.write(manifest, self.owner)
        return manifest

    def _execute(self, stage: str, spec: StageSpec, inputs: StageInputs, keys: tuple[str, str],
                 flat: dict[str, ArtifactRef], upstream_hashes: dict[str, str],
                 previous: StageManifest | None, report: Callable[..., StageReport]) -> StageReport:
        run_id = self.record.run_id
        manifests = self.store.manifests
        self.progress("start", stage, "")
        started_at = now()
        logs = []
        result = None
        attempts = 1 + spec.retries
        for number in range(1, attempts + 1):
            folder = manifests.layout.new_tmp_path(self.owner, f"{stage}.{number}")
            result = executor.run_attempt(
                objects=self.store.objects, owner=self.owner, folder=folder, workdir=self.workdir,
                run_id=run_id, stage=stage, spec=spec, inputs=inputs, number=number,
                note=lambda message: self.progress("note", stage, message))
            logs.append(result.log)
            if result.failure is None:
                break
            if number < attempts:
                delay = executor.backoff(spec, number)
                self.progress("retry", stage, f"attempt {number} failed "
                              f"({result.failure.class_}); retrying in {delay:g}s")
                if executor.stopping.wait(delay):
                    raise executor.Interrupted()
        assert result is not None
        if result.failure is None:
            assert result.outputs is not None
            manifest = self._manifest(stage, spec, keys, flat, upstream_hashes, status="succeeded",
                                      outputs=result.outputs, started_at=started_at,
                                      attempts=len(logs), logs=logs, failure=None, cached_from=None)
            # The cache entry goes first, and only where no valid entry exists: a crash between
            # the two writes then leaves an entry naming a manifest that does not exist (a miss),
            # never a committed manifest the index cannot find.
            if previous is None:
                self.store.cache.record(manifest, self.owner)
            manifests.write(manifest, self.owner)
            nondeterministic = previous is not None and previous.output_hash != manifest.output_hash
            return report("succeeded", manifest, nondeterministic=nondeterministic, executed=True)
        manifest = self._manifest(stage, spec, keys, flat, upstream_hashes, status="failed",
                                  outputs={}, started_at=started_at, attempts=len(logs), logs=logs,
                                  failure=result.failure, cached_from=None)
        manifests.write(manifest, self.owner)
        return report("failed", manifest, executed=True)

    def _present(self, manifest: StageManifest) -> bool:
        """Every object the manifest's outputs need is in the store (the files of trees too)."""
        return all(artifact_present(self.store.objects, ref) for ref in manifest.outputs.values())

    def _manifest(self, stage: str, spec: StageSpec, keys: tuple[str, str],
                  flat: dict[str, ArtifactRef], upstream_hashes: dict[str, str], *,
                  status: str, outputs: dict[str, ArtifactRef], started_at, attempts: int,  # noqa: ANN001
                  logs: list, failure: Failure | None, cached_from: str | None) -> StageManifest:
        return StageManifest(
            stage=stage, run_id=self.record.run_id, pipeline=self.record.pipeline,
            status=status,  # type: ignore[arg-type]
            input_hash=keys[0], config_hash=keys[1],
            output_hash=output_hash(outputs) if status == "succeeded" else None,
            inputs=flat, upstream=upstream_hashes, outputs=outputs, started_at=started_at,
            finished_at=now(), cached_from=cached_from, attempts=attempts, logs=logs,
            failure=failure)
