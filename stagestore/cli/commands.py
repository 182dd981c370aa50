"""Command definitions.  Each: open the store, one library call, render, exit code."""

from __future__ import annotations

import sys

import click

from ..errors import ExitCode, ItemsNeededError
from . import render
from .app import (JOBS, SECONDS, Ctx, FiniteRange, cli, is_quiet, json_option, open_store,
                  pipeline_and_store, pipeline_option, show_live, store_option, store_root)


@cli.command()
@pipeline_option
@store_option
@click.option("--run-id", metavar="ID", help="Name of the run (default: a new time-based id).")
@click.option("--stage", "stages", metavar="NAME", multiple=True,
              help="Run this stage and whatever it needs upstream (repeatable).")
@click.option("-j", "--jobs", type=JOBS, default=1, show_default=True, metavar="N",
              help="Independent stages run in parallel up to this many.")
@click.option("--force", is_flag=True, help="Re-execute stages even when identical work exists.")
@click.option("--items", "items_file", metavar="FILE",
              help="Take every item listed in FILE (one id a line) through the stages that use "
                   "{item}.")
@click.option("--execution-mode", type=click.Choice(["production", "sampling"]),
              default="production", show_default=True,
              help="sampling: non-critical checks warn, systemic failures abort the run.")
@click.option("--systemic-min-items", type=click.IntRange(min=1), default=20, show_default=True,
              metavar="N",
              help="Sampling mode: items processed before systemic detection starts.")
@click.option("--systemic-threshold", type=FiniteRange(0, 1), default=0.80, show_default=True,
              metavar="R",
              help="Sampling mode: abort when more than this ratio of processed items failed at "
                   "one infrastructure stage.")
@click.option("--max-consecutive-failures", type=click.IntRange(min=1), default=None,
              metavar="N",
              help="Item runs: after N failures of a stage in a row, fail later items fast at "
                   "that stage until a probe item succeeds.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True,
              help="json: every progress event as a JSON line on stderr (also when not a "
                   "terminal).")
@click.option("-q", "--quiet", "quiet_here", is_flag=True, help="No progress output.")
@click.option("--remote", "remote_name", metavar="NAME",
              help="Also reuse results from this remote (pulling their outputs) instead of "
                   "executing.")
@click.option("--push", is_flag=True, help="Push each stage's result to --remote as it commits.")
@click.option("--strict", is_flag=True,
              help="Refuse to run (exit 2) when `stagestore check` has warnings.")
@click.option("--executor", type=click.Choice(["local", "dask"]), default="local",
              show_default=True,
              help="Where items run: local (threads here, up to --jobs), or dask (one Dask task "
                   "per item; with --items; needs stagestore[dask]).")
@click.option("--scheduler", "address", metavar="ADDRESS",
              help="With --executor dask: the scheduler (tcp://HOST:PORT) of a cluster sharing "
                   "the store's filesystem; default: a local cluster of --jobs worker processes "
                   "(one per CPU when --jobs is 1).")
