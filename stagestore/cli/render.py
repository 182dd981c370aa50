"""Rendering reports for people (plain text) and scripts (`--json`: the report encoded)."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import click


def print_json(obj: Any) -> None:
    import msgspec

    click.echo(msgspec.json.format(msgspec.json.encode(obj), indent=2))


def _err(line: str) -> None:
    click.echo(line, err=True)


def plural(n: int, word: str, many: str | None = None) -> str:
    """`1 problem`, `2 problems`: every count printed next to a noun goes through here."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def duration(seconds: float, digits: int = 2) -> str:
    """`1.25s`; never `-0.00s`, which a clock read twice or a rounding would otherwise give."""
    return f"{seconds if seconds > 0 else 0.0:.{digits}f}s"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


class RunProgress:
    """Status lines as stages start and finish, each led by the run id and, in an item run,
    the item (the correlation id): `[RUN_ID ITEM] STAGE  what happened`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started: dict[tuple[str | None, str | None], float] = {}

    def __call__(self, event) -> None:  # noqa: ANN001 - a reports.RunEvent
        key = (event.item, event.stage)
        prefix = f"[{event.run_id}{' ' + event.item if event.item is not None else ''}]"
        stage = event.stage or ""
        with self._lock:
            if event.event == "start":
                self._started[key] = time.monotonic()
                _err(f"{prefix} {stage:<20} running")
            elif event.event in ("note", "retry", "warning", "fallback", "circuit_open"):
                label = "" if event.event == "note" else f"{event.event}: "
                _err(f"{prefix} {stage:<20} {label}{event.detail}")
            elif event.event == "item_start":
                return
            elif event.event == "item_end":
                _err(f"{prefix} item {event.detail}")
            elif event.event == "systemic_abort":
                _err(f"{prefix} SYSTEMIC FAILURE: {event.detail}")
            else:
                # A stage can end without having started: reused, or failed before it ran (an
                # item's missing input, an open circuit); such a line has no duration.
                started = self._started.pop(key, None)
                took = None if started is None else duration(time.monotonic() - started)
                _err(f"{prefix} {stage:<20} " + {
                    "cached": f"cached (from run {event.detail})" if event.detail else "cached",
                    "succeeded": f"succeeded in {took}" if took else "succeeded",
                    "failed": (f"FAILED after {took}" if took else "FAILED") + (
                        f": {event.detail}" if event.detail else ""),
                    "skipped": f"skipped: {event.detail}",
                    "disabled": "disabled (enabled = false)",
                    "degraded": f"DEGRADED: using the outputs of run {event.detail}",
                }.get(event.event, event.event))


class JsonLogProgress:
    """`--log-format json`: every run event as one JSON object a line on stderr."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self, event) -> None:  # noqa: ANN001 - a reports.RunEvent
        import msgspec

        line = msgspec.json.encode(event)
        with self._lock:
            sys.stderr.buffer.write(line + b"\n")
            sys.stderr.flush()


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


def run_report(report, *, as_json: bool, log_json: bool = False) -> None:  # noqa: ANN001
    """The end of a run: stdout gets the run id (or the report with --json); stderr what went
    wrong, as text, or with `--log-format json` as one final `run_end` event."""
    if log_json:
        import datetime

        import msgspec

        from ..model.reports import RunEvent

        failed = [i.item for i in report.items if i.status == "failed"]
        event = RunEvent(
            ts=datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"), run_id=report.run_id, event="run_end",
            detail=f"{report.status}: {plural(report.processed, 'item')} processed, "
                   f"{len(failed)} failed"
            if report.items else report.status)
        sys.stderr.buffer.write(msgspec.json.encode(event) + b"\n")
        sys.stderr.flush()
    if as_json:
        print_json(report)
        return
    if log_json:
        click.echo(report.run_id)
        return
    for stage in report.stages:
        _stage_outcome(report.run_id, stage)
    if report.items:
        _items_summary(report)
    if report.systemic is not None:
        s = report.systemic
        _err(f"error: systemic failure: {s.stage_failures} of "
             f"{plural(s.processed_items, 'processed item')} failed at infrastructure stage "
             f"{s.trigger_stage} ({s.failure_ratio:.0%} > {s.threshold_ratio:.0%}); the run was "
             "aborted and is invalid for trends")
        for signal in s.dominant_failure_signals:
            _err(f"  | {signal}")
        _err(f"hint: fix stage {s.trigger_stage}, then run again; `stagestore report "
             f"{report.run_id}` has the details")
    elif report.status == "degraded":
        _err("warning: the run completed DEGRADED: a fallback was used (see above); "
             f"`stagestore report {report.run_id}` has the details")
    if report.push is not None:
        p = report.push
        _err(f"pushed {plural(p.manifests_pushed, 'manifest')} to {p.remote} "
             f"({p.manifests_present} already there), {plural(p.objects_uploaded, 'object')} "
             f"({_size(p.bytes_uploaded)})")
        _conflicts(p)
        if not p.ok:
            _err(f"hint: the results are safe here; `stagestore push {report.run_id} --remote "
                 f"{p.remote}` sends them once the remote is fixed")
    click.echo(report.run_id)


