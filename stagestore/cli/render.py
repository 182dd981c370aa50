"""Rendering reports for people (plain text) and scripts (`--json`: the report encoded)."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import click


def _json(obj: Any) -> None:
    import msgspec

    click.echo(msgspec.json.format(msgspec.json.encode(obj), indent=2))


def _err(line: str) -> None:
    click.echo(line, err=True)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


class RunProgress:
    """Per-stage status lines on a terminal, as stages start and finish."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started: dict[str, float] = {}

    def __call__(self, event: str, stage: str, detail: str) -> None:
        with self._lock:
            if event == "start":
                self._started[stage] = time.monotonic()
                _err(f"  {stage:<20} running")
            elif event in ("note", "retry"):
                _err(f"  {stage:<20} {detail}")
            else:
                took = time.monotonic() - self._started.pop(stage, time.monotonic())
                _err(f"  {stage:<20} " + {
                    "cached": f"cached (from run {detail})" if detail else "cached",
                    "succeeded": f"succeeded in {took:.2f}s",
                    "failed": f"FAILED after {took:.2f}s",
                    "skipped": f"skipped: {detail}",
                }.get(event, event))


class BytesProgress:
    """A single updating `done / total` line on a terminal."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._last = 0.0
        self._shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last < 0.1 and done < total:
            return
        self._last = now
        self._shown = True
        sys.stderr.write(f"\r{self.label}: {_size(done)} / {_size(total)}   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self._shown:
            sys.stderr.write("\n")


def run_report(report, *, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        _json(report)
        return
    for stage in report.stages:
        if stage.nondeterministic:
            _err(f"warning: stage {stage.stage} is non-deterministic: a forced re-execution "
                 "gave a different output hash for the same inputs and config")
        if stage.outcome == "failed" and stage.failure is not None:
            signal = stage.failure.signal.strip().splitlines()
            _err(f"error: stage {stage.stage} failed ({stage.failure.class_}"
                 + (f", exit code {stage.failure.exit_code}" if stage.failure.exit_code is not None
                    else "") + "):")
            for line in signal[-10:]:
                _err(f"  | {line}")
            _err(f"hint: `stagestore logs {report.run_id} {stage.stage}` shows its full output")
        elif stage.outcome == "skipped":
            _err(f"skipped: stage {stage.stage}: {stage.reason}")
    click.echo(report.run_id)


def verify_report(report, *, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        _json(report)
        return
    for finding in report.problems:
        click.echo(f"problem: [{finding.kind}] {finding.message}")
    for finding in report.warnings:
        click.echo(f"warning: [{finding.kind}] {finding.message}")
    summary = (f"{report.objects_checked} objects ({_size(report.bytes_checked)}), "
               f"{report.manifests_checked} manifests in {report.runs_checked} runs checked")
    if report.ok:
        click.echo(f"ok: {summary}" + (f"; {len(report.warnings)} warnings" if report.warnings else ""))
    else:
        click.echo(f"FAILED: {len(report.problems)} problems; {summary}")


def recover_report(report, *, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        _json(report)
        return
    for action in report.actions:
        click.echo(action.message)
    for problem in report.unresolved:
        _err(f"error: {problem}")
    if not report.actions and not report.unresolved:
        click.echo("nothing to recover")
    elif report.ok and not report.dry_run:
        click.echo("recovered; `stagestore verify` should now be clean")


def diff_report(report, *, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        _json(report)
        return
    click.echo(f"diff {report.run_a} -> {report.run_b}")
    for stage in report.stages:
        why = [w for w, flag in (("config", stage.config_changed), ("inputs", stage.inputs_changed),
                                 ("outputs", stage.outputs_changed)) if flag]
        click.echo(f"  {stage.stage:<20} {stage.change}" + (f" ({', '.join(why)})" if why else ""))
        if stage.changed_inputs:
            click.echo(f"    inputs changed: {', '.join(stage.changed_inputs)}")
        for output in stage.outputs:
            if output.change != "unchanged":
                click.echo(f"    output {output.output}: {output.change}")
            for change in output.files:
                mark = {"added": "+", "removed": "-", "modified": "~"}[change.change]
                click.echo(f"      {mark} {change.path}")


def run_detail(detail, *, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        _json(detail)
        return
    click.echo(f"run {detail.run_id}  pipeline {detail.pipeline}  {detail.state}")
    click.echo(f"  started {detail.started_at}  finished {detail.finished_at or '-'}")
    for row in detail.stages:
        extra = f" from {row.cached_from}" if row.cached_from else ""
        outs = ", ".join(f"{n} ({r.kind}, {_size(r.size)})" for n, r in row.outputs.items())
        click.echo(f"  {row.stage:<20} {row.status}{extra}" + (f"  -> {outs}" if outs else ""))
        if row.failure is not None:
            click.echo(f"    {row.failure.class_}: {row.failure.signal.strip().splitlines()[-1]}")


def manifest(record, *, as_json: bool) -> None:  # noqa: ANN001
    from ..records import encode_record

    if as_json:
        click.echo(encode_record(record).decode(), nl=False)
        return
    click.echo(f"run {record.run_id} stage {record.stage}: {record.status}"
               + (f" (cached from {record.cached_from})" if record.cached_from else ""))
    click.echo(f"  input_hash  {record.input_hash}")
    click.echo(f"  config_hash {record.config_hash}")
    click.echo(f"  output_hash {record.output_hash}")
    for name, ref in sorted(record.inputs.items()):
        click.echo(f"  in  {name:<28} {ref.kind:<4} {_size(ref.size):>10}  {ref.hash}")
    for name, ref in sorted(record.outputs.items()):
        click.echo(f"  out {name:<28} {ref.kind:<4} {_size(ref.size):>10}  {ref.hash}")
    click.echo(f"  attempts {record.attempts}; started {record.started_at}; finished {record.finished_at}")
    if record.failure is not None:
        click.echo(f"  failure {record.failure.class_} (exit code {record.failure.exit_code}):")
        for line in record.failure.signal.splitlines():
            click.echo(f"    | {line}")


def runs_report(report, *, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        _json(report)
        return
    if not report.runs:
        click.echo("no runs")
    for run in report.runs:
        counts: dict[str, int] = {}
        for outcome in run.stages.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        click.echo(f"{run.run_id:<28} {run.pipeline:<12} {run.state:<10} {run.started_at or '-'}  {summary}")


def status_report(report, *, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        _json(report)
        return
    for row in report.stages:
        verb = "would run" if row.would_execute else "up to date"
        extra = f" (cached from {row.cached_from})" if row.cached_from else ""
        reason = f": {row.reason}" if row.would_execute else extra
        click.echo(f"  {row.stage:<20} {verb}{reason}")


def logs(attempts, *, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        _json(attempts)
        return
    if not attempts:
        click.echo("no attempts recorded (the stage was reused from an earlier run)")
    for attempt in attempts:
        for stream in ("stdout", "stderr"):
            click.echo(f"== attempt {attempt.attempt} (exit code {attempt.exit_code}) {stream} ==")
            text = getattr(attempt, stream)
            click.echo(text, nl=not text.endswith("\n"))


def gc_report(report, *, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        _json(report)
        return
    verb = "would remove" if report.dry_run else "removed"
    click.echo(f"{verb} {report.objects_removed} objects ({_size(report.bytes_removed)}); "
               f"kept {report.objects_kept}")


def contracts_report(report, *, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        _json(report)
        return
    for c in report.stages:
        click.echo(f"stage {c.stage}" + (f": {c.description}" if c.description else ""))
        click.echo(f"  command: {c.command if c.command is not None else 'call ' + str(c.call)}")
        for name, path in c.inputs.items():
            click.echo(f"  input {name}: {path}")
        for up, outs in c.upstream.items():
            click.echo(f"  upstream {up}: {', '.join(outs)}")
        click.echo(f"  outputs: {', '.join(c.outputs) or '(none)'}")
        for line in c.entry_criteria:
            click.echo(f"  entry: {line}")
        for line in c.exit_criteria:
            click.echo(f"  exit: {line}")
        click.echo(f"  manifest: {c.manifest_path}")
