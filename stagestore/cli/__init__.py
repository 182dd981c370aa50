"""The `stagestore` command: a thin layer over the library.

Each command opens the store, makes one library call, renders its report (`--json`: the report
encoded) and exits.  Errors are mapped to messages and exit codes here, in `main`, and nowhere
else.  Library modules are imported inside the commands so `stagestore --help` stays fast.
"""

from __future__ import annotations

import sys


INTERRUPTED_HINT = "`stagestore recover` completes an interrupted run"
DEBUG_HINT = "run again with --debug to see where it happened"


def _cli_hints() -> dict[str, str]:
    """Library hint -> the CLI's: the library speaks of parameters and functions, the CLI of
    its flags and commands."""
    from ..errors import StoreNotFoundError
    from ..inspection.plan import STRICT_HINT
    from ..inspection.status import ITEM_HINT
    from ..pipeline.items import ITEMS_FILE_HINT
    from ..pipeline.model import PIPELINE_FILE_HINT
    from ..remote.audit import VERIFY_REMOTE_HINT
    from ..remote.remotes import REMOTE_NAME_HINT
    from ..store.objects import DAMAGED_REMOTE_OBJECT_HINT
    from ..store.schema import SCHEMA_FOLDER_HINT

    return {
        str(StoreNotFoundError.hint):
            "run a pipeline first, or pass --store DIR (or set STAGESTORE_STORE)",
        PIPELINE_FILE_HINT: "pass -p FILE, or run from the folder holding stagestore.toml",
        ITEMS_FILE_HINT: "pass --items FILE with one item id a line",
        ITEM_HINT: "in an item run, a stage that runs per item needs --item ITEM",
        REMOTE_NAME_HINT: "pass --remote NAME",
        VERIFY_REMOTE_HINT: "run `stagestore verify --remote NAME`",
        DAMAGED_REMOTE_OBJECT_HINT: "run `stagestore verify --remote NAME` to find every damaged "
                                    "remote object; push it again from a store that has it intact",
        SCHEMA_FOLDER_HINT: "pass --out a folder (it is created if it does not exist)",
        STRICT_HINT: "fix them, or run without --strict",
    }


def cli_hint(hint: str | None, cls: type) -> str | None:
    """The hint the CLI prints for an error of class `cls` whose hint is `hint`: the CLI's
    words for a library hint, `DEBUG_HINT` for an error without one (a `UsageError` without
    one gets the command's `--help` instead, from the caller)."""
    from ..errors import UsageError

    if hint is None:
        return None if issubclass(cls, UsageError) else DEBUG_HINT
    return _cli_hints().get(hint, hint)


def command_group():  # noqa: ANN201 - a click.Group; click is imported only here
    """The `stagestore` group with every command on it."""
    from . import commands, remote  # noqa: F401 - each adds its commands to the group
    from .app import cli

    return cli


def main(argv: list[str] | None = None) -> int:
    from ..execution.processes import Terminated, handle_signals
    cli = command_group()
    args = argv if argv is not None else sys.argv[1:]
    debug, as_json = "--debug" in args, "--json" in args
    # SIGTERM and SIGHUP (timeout, docker stop, CI runners, schedulers, a closed terminal) take
    # the path Ctrl-C takes: the stages are killed, nothing false is recorded, recover resumes.
    try:
        with handle_signals():
            cli.main(args=argv, prog_name="stagestore", standalone_mode=False)
    except SystemExit as exc:  # click's own exits (help, usage errors, ctx.exit)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except KeyboardInterrupt:
        return _interrupted(None, as_json)
    except Terminated as exc:
        return _interrupted(exc.signum, as_json)
    except BaseException as exc:  # noqa: BLE001 - the one place errors become exit codes
        return _report_error(exc, debug, argv)
    return 0


