"""One stage of a run, in one scope (the run, or one item of it): reuse, or execute and commit.

`StageWork.process`:

1. computes the stage's input_hash (its inputs' and upstream outputs' content hashes, and the
   item id for a per-item stage) and config_hash (its name and definition as written);
2. reuses a succeeded manifest with the same two keys, from this run or any other (unless
   `force`), or, with `run --remote`, from the remote, its outputs pulled first; a manifest
   carrying check warnings is reused only in sampling mode;
3. else, holding the key's work lock: asks the circuit breaker (item runs), runs the disk
   preflight, then runs attempts, retrying only `retryable` failures with capped backoff;
4. when the attempts fail, applies `on_failure` (`skip`, `use_last_good`) unless the failure is
   a `validation` one;
5. writes the manifest last, after every object it names is durable; every retry, skip, fallback
   and warning is in its `events`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from ..errors import CorruptRecordError
from ..model.failures import CIRCUIT_OPEN, INFRASTRUCTURE_GATE, INPUT_MISSING, UPSTREAM_MISSING
from ..model.records import (ArtifactRef, AttemptLog, Failure, Resources, RunRecord, StageEvent,
                             StageManifest, StageSpec, now)
from ..model.reports import RunEvent, StageReport
from ..pipeline.keys import config_hash, input_hash, input_key
from ..pipeline.model import CODE_INPUT, code_path
from ..model.sizes import parse_size
from ..pipeline.syntax import render_item_path
from ..store import unsynced
from ..store.locking import OwnerLock
from ..store.manifests import cache_key, output_hash
from ..store.store import Store
from ..store.trees import artifact_present
from . import processes
from .classify import runner_failure
from .inputs import StageInputs
from .resilience import CircuitBreaker, human_size, last_good, last_output_size, preflight

if TYPE_CHECKING:
    from ..remote.transfer import Transfer

ProgressCallback = Callable[[RunEvent], None]
"""`progress(event)`, called from worker threads; see `RunEvent` for the events."""


def work_owner(keys: tuple[str, str]) -> str:
    """The lock held while a stage with these keys executes: `work-<cache key hex>`."""
    return "work-" + cache_key(*keys).removeprefix("blake3:")


class _Unusable(Exception):
    """A stage cannot start: an input or upstream manifest is missing (no manifest written)."""

    def __init__(self, failure: Failure) -> None:
        self.failure = failure


class StageWork:
    """Processes stages of one run; shared by the run's worker threads."""

    def __init__(self, store: Store, record: RunRecord, *, force: bool, item_stages: set[str],
                 breaker: CircuitBreaker, emit: Callable[..., None],
                 remote: Transfer | None = None,
                 stop: processes.StopToken | None = None) -> None:
        self.store = store
        self.stop = stop if stop is not None else processes.StopToken()  # the run's
        self.remote = remote  # `run --remote`: also a build cache
        self.record = record
        self.force = force
        self.item_stages = item_stages
        self.breaker = breaker
        self.emit = emit
        self.owner = f"run-{record.run_id}"
        self.stages = record.definition.stages
        self.workdir = Path(record.workdir)
        self.sampling = record.execution.mode == "sampling"
        self._sizes: dict[str, int | None] = {}
        self._sizes_lock = threading.Lock()

    # --- inputs and keys ---

    def _inputs(self, stage: str, spec: StageSpec, item: str | None,
                item_inputs: dict[str, ArtifactRef] | None
                ) -> tuple[StageInputs, dict[str, ArtifactRef], dict[str, str]]:
        workspace = dict(self.record.inputs.get(stage, {}))
        paths = {n: (code_path(spec, ref.kind) if n == CODE_INPUT else spec.inputs[n])
                 for n, ref in workspace.items()}
        if item is not None:
            for name, relpath in spec.inputs.items():
                if name in workspace:
                    continue
                rendered = render_item_path(relpath, item)
                if item_inputs is None or name not in item_inputs:
                    raise _Unusable(runner_failure(spec, INPUT_MISSING, (
                        f"input {name!r} ({relpath} for item {item!r}: {rendered}) did not exist "
                        "when the item started")))
                workspace[name] = item_inputs[name]
                paths[name] = rendered
        upstream: dict[str, dict[str, ArtifactRef]] = {}
        upstream_hashes: dict[str, str] = {}
        flat = {input_key("inputs", n): ref for n, ref in workspace.items()}
        for up in spec.upstream:
            scope = item if up in self.item_stages else None
            try:
                manifest = self.store.manifests.read(self.record.run_id, up, scope)
            except (FileNotFoundError, CorruptRecordError) as exc:
                # An upstream manifest vanished or was damaged after its stage succeeded here.
                raise _Unusable(runner_failure(spec, UPSTREAM_MISSING, (
                    f"cannot read the manifest of upstream stage {up!r}: "
                    f"{getattr(exc, 'message', exc)}"))) from None
            upstream[up] = dict(manifest.outputs)
            upstream_hashes[up] = manifest.output_hash or ""
            for n, ref in manifest.outputs.items():
                flat[input_key("upstream", n, up)] = ref
        # From the definition and the snapshot alone: the workspace may have changed since.
        basenames = {n: Path(p).name or n for n, p in paths.items()}
        return StageInputs(workspace, upstream, basenames), flat, upstream_hashes

    # --- one stage ---

    def process(self, stage: str, item: str | None = None,
                item_inputs: dict[str, ArtifactRef] | None = None) -> StageReport:
        started = time.monotonic()
        spec = self.stages[stage]
        run_id = self.record.run_id

        def report(outcome: str, manifest: StageManifest | None, **extra) -> StageReport:  # noqa: ANN003
            fields = {} if manifest is None else {
                "cached_from": manifest.cached_from, "degraded_from": manifest.degraded_from,
                "attempts": manifest.attempts, "failure": manifest.failure,
                "warnings": list(manifest.warnings),
                "manifest": self.store.manifests.location(run_id, stage, item)}
            fields.update(extra)
            rep = StageReport(stage=stage, item=item, outcome=outcome,  # type: ignore[arg-type]
                              duration_s=round(time.monotonic() - started, 3), **fields)
            detail = rep.cached_from or rep.degraded_from or (
                f"{rep.failure.class_} ({rep.failure.category})" if rep.failure else "")
            self.emit(outcome, stage, detail, item)
            return rep

        try:
            inputs, flat, upstream_hashes = self._inputs(stage, spec, item, item_inputs)
        except _Unusable as exc:
            return report("failed", None, failure=exc.failure)
        try:
            keys = (input_hash(flat, item if stage in self.item_stages else None),
                    self._config_hash(stage, spec))
        except _Unusable as exc:
            return report("failed", None, failure=exc.failure)
        context = _Context(stage, spec, item, keys, flat, upstream_hashes, inputs)
        if not spec.enabled or spec.kind == "passthrough":
            return self._pass_through(context, report)
        if self.force:
            # An earlier result with the same keys, to tell whether the stage is deterministic.
            previous = self.store.cache.lookup(*keys)
            return self._execute(context, previous, report)
        try:
            existing = self.store.manifests.read_optional(run_id, stage, item)
        except CorruptRecordError:  # damaged: redo the stage and replace it
            existing = None
        if existing is not None and existing.status == "succeeded" and \
                (existing.input_hash, existing.config_hash) == keys and self._usable(existing):
            # Written by a process that may have died before it synced the folder: make the
            # manifest durable before reporting the stage done.
            self.store.manifests.sync_scope(run_id, item)
            return report("cached" if existing.cached_from else "succeeded", existing)
        reused = self._reuse(context)
        if reused is not None:
            return report("cached", reused)
        # Identical work is done once: another run, in this process or another, may be doing it
        # right now.  Wait for it to finish, then look again.
        lock = OwnerLock(self.store.layout, work_owner(keys))
        if not lock.try_acquire():
            self.emit("note", stage, "waiting for identical work in progress elsewhere", item)
            while not lock.try_acquire():  # polled, so that an interrupt is not held up
                if self.stop.wait(0.05):
                    raise processes.Interrupted()
        try:
            reused = self._reuse(context)
            if reused is not None:
                return report("cached", reused)
            return self._execute(context, None, report)
        finally:
            lock.release()

    def _config_hash(self, stage: str, spec: StageSpec) -> str:
        if spec.kind is None:
            return config_hash(stage, spec)
        from ..kinds import KindError
        from ..pipeline.kindspec import stage_config_hash

        try:
            return stage_config_hash(stage, spec, self.workdir)
        except KindError as exc:
            raise _Unusable(runner_failure(spec, INFRASTRUCTURE_GATE, exc.message)) from None

    def _pass_through(self, c: _Context, report: Callable[..., StageReport]) -> StageReport:
        """A passthrough stage, or a disabled one: no process.  The output of a built-in kind
        is its input, the same object; a disabled stage of any other kind has no outputs, and
        the runner skips its dependents."""
        outputs = {}
        if c.spec.kind is not None:
            from ..pipeline.kindspec import source

            ref = source(c.spec)
            name = input_key(ref.kind, ref.name, ref.stage if ref.kind == "upstream" else None)
            outputs[c.spec.outputs[0]] = c.flat[name]
        status = "succeeded" if c.spec.enabled else "disabled"
        manifest = self._manifest(c, status=status, outputs=outputs, started_at=now(), logs=[],
                                  failure=None)
        self.store.manifests.write(manifest, self.owner)
        return report(status, manifest,
                      reason=None if c.spec.enabled else "disabled (enabled = false)")

    def _usable(self, manifest: StageManifest) -> bool:
        """Every object the outputs need is present, and check warnings are acceptable."""
        if manifest.warnings and not self.sampling:
            return False  # its checks failed as warnings; production enforces them
        return all(artifact_present(self.store.objects, ref) for ref in manifest.outputs.values())

    def _reuse(self, c: _Context) -> StageManifest | None:
        """Record a cache hit as this run's manifest for the stage, if there is one."""
        hit = self.store.cache.lookup(*c.keys)
        from_remote = False
        if (hit is None or not self._usable(hit)) and self.remote is not None:
            hit, from_remote = self._remote_hit(c), True
        if hit is None or not self._usable(hit):
            return None
        manifest = self._manifest(c, status="succeeded", outputs=dict(hit.outputs),
                                  started_at=now(), logs=[], failure=None,
                                  cached_from=hit.cached_from or hit.run_id,
                                  warnings=list(hit.warnings))
        if from_remote:
            # Found locally next time.  The entry goes first, as after an execution: a crash
            # between the two writes leaves an entry that misses, never a manifest the index
            # cannot find (docs/format.md, "Manifest last").
            self.store.cache.record(manifest, self.owner)
        self.store.manifests.write(manifest, self.owner)
        if from_remote:
            self.emit("note", c.stage, f"reused from remote {self.remote.name!r} "
                      f"(run {manifest.cached_from})", c.item)
        return manifest

    def _remote_hit(self, c: _Context) -> StageManifest | None:
        """The remote's succeeded manifest with these keys, its outputs pulled; a remote that
        cannot be asked is a miss, and is said to be one."""
        from ..remote.storage import RemoteError

        assert self.remote is not None
        try:
            return self.remote.fetch_cached(*c.keys, owner=self.owner)
        except RemoteError as exc:
            self.emit("note", c.stage, f"remote lookup failed, executing: {exc.message}", c.item)
            return None

    def _execute(self, c: _Context, previous: StageManifest | None,
                 report: Callable[..., StageReport]) -> StageReport:
        events: list[StageEvent] = []
        if c.item is not None:
            admitted, probe, why = self.breaker.admit(c.stage)
            if not admitted:
                events.append(StageEvent(at=now(), kind="circuit_open", message=why))
                failure = runner_failure(c.spec, CIRCUIT_OPEN, why)
                manifest = self._manifest(c, status="failed", outputs={}, started_at=now(),
                                          logs=[], failure=failure, events=events)
                self.store.manifests.write(manifest, self.owner)
                self.emit("circuit_open", c.stage, why, c.item)
                return report("failed", manifest, reason=why)
        else:
            probe = False
        refused = self._preflight(c.spec, c.stage)
        self.emit("start", c.stage, "", c.item)
        started_at = now()
        logs: list[AttemptLog] = []
        result = None
        warnings: list[str] = []
        failure: Failure | None
        if refused is not None:
            events.append(StageEvent(at=now(), kind="preflight", message=refused))
            failure = runner_failure(c.spec, INFRASTRUCTURE_GATE, refused)
        else:
            failure, result, warnings = self._attempts(c, logs, events)
        opened = self.breaker.record(c.stage, failure is None, probe,
                                     failure.class_ if failure else "") if c.item else False
        if opened:
            message = (f"circuit opened: stage {c.stage!r} failed {self.breaker.limit} times in "
                       "a row; later items fail fast here until a probe item succeeds")
            events.append(StageEvent(at=now(), kind="circuit_open", message=message))
            self.emit("circuit_open", c.stage, message, c.item)
        if failure is None:
            assert result is not None and result.outputs is not None
            for warning in warnings:
                events.append(StageEvent(at=now(), kind="warning", message=warning))
                self.emit("warning", c.stage, warning, c.item)
            manifest = self._manifest(c, status="succeeded", outputs=result.outputs,
                                      started_at=started_at, logs=logs, failure=None,
                                      events=events, warnings=warnings,
                                      resources=result.resources)
            self._note_size(c.stage, manifest)
            # The cache entry goes first, and only where no valid entry exists: a crash between
            # the two writes then leaves an entry naming a manifest that does not exist (a miss),
            # never a committed manifest the index cannot find.
            if previous is None:
                self.store.cache.record(manifest, self.owner)
            self.store.manifests.write(manifest, self.owner)
            nondeterministic = previous is not None and previous.output_hash != manifest.output_hash
            return report("succeeded", manifest, nondeterministic=nondeterministic, executed=True)
        return self._fail(c, failure, started_at, logs, events, report)

    def _attempts(self, c: _Context, logs: list[AttemptLog], events: list[StageEvent]):  # noqa: ANN202
        """Attempts until one succeeds, a failure is not retryable, or the retries are spent."""
        from . import attempt as executor  # only when a stage executes: it imports subprocess

        attempts = 1 + c.spec.retries
        for number in range(1, attempts + 1):
            folder = self.store.layout.new_tmp_path(self.owner, f"{c.stage}.{number}")
            result = executor.run_attempt(
                deferral=unsynced.begin(self.store.layout, self.owner) if c.item is not None else None,
                objects=self.store.objects, owner=self.owner, folder=folder, workdir=self.workdir,
                run_id=self.record.run_id, stage=c.stage, spec=c.spec, inputs=c.inputs,
                number=number, item=c.item, sampling=self.sampling, stop=self.stop,
                note=lambda message: self.emit("note", c.stage, message, c.item))
            logs.append(result.log)
            failure = result.failure
            if failure is None:
                return None, result, result.warnings
            if failure.category != "retryable" or number == attempts:
                return failure, result, []
            delay = executor.backoff(c.spec, number)
            message = (f"attempt {number} failed with {failure.class_} (retryable); retrying in "
                       f"{delay:g}s")
            events.append(StageEvent(at=now(), kind="retry", message=message))
            self.emit("retry", c.stage, message, c.item)
            if self.stop.wait(delay):
                raise processes.Interrupted()
        raise AssertionError("unreachable")

    def _fail(self, c: _Context, failure: Failure, started_at, logs: list[AttemptLog],  # noqa: ANN001
              events: list[StageEvent], report: Callable[..., StageReport]) -> StageReport:
        """A stage whose attempts are spent: `on_failure` decides, except for validation."""
        policy = c.spec.on_failure if failure.category != "validation" else "fail"
        if policy == "use_last_good":
            good = last_good(self.store, c.stage, c.item, c.spec.outputs, self.record.run_id)
            if good is not None:
                message = (f"on_failure = use_last_good: {failure.class_} after "
                           f"{max(len(logs), 1)} attempt(s); using the outputs of run "
                           f"{good.run_id}")
                events.append(StageEvent(at=now(), kind="fallback", message=message))
                self.emit("fallback", c.stage, message, c.item)
                manifest = self._manifest(c, status="degraded", outputs=dict(good.outputs),
                                          started_at=started_at, logs=logs, failure=failure,
                                          events=events, degraded_from=good.run_id)
                self.store.manifests.write(manifest, self.owner)
                return report("degraded", manifest, executed=bool(logs), reason=message)
            message = (f"on_failure = use_last_good: no earlier run has a succeeded result of "
                       f"stage {c.stage!r} to fall back to")
            events.append(StageEvent(at=now(), kind="fallback", message=message))
            self.emit("fallback", c.stage, message, c.item)
        manifest = self._manifest(c, status="failed", outputs={}, started_at=started_at,
                                  logs=logs, failure=failure, events=events)
        if policy == "skip":
            message = (f"on_failure = skip: {failure.class_} recorded; stages that need "
                       f"{c.stage!r} are skipped, the rest go on")
            manifest = msgspec.structs.replace(manifest, events=[
                *events, StageEvent(at=now(), kind="skip", message=message)])
            self.store.manifests.write(manifest, self.owner)
            self.emit("note", c.stage, message, c.item)
            return report("skipped", manifest, executed=bool(logs), reason=message)
        self.store.manifests.write(manifest, self.owner)
        return report("failed", manifest, executed=bool(logs))

    # --- resources ---

    def _preflight(self, spec: StageSpec, stage: str) -> str | None:
        if spec.disk is not None:
            return preflight(self.store.root, parse_size(spec.disk),
                             f"its declared disk need of {human_size(parse_size(spec.disk))}")
        with self._sizes_lock:
            if stage not in self._sizes:
                self._sizes[stage] = last_output_size(self.store, stage, self.record.run_id)
            size = self._sizes[stage]
        if not size:
            return None
        return preflight(self.store.root, size, f"its last recorded output size, {human_size(size)}")

    def _note_size(self, stage: str, manifest: StageManifest) -> None:
        size = sum(ref.size for ref in manifest.outputs.values())
        with self._sizes_lock:
            self._sizes[stage] = max(size, self._sizes.get(stage) or 0)

    def _manifest(self, c: _Context, *, status: str, outputs: dict[str, ArtifactRef],
                  started_at, logs: list[AttemptLog], failure: Failure | None,  # noqa: ANN001
                  cached_from: str | None = None, events: list[StageEvent] | None = None,
                  warnings: list[str] | None = None, degraded_from: str | None = None,
                  resources: Resources | None = None) -> StageManifest:
        return StageManifest(
            stage=c.stage, run_id=self.record.run_id, item=c.item, pipeline=self.record.pipeline,
            status=status,  # type: ignore[arg-type]
            input_hash=c.keys[0], config_hash=c.keys[1],
            output_hash=output_hash(outputs) if status != "failed" else None,
            inputs=c.flat, upstream=c.upstream_hashes, outputs=outputs, started_at=started_at,
            finished_at=now(), cached_from=cached_from, attempts=len(logs), logs=logs,
            failure=failure, degraded_from=degraded_from, events=events or [],
            warnings=warnings or [], resources=resources)


class _Context(msgspec.Struct, frozen=True):
    """What `process` works out once about a stage and passes down."""

    stage: str
    spec: StageSpec
    item: str | None
    keys: tuple[str, str]
    flat: dict[str, ArtifactRef]
    upstream_hashes: dict[str, str]
    inputs: StageInputs
