"""The `stagestore` command group and what its commands share: options, opening the store.

`commands` and `remote` add their commands to `cli` when imported; `stagestore.cli.main`
imports both.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

PIPELINE_HELP = "The pipeline file (default: stagestore.toml in the current folder)."
STORE_HELP = ("The store folder (default: $STAGESTORE_STORE, else .stagestore beside the "
              "pipeline file).")


class Ctx:
    def __init__(self, store: str | None, quiet: bool, debug: bool) -> None:
        self.store = store
        self.quiet = quiet
        self.debug = debug


def store_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """`--store` accepted after the command too (`stagestore verify --store X`)."""
    return click.option("--store", "store_dir", metavar="DIR", help=STORE_HELP)(func)


def pipeline_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-p", "--pipeline", "pipeline_file", metavar="FILE",
                        default=None, help=PIPELINE_HELP)(func)


def json_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")(func)


class FiniteRange(click.FloatRange):
    """A FloatRange that also refuses nan and inf, which compare false with any bound."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        import math

        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


JOBS = click.IntRange(min=1)
SECONDS = FiniteRange(min=0)


def store_root(store_dir: str | None, pipeline_file: str | None = None) -> str:
    from ..store.store import default_store_root

    ctx = click.get_current_context().find_object(Ctx)
    chosen = store_dir or (ctx.store if ctx else None)
    if chosen:
        return chosen
    return str(default_store_root(pipeline_file or "stagestore.toml"))


def open_store(store_dir: str | None, pipeline_file: str | None = None):  # noqa: ANN202
    from ..store.store import Store

    return Store.open(store_root(store_dir, pipeline_file))


def pipeline_and_store(pipeline_file: str | None, store_dir: str | None):  # noqa: ANN202
    """The loaded pipeline, and its store if one exists (None: nothing has run yet)."""
    from ..errors import StoreNotFoundError
    from ..pipeline.model import load_pipeline
    from ..store.store import Store

    pipeline = load_pipeline(pipeline_file)
    try:
        return pipeline, Store.open(store_root(store_dir, str(pipeline.path)))
    except StoreNotFoundError:
        return pipeline, None


def is_quiet() -> bool:
    ctx = click.get_current_context().find_object(Ctx)
    return bool(ctx and ctx.quiet)


def show_live() -> bool:
    """Live progress only on a terminal, and not with --quiet."""
    return not is_quiet() and sys.stderr.isatty()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="stagestore", prog_name="stagestore")
@click.option("--store", "store_dir", metavar="DIR", envvar="STAGESTORE_STORE", help=STORE_HELP)
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("--debug", is_flag=True, help="Show a traceback with every error.")
@click.pass_context
def cli(ctx: click.Context, store_dir: str | None, quiet: bool, debug: bool) -> None:
    """A content-addressed, crash-safe artifact store for pipelines of stages.

    Exit codes: 0 success; 1 a stage or item failed, or verify or doctor found a problem; 2 a
    usage or pipeline error; 3 a systemic abort; 4 a run completed degraded (a fallback was
    used); 70 an internal error; 129, 130, 143 stopped by SIGHUP, SIGINT (Ctrl-C), SIGTERM.
    Errors are an `error:` and a `hint:` line on stderr (with --json, one JSON object); every
    exit code and error class is in docs/errors.md.
    """
    ctx.obj = Ctx(store_dir, quiet, debug)