def _stage_outcome(run_id: str, stage, item: str | None = None, verbose: bool = True) -> None:  # noqa: ANN001
    where = f"stage {stage.stage}" + (f" (item {item})" if item is not None else "")
    if stage.nondeterministic:
        _err(f"warning: {where} is non-deterministic: a forced re-execution "
             "gave a different output hash for the same inputs and config")
    for warning in stage.warnings:
        _err(f"warning: {where}: {warning}")
    if stage.outcome == "failed" and stage.failure is not None:
        failure = stage.failure
        _err(f"error: {where} failed ({failure.class_}, {failure.category}"
             + (f", exit code {failure.exit_code}" if failure.exit_code is not None else "") + ")"
             + (":" if verbose else f": {failure.signal.strip().splitlines()[-1:] or ''}"))
        if verbose:
            for line in failure.signal.strip().splitlines()[-10:]:
                _err(f"  | {line}")
            item_arg = f" --item {item}" if item is not None else ""
            _err(f"hint: `stagestore logs {run_id} {stage.stage}{item_arg}` shows its full output")
    elif stage.outcome == "degraded":
        _err(f"warning: {where} failed and fell back: {stage.reason}")
    elif stage.outcome == "skipped":
        _err(f"skipped: {where}: {stage.reason}")


def _items_summary(report) -> None:  # noqa: ANN001
    counts: dict[str, int] = {}
    for item in report.items:
        counts[item.status] = counts.get(item.status, 0) + 1
    failed = [i for i in report.items if i.status == "failed"]
    for item in failed[:10]:
        f = item.failure
        line = f.signal.strip().splitlines()[-1] if f and f.signal.strip() else ""
        _err(f"failed: item {item.item} at stage {item.first_failure_stage} "
             f"({f.class_ if f else '?'}): {line[:160]}")
    if len(failed) > 10:
        _err(f"... and {plural(len(failed) - 10, 'more failed item')}")
    _err(f"items: {report.processed} processed of {len(report.items)}: "
         + ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in sorted(counts.items()))
         + f"; `stagestore report {report.run_id}` has the failure tables")


