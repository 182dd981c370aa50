"""The small languages inside a pipeline file: `{placeholders}` in commands and input paths,
commands as templates, and sizes (`"512MiB"`)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable

import msgspec

from ..model.records import Check, StageSpec

_PLACEHOLDER_RE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


class Placeholder(msgspec.Struct, frozen=True):
    """A parsed `{...}` reference: kind is inputs, upstream, outputs, params, run_id or item."""

    kind: str
    name: str = ""
    stage: str = ""

    @property
    def text(self) -> str:
        if self.kind in ("run_id", "item"):
            return "{" + self.kind + "}"
        if self.kind == "upstream":
            return f"{{upstream.{self.stage}.{self.name}}}"
        return f"{{{self.kind}.{self.name}}}"


PLACEHOLDERS = ("{inputs.NAME}, {upstream.STAGE.NAME}, {outputs.NAME}, {params.KEY}, {run_id} "
                "and {item}")


class PlaceholderSyntaxError(ValueError):
    """A `{...}` that is no placeholder, or a lone brace; `hint` says what is valid."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


def parse_placeholder(body: str) -> Placeholder:
    parts = body.split(".")
    if parts in (["run_id"], ["item"]):
        return Placeholder(parts[0])
    if len(parts) == 2 and parts[0] in ("inputs", "outputs", "params") and parts[1]:
        return Placeholder(parts[0], parts[1])
    if len(parts) == 3 and parts[0] == "upstream" and parts[1] and parts[2]:
        return Placeholder("upstream", parts[2], parts[1])
    raise PlaceholderSyntaxError(
        f"unknown placeholder {{{body}}}",
        f"the placeholders are {PLACEHOLDERS}; write {{{{ and }}}} for literal braces")


def placeholders(text: str) -> list[Placeholder]:
    found = []
    for match in _PLACEHOLDER_RE.finditer(text):
        if match.group(1) is not None:
            found.append(parse_placeholder(match.group(1)))
    leftover = _PLACEHOLDER_RE.sub("", text)
    if "{" in leftover or "}" in leftover:
        raise PlaceholderSyntaxError(f"unbalanced brace in {text!r}",
                                     "write {{ and }} for literal braces")
    return found


def render(text: str, resolve: Callable[[Placeholder], str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "{{":
            return "{"
        if match.group(0) == "}}":
            return "}"
        return resolve(parse_placeholder(match.group(1)))

    return _PLACEHOLDER_RE.sub(substitute, text)


def command_template(spec: StageSpec) -> list[str]:
    """The stage's command as a list of templates, before placeholders are filled in; for a
    built-in kind (docs/kinds.md), its `input` and `expect`, which name what it reads."""
    if spec.kind is not None:
        return [text for text in (spec.input, spec.expect) if text is not None]
    if spec.cmd is None:
        return []
    if isinstance(spec.cmd, list):
        return list(spec.cmd)
    if spec.shell:
        return [spec.cmd]
    return shlex.split(spec.cmd)


def check_command(check: Check) -> list[str]:
    """A check's command as templates, split like a stage's (a string by shlex, a list as is)."""
    return command_template(StageSpec(cmd=check.cmd))


def render_item_path(relpath: str, item: str) -> str:
    """An input path with `{item}` filled in (the only placeholder an input path may hold)."""
    return render(relpath, lambda ref: item)