def _interrupted(signum: int | None, as_json: bool = False) -> int:
    """The message and exit code of a command stopped by a signal (None: SIGINT, Ctrl-C)."""
    import signal

    by = f" by {signal.Signals(signum).name}" if signum is not None else ""
    code = 128 + (signum if signum is not None else signal.SIGINT)
    try:
        _print_error(f"interrupted{by}", INTERRUPTED_HINT, code, None, as_json)
    except OSError:
        pass  # SIGHUP: the terminal may be gone
    return code


def _report_error(exc: BaseException, debug: bool, argv: list[str] | None = None) -> int:
    """Print `exc` as an `error:` and a `hint:` line (with `--json` in the arguments, as one
    JSON object on stderr) and return its exit code."""
    import click

    from ..errors import ExitCode, StagestoreError, UsageError

    args = list(argv if argv is not None else sys.argv[1:])
    as_json = "--json" in args
    trace: BaseException | None = exc if debug else None
    if isinstance(exc, click.exceptions.Exit):
        return exc.exit_code
    if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):  # a bare group
        exc.show()  # its help, as click prints it
        return exc.exit_code
    if isinstance(exc, click.exceptions.Abort):  # click's wrapper of KeyboardInterrupt
        return _interrupted(None, as_json)
    if isinstance(exc, click.UsageError):  # unknown option, missing argument, bad value
        message, hint, code = (_usage_message(exc), _help_hint(exc.ctx, args), ExitCode.USAGE)
    elif isinstance(exc, click.ClickException):
        message, hint, code = exc.format_message(), _help_hint(None, args), exc.exit_code
    elif isinstance(exc, StagestoreError):
        hint = (cli_hint(exc.hint, type(exc))
                or (_help_hint(None, args) if isinstance(exc, UsageError) else None))
        message, code = exc.message, exc.exit_code
    elif isinstance(exc, PermissionError):
        message, hint, code = (f"permission denied: {exc.filename}",
                               "check the owner and mode of the store and workspace folders",
                               ExitCode.FAILED)
    elif isinstance(exc, OSError) and exc.errno is not None:
        import errno

        where = f": {exc.filename}" if exc.filename else ""
        message, code = f"{exc.strerror}{where}", ExitCode.FAILED
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = ("free some disk space (`stagestore gc` reclaims unreferenced objects), "
                    "then `stagestore recover`")
        else:
            hint = "fix the cause, then `stagestore recover` completes any interrupted run"
    else:
        message = f"internal error: {type(exc).__name__}: {exc}"
        hint = "this is a bug in stagestore; please report it with the traceback"
        code, trace = ExitCode.INTERNAL, exc
    _print_error(message, hint, int(code), trace, as_json)
    return int(code)


def _print_error(message: str, hint: str | None, code: int, trace: BaseException | None,
                 as_json: bool) -> None:
    import traceback

    if as_json:
        import json

        obj: dict[str, object] = {"error": message, "hint": hint, "exit_code": code}
        if trace is not None:
            obj["traceback"] = "".join(traceback.format_exception(trace))
        print(json.dumps(obj), file=sys.stderr)
        return
    if trace is not None:
        traceback.print_exception(trace)
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


def _usage_message(exc) -> str:  # noqa: ANN001 - a click.UsageError
    """click's message, with a lowercase first letter as every other error line has."""
    text = exc.format_message().strip()
    return text[:1].lower() + text[1:] if text[:1].isupper() and text[1:2].islower() else text


def _help_hint(ctx, args: list[str]) -> str:  # noqa: ANN001 - a click.Context or None
    """`see `stagestore CMD --help``, CMD from the failing context, else from the arguments."""
    if ctx is not None and ctx.command_path:
        return f"see `{ctx.command_path} --help`"
    cli = command_group()
    path = ["stagestore"]
    group = cli
    words = iter(args)
    for word in words:
        if word in ("--store",):  # the group's one option that takes a value
            next(words, None)
            continue
        if word.startswith("-"):
            continue
        command = getattr(group, "commands", {}).get(word)
        if command is None:
            break
        path.append(word)
        group = command
        if not hasattr(command, "commands"):
            break
    return f"see `{' '.join(path)} --help`"
