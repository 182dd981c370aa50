"""Generates docs/errors.md from stagestore/errors.py: the exit codes, and every error class
with its base, exit code and when it happens (its docstring), so the page cannot drift."""

from __future__ import annotations

import importlib

from ..errors import ExitCode, StagestoreError, UsageError
from . import cli_hint

# Every module that defines a `StagestoreError` subclass; tests/test_docs.py checks that no
# other module does.
ERROR_MODULES = ("stagestore.errors", "stagestore.kinds.errors")


def error_classes() -> list[type[StagestoreError]]:
    """`StagestoreError` and its subclasses in `ERROR_MODULES`, depth first, by name."""
    for module in ERROR_MODULES:
        importlib.import_module(module)
    found: list[type[StagestoreError]] = []

    def walk(cls: type[StagestoreError]) -> None:
        if cls.__module__ in ERROR_MODULES and cls not in found:
            found.append(cls)
            for sub in sorted(cls.__subclasses__(), key=lambda c: c.__name__):
                walk(sub)

    walk(StagestoreError)
    return found


def _name(cls: type) -> str:
    if cls.__module__ in ("stagestore.errors", "builtins"):
        return cls.__name__
    return f"{cls.__module__.removeprefix('stagestore.')}.{cls.__name__}"


def _when(cls: type) -> str:
    return " ".join((cls.__doc__ or "").split()).replace("|", "\\|")


def render_error_reference() -> str:
    lines = [
        "# Errors and exit codes", "",
        "Generated from `stagestore/errors.py` by `make docs`; a test fails when it is stale.", "",
        "Every error a user can cause is a `StagestoreError`.  The CLI prints it as two lines on "
        "stderr, `error: ` (what went wrong, and where) and `hint: ` (what to do), and exits "
        "with the class's exit code; with `--json`, as one JSON object on stderr instead: "
        '`{"error": "...", "hint": "...", "exit_code": N}` (stdout stays empty).  `--debug` '
        "adds the traceback.  Anything else is a bug: `internal error`, its traceback, exit 70.",
        "",
        "## Exit codes", "",
        "| code | name | meaning |",
        "|---|---|---|",
    ]
    lines += [f"| {int(code)} | `{code.name}` | {code.meaning} |" for code in ExitCode]
    lines += [
        "", "## Error classes", "",
        "The hint is the class's; a raise site may give a more precise one.", "",
        "| class | base | exit code | when | hint |",
        "|---|---|---|---|---|",
    ]
    for cls in error_classes():
        bases = ", ".join(f"`{_name(base)}`" for base in cls.__bases__)
        code = ExitCode(cls.exit_code)
        hint = (cli_hint(cls.hint, cls) or ("see `stagestore COMMAND --help`"
                                            if issubclass(cls, UsageError) else "-")
                ).replace("|", "\\|")
        lines.append(f"| `{_name(cls)}` | {bases} | {int(code)} `{code.name}` | {_when(cls)} "
                     f"| {hint} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_error_reference(), end="")