@json_option
def run(pipeline_file: str | None, store_dir: str | None, run_id: str | None,
        stages: tuple[str, ...], jobs: int, force: bool, items_file: str | None,
        execution_mode: str, systemic_min_items: int, systemic_threshold: float,
        max_consecutive_failures: int | None, log_format: str, quiet_here: bool,
        remote_name: str | None, push: bool, strict: bool, executor: str,
        address: str | None, as_json: bool) -> None:
    """Run the pipeline's stages in dependency order, reusing identical work.

    Prints the run id.  Exit 0 when every stage (and item) succeeded; 1 when a stage or an
    item failed (its downstream is not run; independent branches and other items finish); 3
    when a systemic failure aborted the run; 4 when it completed degraded (a fallback was
    used); 2 on a usage or pipeline error.
    """
    from ..pipeline.items import read_items
    from ..pipeline.model import load_pipeline
    from ..model.records import ExecutionOptions
    from ..execution.runner import run as run_pipeline
    from ..store.store import Store

    scheduler = _scheduler(executor, address, items_file, remote_name, push)
    pipeline = load_pipeline(pipeline_file)
    pipeline.check_stage_names(stages)  # before the store is created
    if any(spec.kind is not None for spec in pipeline.stages.values()):
        _compatibility(pipeline, strict)
    items = read_items(items_file) if items_file is not None else None
    execution = ExecutionOptions(mode=execution_mode,  # type: ignore[arg-type]
                                 systemic_min_items=systemic_min_items,
                                 systemic_threshold=systemic_threshold,
                                 max_consecutive_failures=max_consecutive_failures)
    store = Store.create(store_root(store_dir, str(pipeline.path)))
    _warn_network_filesystem(store)
    quiet = quiet_here or is_quiet()
    if log_format == "json" and not quiet:
        progress = render.JsonLogProgress()
    else:
        progress = render.RunProgress() if (show_live() and not quiet_here) else None
    try:
        report = run_pipeline(pipeline, store, run_id=run_id, stages=stages, jobs=jobs,
                              force=force, items=items, execution=execution, progress=progress,
                              remote=remote_name, push=push, scheduler=scheduler)
    except ItemsNeededError as exc:
        exc.hint = "pass --items FILE with one item id a line"
        raise
    render.run_report(report, as_json=as_json, log_json=log_format == "json" and not quiet)
    code = RUN_EXIT_CODES[report.status]
    if report.push is not None and not report.push.ok and code == ExitCode.OK:
        code = ExitCode.FAILED  # the results are safe locally; `stagestore push RUN_ID` sends them
    raise SystemExit(code)


RUN_EXIT_CODES = {"succeeded": ExitCode.OK, "failed": ExitCode.FAILED,
                  "aborted": ExitCode.SYSTEMIC, "degraded": ExitCode.DEGRADED}


def _scheduler(executor: str, address: str | None, items_file: str | None,
               remote_name: str | None, push: bool):  # noqa: ANN202
    """The item scheduler of --executor (None: the local one), its usage errors raised before
    anything is created, with hints naming the flags."""
    from ..errors import UsageError

    if push and remote_name is None:  # said here in the flags' words; the library says it too
        raise UsageError("--push needs --remote NAME", hint="add --remote NAME, or leave out --push")
    if executor != "dask":
        if address is not None:
            raise UsageError("--scheduler needs --executor dask",
                             hint="add --executor dask, or leave out --scheduler")
        return None
    from ..execution.dask import DaskScheduler

    ctx = click.get_current_context().find_object(Ctx)
    scheduler = DaskScheduler(address, debug=bool(ctx and ctx.debug))
    try:
        scheduler.check(items=items_file is not None, remote=remote_name is not None, push=push)
    except UsageError as exc:
        exc.hint = ("pass --items FILE, or leave out --executor dask" if items_file is None else
                    "add --push (or leave out --remote: workers then share the store)")
        raise
    return scheduler


def _compatibility(pipeline, strict: bool) -> None:  # noqa: ANN001
    """Print the kinds' compatibility warnings; with `strict`, the library refuses (exit 2)."""
    from ..inspection.plan import compatibility_warnings

    for warning in compatibility_warnings(pipeline):
        click.echo(f"warning: {warning.message}", err=True)
    if strict:
        compatibility_warnings(pipeline, strict=True)


@cli.command()
@pipeline_option
@click.option("--strict", is_flag=True, help="Exit 2 when there are warnings, too.")
@json_option
def check(pipeline_file: str | None, strict: bool, as_json: bool) -> None:
    """Validate the pipeline without running anything, and print the compatibility warnings
    of its built-in kinds (compressing encrypted data, compressing or encrypting twice).

    Checks the file, that every input exists, and the keys of encrypt and decrypt stages.
    Exit 0 when there are only warnings; 2 for a validation error or, with --strict, a warning.
    """
    from ..pipeline.model import load_pipeline
    from ..inspection.plan import check as check_pipeline

    report = check_pipeline(load_pipeline(pipeline_file))
    render.check_report(report, as_json=as_json)
    raise SystemExit(2 if report.errors or (strict and report.warnings) else 0)


