"""The `stagestore` command: a thin layer over the library.

Each command opens the store, makes one library call, renders its report (`--json`: the report
encoded) and exits.  Errors are mapped to messages and exit codes here, in `main`, and nowhere
else.  Library modules are imported inside the commands so `stagestore --help` stays fast.
"""

from __future__ import annotations

import sys


INTERRUPTED_HINT = "`stagestore recover` completes an interrupted run"


def main(argv: list[str] | None = None) -> int:
    from ..processes import Terminated, handle_signals
    from .commands import cli

    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    # SIGTERM and SIGHUP (timeout, docker stop, CI runners, schedulers, a closed terminal) take
    # the path Ctrl-C takes: the stages are killed, nothing false is recorded, recover resumes.
    try:
        with handle_signals():
            cli.main(args=argv, prog_name="stagestore", standalone_mode=False)
    except SystemExit as exc:  # click's own exits (help, usage errors, ctx.exit)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except KeyboardInterrupt:
        return _interrupted(None)
    except Terminated as exc:
        return _interrupted(exc.signum)
    except BaseException as exc:  # noqa: BLE001 - the one place errors become exit codes
        return _report_error(exc, debug)
    return 0


def _interrupted(signum: int | None) -> int:
    """The message and exit code of a command stopped by a signal (None: SIGINT, Ctrl-C)."""
    import signal

    by = f" by {signal.Signals(signum).name}" if signum is not None else ""
    try:
        print(f"error: interrupted{by}; {INTERRUPTED_HINT}", file=sys.stderr)
    except OSError:
        pass  # SIGHUP: the terminal may be gone
    return 128 + (signum if signum is not None else signal.SIGINT)


def _report_error(exc: BaseException, debug: bool) -> int:
    import click

    from ..errors import EXIT_INTERNAL, StagestoreError

    if isinstance(exc, click.exceptions.Exit):
        return exc.exit_code
    if isinstance(exc, click.ClickException):
        exc.show()
        return exc.exit_code
    if isinstance(exc, click.exceptions.Abort):  # click's wrapper of KeyboardInterrupt
        return _interrupted(None)
    if isinstance(exc, StagestoreError):
        if debug:
            import traceback

            traceback.print_exception(exc)
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    if isinstance(exc, PermissionError):
        print(f"error: permission denied: {exc.filename}", file=sys.stderr)
        print("hint: check the owner and mode of the store and workspace folders", file=sys.stderr)
        return 1
    if isinstance(exc, OSError) and exc.errno is not None:
        import errno

        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror}{where}", file=sys.stderr)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            print("hint: free some disk space (`stagestore gc` reclaims unreferenced objects), "
                  "then `stagestore recover`", file=sys.stderr)
        else:
            print("hint: fix the cause, then `stagestore recover` completes any interrupted run",
                  file=sys.stderr)
        if debug:
            import traceback

            traceback.print_exception(exc)
        return 1
    import traceback

    print("internal error: this is a bug in stagestore; please report it with the traceback below",
          file=sys.stderr)
    traceback.print_exception(exc)
    return EXIT_INTERNAL
