"""Generates docs/cli.md from the commands' own help, so the reference cannot drift."""

from __future__ import annotations

import click

from . import commands, remote  # noqa: F401 - each adds its commands to the group
from .app import cli


def render_cli_reference() -> str:
    lines = ["# CLI reference", "",
             "Generated from `stagestore --help` by `make docs`; a test fails when it is stale.", ""]
    ctx = click.Context(cli, info_name="stagestore", max_content_width=100, terminal_width=100)
    lines += ["## stagestore", "", "```", cli.get_help(ctx), "```", ""]
    for name in sorted(cli.commands):
        command = cli.commands[name]
        sub = click.Context(command, info_name=name, parent=ctx, max_content_width=100,
                            terminal_width=100)
        lines += [f"## stagestore {name}", "", "```", command.get_help(sub), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_cli_reference(), end="")