@cli.command()
@pipeline_option
@store_option
@json_option
def plan(pipeline_file: str | None, store_dir: str | None, as_json: bool) -> None:
    """What a run would do per stage, run, reuse or pass through, and for a stage that would
    run, estimates of its peak memory, CPU cores, disk and duration.

    Estimates come from the input sizes and what earlier runs of the same stage measured, or
    stated defaults for a built-in kind with no history (docs/kinds.md).  Stores nothing.
    """
    from ..inspection.plan import plan as plan_pipeline

    render.plan_report(plan_pipeline(*pipeline_and_store(pipeline_file, store_dir)),
                       as_json=as_json)


def _warn_network_filesystem(store) -> None:  # noqa: ANN001
    from ..inspection.doctor import network_filesystem_warning

    warning = network_filesystem_warning(store)
    if warning is not None:
        click.echo(f"warning: {warning}", err=True)


@cli.command()
@click.argument("run_id")
@click.option("--csv", "csv_dir", metavar="DIR",
              help="Also write each table as DIR/<table>.csv.")
@pipeline_option
@store_option
@json_option
def report(run_id: str, csv_dir: str | None, pipeline_file: str | None, store_dir: str | None,
           as_json: bool) -> None:
    """Failure tables of a run: by stage, build failures by class, infrastructure, per item.

    Counts each failed item's first failure once.  Build failure percentages are over
    taxonomy-eligible (build) failures only; infrastructure failures are counted apart.
    """
    from ..inspection.report import failure_report

    result = failure_report(open_store(store_dir, pipeline_file), run_id)
    if csv_dir is not None:
        for path in render.write_report_csv(result, csv_dir):
            if not as_json:
                click.echo(f"wrote {path}", err=True)
    render.failure_report(result, as_json=as_json)


@cli.command()
@click.argument("run_ids", nargs=-1, metavar="[RUN_ID]...")
@click.option("--remote", "remote_name", metavar="NAME",
              help="Check this remote instead of the local store.")
@click.option("--sample", type=FiniteRange(0, 100, min_open=True), default=100.0,
              metavar="PERCENT",
              help="With --remote: re-hash this percentage of the remote's objects, chosen at "
                   "random (default: all).  Manifests and references are always all checked.")
@pipeline_option
@store_option
@json_option
def verify(run_ids: tuple[str, ...], remote_name: str | None, sample: float,
           pipeline_file: str | None, store_dir: str | None, as_json: bool) -> None:
    """Re-hash objects and cross-check every manifest; repair nothing.

    With RUN_IDs, checks those runs and the objects they reference; without, the whole store.
    With --remote NAME, the same for a remote: its objects, and every object its manifests
    name.  Exit 0 clean (warnings allowed), 1 when a problem is found.
    """
    from ..inspection.verify import verify as verify_store

    store = open_store(store_dir, pipeline_file)
    if remote_name is not None:
        from ..remote.audit import verify_remote

        report = verify_remote(store, remote_name, run_ids, sample=sample)
        render.verify_report(report, as_json=as_json)
        raise SystemExit(0 if report.ok else 1)
    if sample != 100.0:
        from ..errors import UsageError

        raise UsageError("--sample applies to --remote only")
    progress = render.BytesProgress("verifying") if show_live() else None
    try:
        report = verify_store(store, run_ids, progress=progress)
    finally:
        if progress:
            progress.close()
    render.verify_report(report, as_json=as_json)
    raise SystemExit(0 if report.ok else 1)


@cli.command()
@click.option("--run-id", metavar="ID", help="Complete only this run.")
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
@click.option("-j", "--jobs", type=JOBS, default=1, show_default=True, metavar="N",
              help="Stages of interrupted runs run in parallel up to this many.")
@pipeline_option
@store_option
@json_option
def recover(run_id: str | None, dry_run: bool, jobs: int, pipeline_file: str | None,
            store_dir: str | None, as_json: bool) -> None:
    """Remove orphaned temps and complete interrupted runs, as they were defined.

    Re-hashes every object (as verify does) and plans from what it finds: orphaned temps and
    damaged objects are removed, manifests naming them are redone.  Idempotent: a second call
    after a successful one does nothing.  Exit 0 when the store ends clean, 1 when something
    could not be completed.
    """
    from ..inspection.recover import recover as recover_store

    store = open_store(store_dir, pipeline_file)
    live = show_live()
    hashing = render.BytesProgress("checking") if live else None
    try:
        report = recover_store(store, run_id=run_id, dry_run=dry_run, jobs=jobs,
                               progress=render.RunProgress() if live else None,
                               hash_progress=hashing)
    finally:
        if hashing:
            hashing.close()
    render.recover_report(report, as_json=as_json)
    raise SystemExit(0 if report.ok else 1)