def verify_report(report, *, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        print_json(report)
        return
    for finding in report.problems:
        click.echo(f"problem: [{finding.kind}] {finding.message}")
    for finding in report.warnings:
        click.echo(f"warning: [{finding.kind}] {finding.message}")
    summary = (f"{plural(report.objects_checked, 'object')} ({_size(report.bytes_checked)}), "
               f"{plural(report.manifests_checked, 'manifest')} in "
               f"{plural(report.runs_checked, 'run')} checked")
    if report.ok:
        click.echo(f"ok: {summary}"
                   + (f"; {plural(len(report.warnings), 'warning')}" if report.warnings else ""))
    else:
        click.echo(f"FAILED: {plural(len(report.problems), 'problem')}; {summary}")


def recover_report(report, *, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        print_json(report)
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
        print_json(report)
        return
    click.echo(f"diff {report.run_a} -> {report.run_b}")
    for stage in report.stages:
        why = [w for w, flag in (("config", stage.config_changed), ("inputs", stage.inputs_changed),
                                 ("outputs", stage.outputs_changed)) if flag]
        label = stage.stage if stage.item is None else f"{stage.stage} [{stage.item}]"
        click.echo(f"  {label:<20} {stage.change}" + (f" ({', '.join(why)})" if why else ""))
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
        print_json(detail)
        return
    click.echo(f"run {detail.run_id}  pipeline {detail.pipeline}  {detail.state}")
    click.echo(f"  started {detail.started_at}  finished {detail.finished_at or '-'}")
    for row in detail.stages:
        extra = f" from {row.cached_from}" if row.cached_from else ""
        outs = ", ".join(f"{n} ({r.kind}, {_size(r.size)})" for n, r in row.outputs.items())
        click.echo(f"  {row.stage:<20} {row.status}{extra}" + (f"  -> {outs}" if outs else ""))
        if row.failure is not None:
            click.echo(f"    {row.failure.class_}: {row.failure.signal.strip().splitlines()[-1]}")
    if detail.items:
        click.echo("  items: " + ", ".join(f"{n} {status.replace('_', ' ')}"
                                          for status, n in sorted(detail.items.items())))


def failure_report(report, *, as_json: bool) -> None:  # noqa: ANN001
    """`stagestore report`: the four tables, as text, or the report as JSON."""
    if as_json:
        print_json(report)
        return
    click.echo(f"run {report.run_id}: {report.processed} processed, {report.succeeded} succeeded, "
               f"{report.degraded} degraded, {report.failed} failed"
               + ("" if report.valid_for_trends else "  (not valid for trend comparisons)"))
    if report.systemic is not None:
        s = report.systemic
        click.echo(f"SYSTEMIC FAILURE at {s.trigger_stage}: {s.stage_failures} of "
                   f"{s.processed_items} processed items ({s.failure_ratio:.2%} > "
                   f"{s.threshold_ratio:.2%}); samples: {', '.join(s.item_samples)}")
        for signal in s.dominant_failure_signals:
            click.echo(f"  | {signal}")
    for title, rows, columns in report_tables(report):
        click.echo("")
        click.echo(title)
        if not rows:
            click.echo("  (none)")
            continue
        table = [columns] + [[_cell(row[c]) for c in columns] for row in rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
        for line in table:
            click.echo("  " + "  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def report_tables(report):  # noqa: ANN001, ANN201
    """(title, rows as dicts, column names) for each table of a failure report."""
    import msgspec

    def rows(items):  # noqa: ANN001, ANN202
        return [msgspec.to_builtins(item) for item in items]

    return [
        ("Stage failure distribution", rows(report.stage_failures),
         ["stage", "count", "percent_of_processed"]),
        ("Build failure distribution (taxonomy-eligible failures only)",
         rows(report.build_failures), ["taxonomy_category", "count", "percent_of_build_failures"]),
        ("Infrastructure gate summary", rows(report.infrastructure),
         ["stage", "count", "percent_of_processed", "dominant_signals"]),
        ("First failure per failed item", rows(report.first_failures),
         ["item", "first_failure_stage", "stage_failure", "failure_category", "failure_signal",
          "taxonomy_eligible"]),
    ]


def _cell(value) -> str:  # noqa: ANN001
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "; ".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:.2f}"
    if value is None:
        return "-"
    text = str(value).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def _csv_cell(value):  # noqa: ANN001, ANN202
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "; ".join(map(str, value))
    return value


def write_report_csv(report, folder: str) -> list[str]:  # noqa: ANN001
    """One CSV file per table in `folder` (created if needed); returns the paths."""
    import csv
    import os

    names = ["stage_failures.csv", "build_failures.csv", "infrastructure.csv",
             "first_failures.csv"]
    os.makedirs(folder, exist_ok=True)
    written = []
    for name, (_, rows, columns) in zip(names, report_tables(report)):
        path = os.path.join(folder, name)
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for row in rows:
                writer.writerow([_csv_cell(row[c]) for c in columns])
        written.append(path)
    return written


def manifest(record, *, as_json: bool) -> None:  # noqa: ANN001
    from ..model.records import encode_record

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
        print_json(report)
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
        print_json(report)
        return
    for row in report.stages:
        if row.would_execute:
            line = f"would run: {row.reason}"
        elif row.cached_from:
            line = f"up to date (cached from {row.cached_from})"
        else:
            line = row.reason  # a passthrough or disabled stage
        click.echo(f"  {row.stage:<20} {line}")


def check_report(report, *, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        print_json(report)
        return
    for error in report.errors:
        _err(f"error: {error}")
    for warning in report.warnings:
        _err(f"warning: {warning.message} (stages: {', '.join(warning.stages)})")
    verdict = "invalid" if report.errors else "valid"
    click.echo(f"pipeline {report.pipeline}: {plural(report.stages, 'stage')} {verdict}; "
               f"{plural(len(report.errors), 'error')}, "
               f"{plural(len(report.warnings), 'warning')}")


def plan_report(report, *, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        print_json(report)
        return
    rows = []
    for s in report.stages:
        rows.append([s.stage, s.action, _size(s.input_bytes),
                     _maybe(s.output_bytes, _size), _maybe(s.memory_bytes, _size),
                     _maybe(s.cores, str), _maybe(s.disk_bytes, _size),
                     _maybe(s.seconds, lambda v: duration(v, 1)),
                     s.basis if s.action == "run" else s.reason])
    _table(["stage", "action", "input", "output", "memory", "cores", "disk", "time", "basis"],
           rows, right={2, 3, 4, 5, 6, 7})


def _maybe(value, show) -> str:  # noqa: ANN001
    return "-" if value is None else show(value)


def logs(attempts, *, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        print_json(attempts)
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
        print_json(report)
        return
    verb = "would remove" if report.dry_run else "removed"
    click.echo(f"{verb} {plural(report.objects_removed, 'object')} "
               f"({_size(report.bytes_removed)}); kept {report.objects_kept}")
    if report.cache_entries_rebuilt or report.cache_entries_removed:
        click.echo(("would rebuild" if report.dry_run else "rebuilt")
                   + f" {plural(report.cache_entries_rebuilt, 'cache entry', 'cache entries')}, "
                   + ("remove" if report.dry_run else "removed") + f" {report.cache_entries_removed}")


def contracts_report(report, *, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        print_json(report)
        return
    for c in report.stages:
        click.echo(f"stage {c.stage}" + (f": {c.description}" if c.description else ""))
        if c.kind is not None:
            click.echo(f"  kind: {c.kind}")
        else:
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


def doctor_report(report, *, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        print_json(report)
        return
    for check in report.checks:
        click.echo(f"{check.status:<8} {check.name:<11} {check.message}")


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    for row in (header, *rows):
        cells = [cell.rjust(w) if i in right else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths))]
        click.echo("  ".join(cells).rstrip())


def stats_report(report, *, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        print_json(report)
        return
    n = len(report.runs)
    if not report.stages:
        click.echo("no runs" if not n else
                   f"no readable manifests in the last {plural(n, 'run')}")
    else:
        def secs(value: float | None) -> str:
            return "-" if value is None else duration(value)

        rows = []
        for s in report.stages:
            last = s.last_failure
            rows.append([s.stage, str(s.runs), str(s.manifests), str(s.executed), str(s.succeeded),
                         str(s.failed), str(s.degraded), f"{s.success_rate:.1f}%", secs(s.p50_s),
                         secs(s.p95_s), str(s.retries),
                         f"{last.class_} (run {last.run_id})" if last else "-"])
        _table(["STAGE", "RUNS", "MANIFESTS", "EXECUTED", "SUCCEEDED", "FAILED", "DEGRADED",
                "SUCCESS", "P50", "P95", "RETRIES", "LAST FAILURE"], rows,
               right=set(range(1, 11)))
        for s in report.stages:
            last = s.last_failure
            if last is not None:
                where = f"run {last.run_id}" + (f" item {last.item}" if last.item is not None else "")
                click.echo(f"last failure of {s.stage}: {where} at {last.at}: {last.class_} "
                           f"({last.category})" + (f": {last.signal}" if last.signal else ""))
        click.echo(f"over the last {plural(n, 'run')}")
    if report.unreadable:
        _err(f"warning: {plural(report.unreadable, 'unreadable manifest')} skipped; "
             "`stagestore verify` names them")


def remote_list(remotes, *, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        print_json(remotes)
        return
    if not remotes:
        click.echo("no remotes (add one: stagestore remote add NAME s3://BUCKET/PREFIX)")
    for r in remotes:
        extra = "".join(f"  {k} {v}" for k, v in (("endpoint", r.endpoint), ("region", r.region))
                        if v)
        click.echo(f"{r.name}\t{r.url}{extra}")


def _conflicts(report) -> None:  # noqa: ANN001
    for c in report.conflicts:
        where = f"run {c.run_id} " + (f"item {c.item!r} " if c.item else "") + f"stage {c.stage}"
        _err(f"conflict: {where}: the remote holds a different manifest; neither was changed")
        _err(f"  local  {c.local}: {c.local_version}")
        _err(f"  remote {c.remote}: {c.remote_version}")
    for problem in report.problems:
        _err(f"error: {problem}")


def push_report(report, *, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        print_json(report)
        return
    click.echo(f"pushed {plural(report.manifests_pushed, 'manifest')} to {report.remote} "
               f"({report.manifests_present} already there); uploaded "
               f"{plural(report.objects_uploaded, 'object')} ({_size(report.bytes_uploaded)}), "
               f"{report.objects_present} already there")
    _conflicts(report)


def pull_report(report, *, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        print_json(report)
        return
    click.echo(f"pulled {plural(report.manifests_pulled, 'manifest')} from {report.remote} "
               f"({report.manifests_present} already here); downloaded "
               f"{plural(report.objects_downloaded, 'object')} "
               f"({_size(report.bytes_downloaded)}), {report.objects_present} already here")
    _conflicts(report)


def remote_gc_report(report, *, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        print_json(report)
        return
    verb = "would remove" if report.dry_run else "removed"
    click.echo(f"{report.remote}: {verb} {plural(report.objects_removed, 'object')} "
               f"({_size(report.bytes_removed)}); kept {report.objects_kept}, and "
               f"{report.objects_young} unreferenced ones younger than "
               f"{report.grace_seconds / 3600:g} h")
