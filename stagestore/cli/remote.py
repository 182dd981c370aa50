"""`remote add|list|remove`, `push` and `pull`: the store's remotes (docs/remote.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from . import render
from .app import cli, json_option, open_store, pipeline_option, store_option

REMOTE_HELP = "The remote (default: the only one configured)."


@cli.group()
def remote() -> None:
    """The store's remotes: S3-compatible buckets that stores share runs through."""


@remote.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--endpoint", metavar="URL", help="An S3-compatible server (default: AWS S3).")
@click.option("--region", metavar="R", help="The bucket's region (default: $AWS_REGION, "
              "$AWS_DEFAULT_REGION, else us-east-1).")
@pipeline_option
@store_option
def remote_add(name: str, url: str, endpoint: str | None, region: str | None,
               pipeline_file: str | None, store_dir: str | None) -> None:
    """Add remote NAME at s3://BUCKET/PREFIX, after checking that it can be reached and that
    the server refuses a second create-only write (it is refused otherwise).  Credentials come
    from the AWS environment variables or profile and are never stored."""
    from ..remote.remotes import add_remote
    from ..store.store import Store
    from .app import store_root

    store = Store.create(store_root(store_dir, pipeline_file))  # a fresh machine has none yet
    spec = add_remote(store, name, url, endpoint=endpoint, region=region)
    click.echo(f"added remote {spec.name} ({spec.url}); create-only writes hold")


@remote.command("list")
@pipeline_option
@store_option
@json_option
def remote_list(pipeline_file: str | None, store_dir: str | None, as_json: bool) -> None:
    """List the remotes: name, URL, endpoint and region."""
    from ..remote.remotes import list_remotes

    render.remote_list(list_remotes(open_store(store_dir, pipeline_file)), as_json=as_json)


@remote.command("remove")
@click.argument("name")
@pipeline_option
@store_option
def remote_remove(name: str, pipeline_file: str | None, store_dir: str | None) -> None:
    """Forget remote NAME's settings.  Nothing on the remote is deleted."""
    from ..remote.remotes import remove_remote

    spec = remove_remote(open_store(store_dir, pipeline_file), name)
    click.echo(f"removed remote {spec.name} ({spec.url}); its data was left as it is")


def _transfer_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """`--remote`, `--jobs`, `-p`, `--store` and `--json`: the options of push and pull."""
    for option in reversed([
            click.option("--remote", "remote_name", metavar="NAME", help=REMOTE_HELP),
            click.option("-j", "--jobs", type=click.IntRange(min=1), default=8, metavar="N",
                         show_default=True, help="Transfers at once."),
            pipeline_option, store_option, json_option]):
        func = option(func)
    return func


@cli.command()
@click.argument("run_ids", nargs=-1, metavar="[RUN_ID]...")
@_transfer_options
def push(run_ids: tuple[str, ...], remote_name: str | None, jobs: int,
         pipeline_file: str | None, store_dir: str | None, as_json: bool) -> None:
    """Push runs (default: every run) to a remote: the objects their manifests name that the
    remote lacks, then each manifest with a create-only write, then the run's records.  A
    manifest the remote holds with other content is a conflict (exit 1), never overwritten.
    A failed stage's manifest goes under a name of its own, so the run can still succeed it."""
    from ..remote.transfer import push as push_runs

    report = push_runs(open_store(store_dir, pipeline_file), run_ids, remote=remote_name,
                       jobs=jobs)
    render.push_report(report, as_json=as_json)
    raise SystemExit(0 if report.ok else 1)


@cli.command()
@click.argument("run_ids", nargs=-1, required=True, metavar="RUN_ID...")
@_transfer_options
def pull(run_ids: tuple[str, ...], remote_name: str | None, jobs: int,
         pipeline_file: str | None, store_dir: str | None, as_json: bool) -> None:
    """Pull runs from a remote: their manifests and every object they name, each object
    checked against its BLAKE3 name as it downloads.  On a new machine, `remote add` first
    (it creates the store)."""
    from ..remote.transfer import pull as pull_runs

    report = pull_runs(open_store(store_dir, pipeline_file), run_ids, remote=remote_name,
                       jobs=jobs)
    render.pull_report(report, as_json=as_json)
    raise SystemExit(0 if report.ok else 1)


@remote.command("runs")
@click.argument("name", required=False)
@pipeline_option
@store_option
@json_option
def remote_runs(name: str | None, pipeline_file: str | None, store_dir: str | None,
                as_json: bool) -> None:
    """List the run ids remote NAME (default: the only one) holds."""
    from ..remote.transfer import remote_runs as runs_of

    report = runs_of(open_store(store_dir, pipeline_file), name)
    if as_json:
        render.print_json(report.runs)
    else:
        for run_id in report.runs:
            click.echo(run_id)