@cli.command()
@click.argument("run_a")
@click.argument("run_b")
@click.option("--stage", metavar="NAME", help="Only this stage.")
@click.option("--item", metavar="ITEM", help="In item runs: only this item (and the stages that "
              "run once).")
@pipeline_option
@store_option
@json_option
def diff(run_a: str, run_b: str, stage: str | None, item: str | None, pipeline_file: str | None,
         store_dir: str | None, as_json: bool) -> None:
    """What changed between two runs, per stage, and why (config, inputs, outputs).

    In item runs each item's stages are compared too, matched by item id."""
    from ..inspection.diff import diff_runs

    report = diff_runs(open_store(store_dir, pipeline_file), run_a, run_b, stage=stage,
                       item=item)
    render.diff_report(report, as_json=as_json)


_item_option = click.option("--item", metavar="ITEM",
                            help="In an item run: the item whose stage to show.")


@cli.command()
@click.argument("run_id")
@click.argument("stage", required=False)
@_item_option
@pipeline_option
@store_option
@json_option
def show(run_id: str, stage: str | None, item: str | None, pipeline_file: str | None,
         store_dir: str | None, as_json: bool) -> None:
    """Show a run's stages, or with STAGE one stage's manifest (--json: the manifest itself)."""
    from ..inspection.status import show_run, show_stage

    store = open_store(store_dir, pipeline_file)
    if stage is None:
        render.run_detail(show_run(store, run_id), as_json=as_json)
    else:
        render.manifest(show_stage(store, run_id, stage, item), as_json=as_json)


@cli.command()
@pipeline_option
@store_option
@json_option
def runs(pipeline_file: str | None, store_dir: str | None, as_json: bool) -> None:
    """List the runs in the store, oldest first."""
    from ..inspection.status import list_runs

    render.runs_report(list_runs(open_store(store_dir, pipeline_file)), as_json=as_json)


@cli.command()
@pipeline_option
@store_option
@json_option
def status(pipeline_file: str | None, store_dir: str | None, as_json: bool) -> None:
    """Which stages a run would execute now, and why.  Stores nothing."""
    from ..inspection.status import status as pipeline_status

    render.status_report(pipeline_status(*pipeline_and_store(pipeline_file, store_dir)),
                         as_json=as_json)


@cli.command()
@click.argument("run_id")
@click.argument("stage")
@click.option("--to", "dest", required=True, metavar="DIR",
              help="Folder to write each output into, as DIR/NAME.")
@_item_option
@pipeline_option
@store_option
def checkout(run_id: str, stage: str, dest: str, item: str | None, pipeline_file: str | None,
             store_dir: str | None) -> None:
    """Copy a stage's outputs out of the store as DIR/NAME; never writes outside DIR."""
    from ..inspection.checkout import checkout as checkout_outputs

    for path in checkout_outputs(open_store(store_dir, pipeline_file), run_id, stage, dest,
                                 item=item):
        click.echo(path)


@cli.command()
@click.argument("run_id")
@click.argument("stage")
@_item_option
@pipeline_option
@store_option
@json_option
def logs(run_id: str, stage: str, item: str | None, pipeline_file: str | None,
         store_dir: str | None, as_json: bool) -> None:
    """Print the stored stdout and stderr of each attempt of a stage."""
    from ..inspection.status import stage_logs

    render.logs(stage_logs(open_store(store_dir, pipeline_file), run_id, stage, item),
                as_json=as_json)


@cli.command()
@click.argument("run_ids", nargs=-1, required=True, metavar="RUN_ID...")
@pipeline_option
@store_option
def forget(run_ids: tuple[str, ...], pipeline_file: str | None, store_dir: str | None) -> None:
    """Remove runs' manifests, so gc can reclaim what only they referenced."""
    from ..inspection.gc import forget as forget_runs

    report = forget_runs(open_store(store_dir, pipeline_file), run_ids)
    for run_id in report.forgotten:
        click.echo(f"forgot run {run_id}")


