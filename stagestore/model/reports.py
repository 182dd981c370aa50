"""What library operations return.  The CLI renders these; `--json` prints them encoded."""

from __future__ import annotations

from typing import Literal

import msgspec

from .records import ArtifactRef, Failure, SystemicFailure


class Report(msgspec.Struct, kw_only=True):
    """Base of every report: plain data, encoded as-is by `--json`."""


class RunEvent(Report, kw_only=True):
    """One progress line of a run (`--log-format json` prints these, one JSON object a line).

    Events: start, cached, succeeded, failed, skipped, disabled, degraded, retry, note (a step of a long
    stage), warning, fallback, circuit_open, item_start, item_end, systemic_abort, run_end (the last line: the status)."""

    ts: str
    run_id: str
    item: str | None = None
    stage: str | None = None
    event: str
    detail: str = ""


class StageReport(Report, kw_only=True):
    stage: str
    item: str | None = None
    outcome: Literal["succeeded", "cached", "failed", "skipped", "degraded", "disabled"]
    executed: bool = False
    cached_from: str | None = None
    degraded_from: str | None = None
    attempts: int = 0
    duration_s: float = 0.0
    failure: Failure | None = None
    reason: str | None = None
    warnings: list[str] = []
    nondeterministic: bool = False
    manifest: str | None = None


class ItemReport(Report, kw_only=True):
    item: str
    status: Literal["succeeded", "degraded", "failed", "not_processed"]
    first_failure_stage: str | None = None
    failure: Failure | None = None
    stages: list[StageReport] = []


RunStatus = Literal["succeeded", "degraded", "failed", "aborted"]


class RunReport(Report, kw_only=True):
    """`status`: succeeded (exit 0), failed (a stage or item failed: exit 1), aborted (a
    systemic failure stopped the run: exit 3), degraded (no failure, but a fallback was used:
    `use_last_good` or `on_failure = "skip"`: exit 4)."""

    run_id: str
    pipeline: str
    ok: bool
    status: RunStatus = "succeeded"
    stages: list[StageReport]
    items: list[ItemReport] = []
    processed: int = 0
    systemic: SystemicFailure | None = None
    store: str
    push: PushReport | None = None  # `run --push`: what was pushed, and what could not be


Severity = Literal["problem", "warning"]


class Finding(Report, kw_only=True):
    """One thing verify found: what kind, how bad, where, and in words."""

    kind: str
    severity: Severity
    message: str
    run_id: str | None = None
    stage: str | None = None
    item: str | None = None
    object: str | None = None
    path: str | None = None


class VerifyReport(Report, kw_only=True):
    ok: bool
    objects_checked: int
    bytes_checked: int
    manifests_checked: int
    runs_checked: int
    problems: list[Finding]
    warnings: list[Finding]


class RecoverAction(Report, kw_only=True):
    action: str
    message: str
    run_id: str | None = None
    stage: str | None = None
    path: str | None = None


class RecoverReport(Report, kw_only=True):
    ok: bool
    dry_run: bool
    actions: list[RecoverAction]
    runs: list[RunReport]
    unresolved: list[str]
    # stale entries pointed at another run with the same result, and missing ones written
    cache_entries_rebuilt: int = 0
    cache_entries_removed: int = 0  # stale entries no run's manifest could replace


class FileChange(Report, kw_only=True):
    path: str
    change: Literal["added", "removed", "modified"]


class OutputChange(Report, kw_only=True):
    output: str
    change: Literal["added", "removed", "modified", "unchanged"]
    files: list[FileChange] = []


class StageDiff(Report, kw_only=True):
    stage: str
    item: str | None = None
    change: Literal["added", "removed", "unchanged", "changed"]
    config_changed: bool
    inputs_changed: bool
    outputs_changed: bool
    changed_inputs: list[str] = []
    outputs: list[OutputChange] = []


class DiffReport(Report, kw_only=True):
    run_a: str
    run_b: str
    stages: list[StageDiff]


class GcReport(Report, kw_only=True):
    dry_run: bool
    objects_kept: int
    objects_removed: int
    bytes_removed: int
    removed: list[str]
    cache_entries_rebuilt: int = 0  # as in RecoverReport
    cache_entries_removed: int = 0


class Conflict(Report, kw_only=True):
    """A manifest that exists in both places with different content: both versions, named."""

    run_id: str
    stage: str
    item: str | None = None
    local: str  # the local manifest's path
    remote: str  # the remote manifest's URL
    local_version: str  # status, output hash and finish time, in words
    remote_version: str


class PushReport(Report, kw_only=True):
    ok: bool
    remote: str
    runs: list[str]
    objects_uploaded: int
    bytes_uploaded: int
    objects_present: int  # already on the remote: not sent again
    manifests_pushed: int
    manifests_present: int  # already on the remote with the same bytes
    conflicts: list[Conflict]
    problems: list[str]  # what kept a manifest from being pushed (a missing or damaged object)


class PullReport(Report, kw_only=True):
    ok: bool
    remote: str
    runs: list[str]
    objects_downloaded: int
    bytes_downloaded: int
    objects_present: int  # already in the local store
    manifests_pulled: int
    manifests_present: int  # already in the local store with the same bytes
    conflicts: list[Conflict]
    problems: list[str]


class RemoteRuns(Report, kw_only=True):
    """The run ids a remote holds (`remote_runs`)."""

    remote: str
    runs: list[str]


class RemoteGcReport(Report, kw_only=True):
    dry_run: bool
    remote: str
    grace_seconds: float
    objects_kept: int
    objects_young: int  # unreferenced but younger than the grace period: kept
    objects_removed: int
    bytes_removed: int
    removed: list[str]


