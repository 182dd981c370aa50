"""What library operations return.  The CLI renders these; `--json` prints them encoded."""

from __future__ import annotations

from typing import Literal

import msgspec

from .records import ArtifactRef, Failure


class Report(msgspec.Struct, kw_only=True):
    """Base of every report: plain data, encoded as-is by `--json`."""


class StageReport(Report, kw_only=True):
    stage: str
    outcome: Literal["succeeded", "cached", "failed", "skipped"]
    executed: bool = False
    cached_from: str | None = None
    attempts: int = 0
    duration_s: float = 0.0
    failure: Failure | None = None
    reason: str | None = None
    nondeterministic: bool = False
    manifest: str | None = None


class RunReport(Report, kw_only=True):
    run_id: str
    pipeline: str
    ok: bool
    stages: list[StageReport]
    store: str


Severity = Literal["problem", "warning"]


class Finding(Report, kw_only=True):
    """One thing verify found: what kind, how bad, where, and in words."""

    kind: str
    severity: Severity
    message: str
    run_id: str | None = None
    stage: str | None = None
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


class FileChange(Report, kw_only=True):
    path: str
    change: Literal["added", "removed", "modified"]


class OutputChange(Report, kw_only=True):
    output: str
    change: Literal["added", "removed", "modified", "unchanged"]
    files: list[FileChange] = []


class StageDiff(Report, kw_only=True):
    stage: str
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
    state: Literal["complete", "failed", "incomplete", "running", "unknown"]
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


class AttemptOutput(Report, kw_only=True):
    attempt: int
    exit_code: int | None
    stdout: str
    stderr: str