@cli.command()
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@click.option("--timeout", type=SECONDS, default=None, metavar="SECONDS",
              help="Give up if runs still hold the store after this long (default: wait).")
@click.option("--remote", "remote_name", metavar="NAME",
              help="Collect this remote's unreferenced objects instead of the local store's.")
@click.option("--grace", "grace_hours", type=SECONDS, default=24.0, show_default=True,
              metavar="HOURS", help="With --remote: keep unreferenced objects younger than this "
              "(a push in flight sends objects before its manifests).")
@pipeline_option
@store_option
@json_option
def gc(dry_run: bool, timeout: float | None, remote_name: str | None, grace_hours: float,
       pipeline_file: str | None, store_dir: str | None, as_json: bool) -> None:
    """Delete objects that no manifest references.  Safe while runs are in flight: gc waits
    for them to finish before it decides what is garbage.  With --remote NAME, the remote's
    objects that no remote manifest or record names and that are older than --grace."""
    from ..inspection.gc import gc as collect
    from ..inspection.gc import store_busy

    store = open_store(store_dir, pipeline_file)
    if remote_name is not None:
        from ..remote.audit import gc_remote

        render.remote_gc_report(gc_remote(store, remote_name, grace_hours=grace_hours,
                                          dry_run=dry_run), as_json=as_json)
        return
    if show_live() and store_busy(store):
        click.echo("waiting for running stagestore processes to release the store...", err=True)
    report = collect(store, dry_run=dry_run, timeout=-1 if timeout is None else timeout)
    render.gc_report(report, as_json=as_json)


@cli.command()
@click.option("--out", "out_dir", metavar="DIR", help="Write one NAME.schema.json per record here.")
def schema(out_dir: str | None) -> None:
    """Print (or write) the JSON Schema of every record stagestore stores."""
    import msgspec

    from ..errors import UsageError
    from ..store.schema import schemas, write_schemas

    if out_dir:
        try:
            written = write_schemas(out_dir)
        except UsageError as exc:  # the library names the folder; the CLI, its option too
            raise UsageError(f"--out {exc.message}", hint=exc.hint) from None
        for path in written:
            click.echo(path)
        return
    click.echo(msgspec.json.format(msgspec.json.encode(schemas()), indent=2))


@cli.command()
@pipeline_option
@json_option
def contracts(pipeline_file: str | None, as_json: bool) -> None:
    """For every stage: inputs, outputs, entry and exit criteria, manifest path."""
    from ..inspection.status import contracts as stage_contracts
    from ..pipeline.model import load_pipeline

    render.contracts_report(stage_contracts(load_pipeline(pipeline_file)), as_json=as_json)


@cli.command()
@pipeline_option
@store_option
@json_option
def doctor(pipeline_file: str | None, store_dir: str | None, as_json: bool) -> None:
    """Check the store's health: format, disk, filesystem, locks, temps, runs, records.

    One line per check: ok, warning or problem, with what to do.  Every manifest and record is
    decoded, but no object is re-hashed: `stagestore verify` does that.  Read-only: writes
    nothing, not even a lock file.  Exit 0 when no check found a problem (warnings allowed), 1
    when one did.
    """
    from ..inspection.doctor import doctor as check_store
    from ..store.store import Store

    report = check_store(Store.open(store_root(store_dir, pipeline_file), readonly=True))
    render.doctor_report(report, as_json=as_json)
    raise SystemExit(0 if report.ok else 1)


@cli.command()
@click.option("--stage", metavar="NAME", help="Only this stage.")
@click.option("--last", type=click.IntRange(min=1), default=20, show_default=True, metavar="N",
              help="Look at the last N runs.")
@pipeline_option
@store_option
@json_option
def stats(stage: str | None, last: int, pipeline_file: str | None, store_dir: str | None,
          as_json: bool) -> None:
    """Per stage over the last runs: success rate, failures, durations, retries, last failure.

    Read from the run-level and per-item manifests.  Durations (p50, p95; nearest rank) are
    of executed manifests only; reused ones count as succeeded.
    """
    from ..inspection.stats import stage_stats

    report = stage_stats(open_store(store_dir, pipeline_file), stage=stage, last=last)
    render.stats_report(report, as_json=as_json)