class StageStatus(Report, kw_only=True):
    stage: str
    would_execute: bool
    reason: str
    cached_from: str | None = None


class StatusReport(Report, kw_only=True):
    pipeline: str
    stages: list[StageStatus]


class StageContract(Report, kw_only=True):
    stage: str
    description: str
    command: list[str] | str | None
    call: str | None
    kind: str | None = None  # a built-in kind (docs/kinds.md): what it reads, and how
    inputs: dict[str, str]
    upstream: dict[str, list[str]]
    outputs: list[str]
    entry_criteria: list[str]
    exit_criteria: list[str]
    manifest_path: str


class ContractsReport(Report, kw_only=True):
    pipeline: str
    stages: list[StageContract]


class RunSummary(Report, kw_only=True):
    run_id: str
    pipeline: str
    started_at: str | None
    finished_at: str | None
    state: Literal["complete", "degraded", "failed", "incomplete", "running", "aborted", "unknown"]
    stages: dict[str, str]


class RunsReport(Report, kw_only=True):
    runs: list[RunSummary]


class ForgetReport(Report, kw_only=True):
    forgotten: list[str]


class StageRow(Report, kw_only=True):
    stage: str
    status: str
    cached_from: str | None = None
    attempts: int = 0
    output_hash: str | None = None
    outputs: dict[str, ArtifactRef] = {}
    failure: Failure | None = None


class RunDetail(Report, kw_only=True):
    run_id: str
    pipeline: str
    pipeline_file: str
    started_at: str | None
    finished_at: str | None
    state: str
    stages: list[StageRow]
    items: dict[str, int] = {}


class AttemptOutput(Report, kw_only=True):
    attempt: int
    exit_code: int | None
    stdout: str
    stderr: str


# --- `stagestore report`: the failure taxonomy of a run ---


class StageFailureRow(Report, kw_only=True):
    stage: str
    count: int
    percent_of_processed: float


class BuildFailureRow(Report, kw_only=True):
    taxonomy_category: str
    count: int
    percent_of_build_failures: float


class InfrastructureRow(Report, kw_only=True):
    stage: str
    count: int
    percent_of_processed: float
    dominant_signals: list[str]


class FirstFailureRow(Report, kw_only=True):
    item: str | None
    first_failure_stage: str
    stage_failure: str
    failure_category: str
    failure_signal: str
    taxonomy_eligible: bool


class FailureReport(Report, kw_only=True):
    """`stagestore report RUN_ID`: what failed where, build failures apart from infrastructure.

    Counted over processed items (an item run) or the run as one item (a plain run); only an
    item's first failure counts, and only failed items (not degraded ones)."""

    run_id: str
    processed: int
    succeeded: int
    degraded: int
    failed: int
    stage_failures: list[StageFailureRow]
    build_failures: list[BuildFailureRow]
    infrastructure: list[InfrastructureRow]
    first_failures: list[FirstFailureRow]
    systemic: SystemicFailure | None
    valid_for_trends: bool
    complete: bool


# --- `stagestore doctor` and `stagestore stats` ---

CheckStatus = Literal["ok", "warning", "problem"]


class DoctorCheck(Report, kw_only=True):
    """One health check: its name, how it came out, and one line saying what and what to do."""

    name: str
    status: CheckStatus
    message: str


class DoctorReport(Report, kw_only=True):
    """`stagestore doctor`: `ok` is false when any check found a problem (warnings allowed).
    `objects_checked` is always false: doctor re-hashes no object, `deep_check` does."""

    ok: bool
    checks: list[DoctorCheck]
    objects_checked: bool = False
    deep_check: str = "stagestore verify"


class LastFailure(Report, kw_only=True):
    """The most recent failed or degraded manifest of a stage: where, what, when."""

    run_id: str
    item: str | None = None
    class_: str = msgspec.field(name="class")
    category: str
    signal: str
    at: str


class StageStats(Report, kw_only=True):
    """One stage over the runs examined.  `success_rate` is the percentage of its manifests
    that succeeded (reuse included) or degraded; `p50_s`/`p95_s` are over executed manifests
    only (nearest rank), null when none executed."""

    stage: str
    runs: int
    manifests: int
    executed: int
    succeeded: int
    failed: int
    degraded: int
    success_rate: float
    p50_s: float | None
    p95_s: float | None
    retries: int
    last_failure: LastFailure | None


class StatsReport(Report, kw_only=True):
    """`stagestore stats`: per stage, over `runs` (the run ids examined, oldest first)."""

    last: int
    runs: list[str]
    stages: list[StageStats]
    unreadable: int


class CompatProblem(Report, kw_only=True):
    """A compatibility warning of built-in kinds: the stage, every stage involved, why."""

    stage: str
    stages: list[str]
    message: str


class CheckReport(Report, kw_only=True):
    """`stagestore check`: `errors` stop a run (exit 2); `warnings` do too with `--strict`."""

    pipeline: str
    stages: int
    errors: list[str]
    warnings: list[CompatProblem]


class StagePlan(Report, kw_only=True):
    """One stage in `stagestore plan`.  `action`: run, reuse, passthrough or disabled.  The
    estimates are set for `run` only, each None when there is nothing to estimate it from:
    `memory_bytes` (peak resident memory of the stage's process), `cores`, `disk_bytes` (its
    outputs in the store), `seconds`; `basis` says what they come from."""

    stage: str
    action: Literal["run", "reuse", "passthrough", "disabled"]
    reason: str
    input_bytes: int
    output_bytes: int | None = None
    memory_bytes: int | None = None
    cores: int | None = None
    disk_bytes: int | None = None
    seconds: float | None = None
    basis: str = ""


class PlanReport(Report, kw_only=True):
    pipeline: str
    stages: list[StagePlan]
