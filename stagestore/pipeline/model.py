"""Loading and validating `stagestore.toml`, and the stage graph it defines."""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec

from ..errors import InvalidNameError, PipelineError, StageNotFoundError
from ..model.records import PipelineDef, PipelineMeta, StageSpec
from ..model.sizes import parse_size
from ..store.layout import validate_name
from . import tomlwrite
from .syntax import Placeholder, check_command, command_template, placeholders

_CALL_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

DEFAULT_PIPELINE_FILE = "stagestore.toml"
# Library words; the CLI names its flag instead (`stagestore.cli.cli_hint`).
PIPELINE_FILE_HINT = ("give the pipeline file's path, or work in the folder holding "
                      "stagestore.toml")

CODE_INPUT = "_code"
"""The implicit input of a `call` stage: the source of the module it calls, when that module
lives in the workspace (`mod.py`, or the package folder `mod/`).  Its name cannot clash with a
declared input, which must start with a letter or digit."""


def code_path(spec: StageSpec, kind: str) -> str:
    """Where a `call` stage's code snapshot came from, relative to the workdir, by its kind."""
    top = (spec.call or "").partition(":")[0].split(".")[0]
    return top if kind == "tree" else f"{top}.py"


def stage_input_paths(spec: StageSpec, workdir: Path) -> dict[str, str]:
    """Every workspace input of a stage: the declared ones, plus a `call` stage's own code."""
    paths = dict(spec.inputs)
    if spec.call is not None:
        top = spec.call.partition(":")[0].split(".")[0]
        if (workdir / top / "__init__.py").is_file():
            paths[CODE_INPUT] = top
        elif (workdir / f"{top}.py").is_file():
            paths[CODE_INPUT] = f"{top}.py"
    return paths


def uses_item(spec: StageSpec) -> bool:
    """The stage names `{item}` in its command, a check's command or an input path, or says
    `per_item = true`.  A check's verdict can depend on the item, so such a stage runs per item
    too and its item enters the key."""
    if spec.per_item:
        return True
    texts = [*command_template(spec), *spec.inputs.values(),
             *(text for check in spec.checks if check.cmd is not None
               for text in check_command(check))]
    return any(ref.kind == "item" for text in texts for ref in _safe_placeholders(text))


def _safe_placeholders(text: str) -> list[Placeholder]:
    try:
        return placeholders(text)
    except ValueError:
        return []


def item_stages(stages: dict[str, StageSpec]) -> set[str]:
    """Stages that run once per item: those using `{item}` and everything downstream of them."""
    found: set[str] = set()
    for name in topological_order(stages):
        spec = stages[name]
        if uses_item(spec) or any(up in found for up in spec.upstream):
            found.add(name)
    return found


class Pipeline:
    """A pipeline: its definition, its file and workdir, and the stage graph.

    `load_pipeline` returns one read from a file.  `Pipeline("docs")` starts an empty one in
    Python, for programs that generate pipelines: `stage` adds stages, `validate` checks the
    whole as a file is checked, `to_toml`, `write` and `from_toml` convert to and from
    `stagestore.toml` text.  Two pipelines are equal when their definitions are; where their
    files live does not count.  A pipeline is not hashable, since `stage` changes it.
    """

    def __init__(self, name_or_definition: str | PipelineDef,
                 path: str | os.PathLike[str] | None = None,
                 workdir: str | os.PathLike[str] | None = None, display: str | None = None, *,
                 version: str = "1") -> None:
        """From a definition, or from a name: an empty pipeline at `version` (used only then).

        The workdir, which input paths are relative to, defaults to the folder of `path`, else
        the current folder; `path` defaults to `stagestore.toml` in the workdir and need not
        exist.  `display` is how error messages name the pipeline (default: its path).
        """
        self.path, self.workdir = _locate(path, workdir)
        if isinstance(name_or_definition, str):
            display = display or f"pipeline {name_or_definition!r} (built in Python)"
            name_or_definition = _new_definition(name_or_definition, version, display,
                                                 str(self.path))
        self.definition = name_or_definition
        self.display = display or str(self.path)
        self.validated = False  # set by `validate_pipeline`; `run` validates a pipeline once

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Pipeline):
            return NotImplemented
        return self.definition == other.definition

    def __repr__(self) -> str:
        return f"<Pipeline {self.name!r} version {self.version!r} stages={list(self.stages)}>"

    @property
    def name(self) -> str:
        return self.definition.pipeline.name

    @property
    def version(self) -> str:
        return self.definition.pipeline.version

    @property
    def stages(self) -> dict[str, StageSpec]:
        return self.definition.stages

    def stage(self, name: str, **keys: Any) -> Pipeline:
        """Add stage `name` with the keys of its `[stages.NAME]` table, and return the pipeline.

        Names and types are checked here, as in a file (`classify` and `checks` may be given as
        dicts or as records); how stages fit together is checked by `validate`.
        """
        try:
            validate_name(name, "stage name")
        except InvalidNameError as exc:
            raise self._error(str(exc), name) from None
        if name in self.stages:
            raise self._error(f"stage {name!r} is already defined", name)
        spec = _convert_stage(name, keys, self.display, str(self.path))
        try:
            _stage_sections(name, spec)  # refuse now a value `to_toml` could not write
        except tomlwrite.TomlValueError as exc:
            raise self._toml_error(exc, name) from None
        self.definition = msgspec.structs.replace(self.definition,
                                                  stages={**self.stages, name: spec})
        self.validated = False
        return self

    def validate(self, *, check_inputs: bool = True) -> Pipeline:
        """Check the pipeline as `load_pipeline` checks a file (inputs exist, with
        `check_inputs`), and return it; raises `PipelineError`."""
        validate_pipeline(self, check_inputs=check_inputs)
        return self

    def to_toml(self) -> str:
        """The definition as `stagestore.toml` text: `[pipeline]`, then a `[stages.NAME]` table
        per stage with the keys that differ from their defaults.  Not validated (see
        `validate`); `from_toml` reads it back as an equal pipeline."""
        meta = msgspec.structs.asdict(self.definition.pipeline)
        try:
            sections = [tomlwrite.section(["pipeline"], meta)]
            for name, spec in self.stages.items():
                sections += _stage_sections(name, spec)
        except tomlwrite.TomlValueError as exc:
            raise self._toml_error(exc) from None
        return "\n".join(sections)

    def write(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write `to_toml()` to `path` (default: the pipeline's own file) and return where.

        The text goes to a temp file beside it that then replaces it, so a failure leaves the
        old file or the new one, never part of one.
        """
        target = Path(path) if path is not None else self.path
        text = self.to_toml()
        temp = target.with_name(f".{target.name}.{os.urandom(4).hex()}.tmp")
        try:
            with open(temp, "x", encoding="utf-8", newline="\n") as file:
                file.write(text)
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return target

    @classmethod
    def from_toml(cls, text: str, *, workdir: str | os.PathLike[str] | None = None,
                  path: str | os.PathLike[str] | None = None,
                  check_inputs: bool = True) -> Pipeline:
        """Read `stagestore.toml` text and validate it, as `load_pipeline` reads a file.

        `workdir` and `path` are as for `Pipeline(...)`; messages name `path`, or `<TOML text>`.
        """
        display = str(Path(path)) if path is not None else "<TOML text>"
        # surrogatepass: a lone surrogate then fails _decode's UTF-8 check, which names its line
        definition = _decode(text.encode("utf-8", "surrogatepass"), display)
        return cls(definition, path, workdir, display=display).validate(check_inputs=check_inputs)

    def order(self) -> list[str]:
        """Stages in dependency order; ties keep the order of the file."""
        return topological_order(self.stages)

    def item_stages(self) -> set[str]:
        return item_stages(self.stages)

    def check_stage_names(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self.stages:
                raise StageNotFoundError(
                    f"unknown stage {name!r} in {self.path.name}; valid stages: "
                    + ", ".join(self.stages))

    def closure(self, selected: Iterable[str]) -> list[str]:
        """`selected` plus every stage they need upstream, in dependency order."""
        selected = list(selected)
        self.check_stage_names(selected)
        needed: set[str] = set()
        pending = list(selected)
        while pending:
            name = pending.pop()
            if name not in needed:
                needed.add(name)
                pending.extend(self.stages[name].upstream)
        return [name for name in self.order() if name in needed]

    def input_path(self, relpath: str) -> Path:
        return self.workdir / relpath

    def _error(self, message: str, stage: str) -> PipelineError:
        return PipelineError(f"{self.display}: {message} - at `$.stages.{stage}`",
                             path=str(self.path), stage=stage)

    def _toml_error(self, exc: tomlwrite.TomlValueError,
                    stage: str | None = None) -> PipelineError:
        return PipelineError(f"{self.display}: cannot write as TOML: {exc}", path=str(self.path),
                             stage=stage)


def _locate(path: str | os.PathLike[str] | None,
            workdir: str | os.PathLike[str] | None) -> tuple[Path, Path]:
    """The pipeline file and the workdir, made absolute, with their defaults filled in."""
    folder = Path(workdir).absolute() if workdir is not None else None
    if path is not None:
        file = Path(path).absolute()
        return file, folder or file.parent
    folder = folder or Path.cwd()
    return folder / DEFAULT_PIPELINE_FILE, folder


def _new_definition(name: str, version: str, display: str, path: str) -> PipelineDef:
    """The definition of an empty pipeline, its `[pipeline]` table type-checked as in a file."""
    try:
        meta = msgspec.convert({"name": name, "version": version}, PipelineMeta)
    except msgspec.ValidationError as exc:
        raise PipelineError(f"{display}: {_with_key(str(exc), '.pipeline')}", path=path) from None
    return PipelineDef(pipeline=meta)


def _convert_stage(name: str, table: dict[str, Any], display: str, path: str) -> StageSpec:
    """A `[stages.NAME]` table as a `StageSpec`, with `_decode`'s message when it does not fit."""
    try:
        return msgspec.convert(table, StageSpec)
    except msgspec.ValidationError as exc:
        hint = None
        if _UNKNOWN_FIELD_RE.search(str(exc)):
            hint = "valid stage keys: " + ", ".join(StageSpec.__struct_fields__)
        raise PipelineError(f"{display}: {_with_key(str(exc), f'.stages.{name}')}", path=path,
                            stage=name, hint=hint) from None


def _stage_sections(name: str, spec: StageSpec) -> list[str]:
    """`[stages.NAME]` with the stage's own keys, then a `[[stages.NAME.classify]]` and a
    `[[stages.NAME.checks]]` table per rule and check: after the stage's keys, which would
    otherwise belong to the last of those tables."""
    keys = _explicit_fields(spec)
    arrays = {field: keys.pop(field, []) for field in ("classify", "checks")}
    sections = [tomlwrite.section(["stages", name], keys)]
    for field, records in arrays.items():
        sections += [tomlwrite.section(["stages", name, field], _explicit_fields(record),
                                       array=True) for record in records]
    return sections


def _explicit_fields(record: msgspec.Struct) -> dict[str, Any]:
    """A record's required fields and those that differ from their defaults, by TOML name."""
    fields = {}
    for field in msgspec.structs.fields(record):
        value = getattr(record, field.name)
        default = (field.default if field.default_factory is msgspec.NODEFAULT
                   else field.default_factory())
        if field.required or value != default:
            fields[field.encode_name] = value
    return fields


def topological_order(stages: dict[str, StageSpec]) -> list[str]:
    """Stages in waves: first every stage with no upstream, then every stage whose upstream
    stages are all placed, and so on; file order within a wave. O(stages + edges) but for the
    sort of each wave."""
    position = {name: i for i, name in enumerate(stages)}
    waiting = {name: len(set(spec.upstream) & stages.keys()) for name, spec in stages.items()}
    downstream: dict[str, list[str]] = {name: [] for name in stages}
    for name, spec in stages.items():
        for up in set(spec.upstream) & stages.keys():
            downstream[up].append(name)
    wave = [name for name, count in waiting.items() if count == 0]
    order: list[str] = []
    while wave:
        wave.sort(key=position.__getitem__)
        order.extend(wave)
        following = []
        for name in wave:
            for down in downstream[name]:
                waiting[down] -= 1
                if waiting[down] == 0:
                    following.append(down)
        wave = following
    if len(order) < len(stages):
        placed = set(order)
        raise _cycle_error({name: set(spec.upstream) - placed for name, spec in stages.items()
                            if name not in placed})
    return order


def _cycle_error(remaining: dict[str, set[str]]) -> PipelineError:
    # Every stage left waits on another stage left; walk upstream edges from any of them until
    # a stage repeats: that is a cycle.
    start = next(iter(remaining))
    path = [start]
    seen = {start: 0}
    while True:
        nxt = min(remaining[path[-1]])
        if nxt in seen:
            cycle = list(reversed(path[seen[nxt]:] + [nxt]))  # each stage feeds the next
            return PipelineError(
                "dependency cycle: " + " -> ".join(cycle), stage=cycle[-1], key="upstream",
                hint=f"a stage cannot depend on itself through others: remove {cycle[-2]!r} "
                     f"from the `upstream` of stage {cycle[-1]!r} (or break another link)")
        seen[nxt] = len(path)
        path.append(nxt)


def load_pipeline(path: str | os.PathLike[str] | None = None, *, check_inputs: bool = True) -> Pipeline:
    """Read and validate a pipeline file; every problem is a `PipelineError` naming file and key."""
    file = Path(path if path is not None else DEFAULT_PIPELINE_FILE)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise PipelineError(f"pipeline file {file} not found",
                            hint=PIPELINE_FILE_HINT) from None
    except OSError as exc:
        raise PipelineError(f"cannot read pipeline file {file}: {exc.strerror}") from None
    definition = _decode(data, str(file))
    pipeline = Pipeline(definition, file.absolute(), file.absolute().parent, display=str(file))
    validate_pipeline(pipeline, check_inputs=check_inputs)
    return pipeline


class _TopLevel(msgspec.Struct, forbid_unknown_fields=True):
    """The file's two tables; stages are converted one by one so errors can name the stage."""

    pipeline: PipelineMeta
    stages: dict[str, dict[str, Any]] = {}


_UNKNOWN_FIELD_RE = re.compile(r"unknown field `([^`]*)`")
_AT_RE = re.compile(r" - at `\$([^`]*)`$")


def _decode(data: bytes, file: str) -> PipelineDef:
    try:
        data.decode("utf-8")  # msgspec's own message for this names no line
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise PipelineError(f"{file}: invalid TOML: not UTF-8 (line {line})", path=file,
                            hint="save the file as UTF-8") from None
    try:
        top = msgspec.toml.decode(data, type=_TopLevel)
    except msgspec.ValidationError as exc:
        raise PipelineError(f"{file}: {_with_key(str(exc), '')}", path=file) from None
    except msgspec.DecodeError as exc:
        raise PipelineError(_toml_syntax_error(file, data.decode("utf-8"), str(exc)),
                            path=file) from None
    except ValueError as exc:  # tomllib: an integer of more digits than int() may parse
        raise PipelineError(f"{file}: invalid TOML: {exc}", path=file) from None
    except RecursionError:
        raise PipelineError(f"{file}: invalid TOML: arrays or tables nested too deeply",
                            path=file) from None
    stages = {}
    for name, table in top.stages.items():
        stages[name] = _convert_stage(name, table, file, file)
    return PipelineDef(pipeline=top.pipeline, stages=stages)


def _with_key(message: str, prefix: str) -> str:
    """msgspec's `- at `$...`` made absolute, naming the unknown key itself when there is one."""
    unknown = _UNKNOWN_FIELD_RE.search(message)
    match = _AT_RE.search(message)
    inner = match.group(1) if match else ""
    body = message[:match.start()] if match else message
    where = prefix + inner + (f".{unknown.group(1)}" if unknown else "")
    return f"{body} - at `${where}`" if where else message


_TOML_AT_RE = re.compile(r"\s*\((?:at line (\d+), column (\d+)|at end of document)\)\s*$")


def _toml_syntax_error(file: str, text: str, message: str) -> str:
    """`FILE:LINE:COLUMN: invalid TOML: ...`, by position only: a syntax error has no data
    path, and a guess at one from the lines around it names the wrong key.

    tomllib reports where it gave up, which for an array or inline table left open is a later
    line (`outputs = ["o",` on line 4, then `cmd = ...` on line 5 is reported at line 5); when
    a bracket opened on an earlier line is never closed, that bracket is reported instead."""
    match = _TOML_AT_RE.search(message)
    detail = message[:match.start()] if match else message
    lines = text.split("\n")
    if match and match.group(1):
        line, column = int(match.group(1)), int(match.group(2))
        offset = sum(len(row) + 1 for row in lines[:line - 1]) + column - 1
    else:  # at the end of the document
        line, column, offset = len(lines), len(lines[-1]) + 1, len(text)
    opener = max((i for i in _unclosed_brackets(text) if i < offset), default=None)
    if opener is not None:
        open_line = text.count("\n", 0, opener) + 1
        if open_line < line or not (match and match.group(1)):
            open_column = opener - (text.rfind("\n", 0, opener) + 1) + 1
            what = "array" if text[opener] == "[" else "inline table"
            stopped = (f"line {line}, column {column}" if match and match.group(1)
                       else "the end of the file")
            return (f"{file}:{open_line}:{open_column}: invalid TOML: this {what} is never "
                    f"closed (the parser stopped at {stopped}: {detail})")
    return f"{file}:{line}:{column}: invalid TOML: {detail}"


def _unclosed_brackets(text: str) -> list[int]:
    """Offsets of the `[` and `{` of values that are never closed, skipping strings, comments
    and table headers.  A rough scanner, used only to place an error tomllib already found."""
    stack: list[int] = []
    in_value = False  # after a top-level `key =`, until the end of its line
    i = 0
    while i < len(text):
        ch = text[i]
        if text.startswith(('"""', "'''"), i):
            close = text.find(text[i:i + 3], i + 3)
            i = len(text) if close < 0 else close + 3
            continue
        if ch in "\"'":
            j = i + 1
            while j < len(text) and text[j] not in (ch, "\n"):
                j += 2 if ch == '"' and text[j] == "\\" else 1
            i = j + 1
            continue
        if ch == "#" or (ch in "[{" and not stack and not in_value):  # a comment, a header
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        if ch in "[{":
            stack.append(i)
        elif ch in "]}" and stack:
            stack.pop()
        elif ch == "=" and not stack:
            in_value = True
        elif ch == "\n" and not stack:
            in_value = False
        i += 1
    return stack


def validate_pipeline(pipeline: Pipeline, *, check_inputs: bool = True) -> None:
    file = pipeline.display

    def fail(message: str, stage: str | None = None, key: str | None = None, *,
             hint: str | None = None) -> PipelineError:
        where = "$.pipeline" if stage is None else f"$.stages.{stage}"
        if key:
            where += f".{key}"
        return PipelineError(f"{file}: {message} - at `{where}`", path=str(pipeline.path),
                             stage=stage, key=key, hint=hint)

    if not pipeline.name.strip():
        raise fail("the pipeline name is empty", key="name")
    if not pipeline.stages:
        raise fail("the pipeline has no stages", stage=None, key=None)
    stages = pipeline.stages
    for name, spec in stages.items():
        try:
            validate_name(name, "stage name")
        except InvalidNameError as exc:
            raise fail(str(exc), name) from None
        _validate_stage(name, spec, stages, fail)
        if check_inputs:
            for input_name, relpath in spec.inputs.items():
                if any(ref.kind == "item" for ref in _safe_placeholders(relpath)):
                    continue  # checked per item, when the item starts
                target = pipeline.input_path(relpath)
                try:
                    mode = os.stat(target).st_mode
                except FileNotFoundError:
                    raise fail(f"input {input_name!r}: {relpath} does not exist "
                               f"(relative to {pipeline.workdir})", name, "inputs",
                               hint=f"create {pipeline.workdir / relpath}, or fix input "
                                    f"{input_name!r} under `inputs` of stage {name!r} (paths "
                                    "are relative to the pipeline file's folder)") from None
                except OSError as exc:
                    raise fail(f"input {input_name!r}: cannot read {relpath}: {exc.strerror}",
                               name, "inputs") from None
                if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                    raise fail(f"input {input_name!r}: {relpath} is neither a file nor a folder",
                               name, "inputs")
    try:
        topological_order(stages)
    except PipelineError as exc:
        raise fail(str(exc), exc.stage, "upstream", hint=exc.hint) from None
    pipeline.validated = True


def _validate_stage(name: str, spec: StageSpec, stages: dict[str, StageSpec],
                    fail: Callable[..., PipelineError]) -> None:
    if spec.kind is not None:
        from .kindspec import validate_kind_stage

        validate_kind_stage(name, spec, fail)
    elif (spec.cmd is None) == (spec.call is None):
        raise fail("a stage needs exactly one of `cmd`, `call` or `kind`", name, "cmd")
    if spec.call is not None and spec.kind is None and not _CALL_RE.match(spec.call):
        raise fail(f"`call` must be 'module:function', got {spec.call!r}", name, "call")
    if spec.call is not None and spec.shell:
        raise fail("`shell` applies to `cmd` only", name, "shell")
    if isinstance(spec.cmd, list) and spec.shell:
        raise fail("`shell = true` needs `cmd` as a string", name, "shell")
    for key, names in (("inputs", list(spec.inputs)), ("outputs", spec.outputs)):
        seen = set()
        for item in names:
            try:
                validate_name(item, f"{key[:-1]} name")
            except InvalidNameError as exc:
                raise fail(str(exc), name, key) from None
            if item in seen:
                raise fail(f"{key[:-1]} {item!r} is declared twice", name, key)
            seen.add(item)
    for input_name, relpath in spec.inputs.items():
        if not relpath.strip():
            raise fail(f"input {input_name!r} has an empty path", name, "inputs")
        try:
            refs = placeholders(relpath)
        except ValueError as exc:
            raise fail(f"input {input_name!r}: {exc}", name, "inputs",
                       hint=getattr(exc, "hint", None)) from None
        if any(ref.kind != "item" for ref in refs):
            raise fail(f"input {input_name!r}: an input path may hold only the {{item}} "
                       "placeholder", name, "inputs")
    for up in spec.upstream:
        if up == name:
            raise fail("a stage cannot be its own upstream", name, "upstream")
        if up not in stages:
            raise fail(f"unknown upstream stage {up!r} (stages: {', '.join(stages)})", name,
                       "upstream")
    if len(set(spec.upstream)) != len(spec.upstream):
        raise fail("an upstream stage is listed twice", name, "upstream")
    for item in spec.allow_empty:
        if item not in spec.inputs:
            raise fail(f"allow_empty names {item!r}, which is not an input", name, "allow_empty")
    for key in spec.env:
        if not _ENV_RE.match(key):
            raise fail(f"invalid environment variable name {key!r}", name, "env")
    if spec.timeout is not None and not 0 < spec.timeout < math.inf:  # NaN too
        raise fail("timeout must be a positive, finite number of seconds", name, "timeout")
    if spec.retries < 0:
        raise fail("retries must be 0 or more", name, "retries")
    if not 0 <= spec.retry_delay < math.inf:  # NaN too
        raise fail("retry_delay must be a finite number of seconds, 0 or more", name, "retry_delay")
    try:
        template = command_template(spec)
    except ValueError as exc:
        raise fail(f"cannot split the command: {exc}", name, "cmd") from None
    if spec.cmd is not None and (not template or not template[0].strip()):
        raise fail("the command is empty", name, "cmd")
    _check_templates(template, spec, stages,
                     lambda problem, hint=None: fail(problem, name, "cmd", hint=hint))
    _validate_failure_model(name, spec, stages, fail)


def _check_templates(template: list[str], spec: StageSpec, stages: dict[str, StageSpec],
                     fail: Callable[..., PipelineError]) -> None:
    for arg in template:
        try:
            refs = placeholders(arg)
        except ValueError as exc:
            raise fail(str(exc), hint=getattr(exc, "hint", None)) from None
        for ref in refs:
            problem = _check_placeholder(ref, spec, stages)
            if problem:
                raise fail(problem)


def _validate_failure_model(name: str, spec: StageSpec, stages: dict[str, StageSpec],
                            fail: Callable[..., PipelineError]) -> None:
    """`classify`, `checks` and `disk` (docs/failures.md)."""
    from ..model.failures import CLASS_NAME_RE

    for index, rule in enumerate(spec.classify):
        key = f"classify[{index}]"
        if rule.match is None and rule.exit_code is None:
            raise fail("a classify rule needs `match` (a regular expression searched in stderr), "
                       "`exit_code`, or both", name, key)
        if rule.match is not None:
            try:
                re.compile(rule.match)
            except re.error as exc:
                raise fail(f"`match` is not a valid regular expression: {exc}", name,
                           f"{key}.match") from None
            except (OverflowError, RecursionError):
                raise fail("`match` is too large or nested too deeply for Python's re module",
                           name, f"{key}.match") from None
        if not CLASS_NAME_RE.match(rule.class_):
            raise fail(f"class {rule.class_!r} must be a CamelCase name ending in 'Failure', such "
                       "as 'InfrastructureGateFailure' or 'BuildFailure'", name, f"{key}.class")
    for index, check in enumerate(spec.checks):
        key = f"checks[{index}]"
        if (check.check is None) == (check.cmd is None):
            raise fail("a check needs exactly one of `check` (nonempty, max_bytes, json) or `cmd`",
                       name, key)
        if check.output is not None and check.output not in spec.outputs:
            raise fail(f"check names output {check.output!r}, which the stage does not declare "
                       f"(outputs: {', '.join(spec.outputs) or 'none'})", name, f"{key}.output")
        if check.check is not None and not spec.outputs:
            raise fail(f"check {check.check!r} needs a declared output to check", name, key)
        if (check.check == "max_bytes") != (check.limit is not None):
            raise fail("`limit` goes with `check = \"max_bytes\"`, and max_bytes needs it",
                       name, f"{key}.limit")
        if check.limit is not None:
            try:
                parse_size(check.limit)
            except ValueError as exc:
                raise fail(str(exc), name, f"{key}.limit") from None
        if check.cmd is not None:
            try:
                template = check_command(check)
            except ValueError as exc:
                raise fail(f"cannot split the check command: {exc}", name, f"{key}.cmd") from None
            if not template or not template[0].strip():
                raise fail("the check command is empty", name, f"{key}.cmd")
            _check_templates(template, spec, stages,
                             lambda p, hint=None: fail(p, name, f"{key}.cmd", hint=hint))
    if spec.disk is not None:
        try:
            parse_size(spec.disk)
        except ValueError as exc:
            raise fail(str(exc), name, "disk") from None



def _check_placeholder(ref: Placeholder, spec: StageSpec, stages: dict[str, StageSpec]) -> str | None:
    if ref.kind == "inputs" and ref.name not in spec.inputs:
        return f"{ref.text} names an undeclared input (inputs: {', '.join(spec.inputs) or 'none'})"
    if ref.kind == "outputs" and ref.name not in spec.outputs:
        return f"{ref.text} names an undeclared output (outputs: {', '.join(spec.outputs) or 'none'})"
    if ref.kind == "params" and ref.name not in spec.params:
        return f"{ref.text} names an undeclared param (params: {', '.join(spec.params) or 'none'})"
    if ref.kind == "upstream":
        if ref.stage not in spec.upstream:
            return f"{ref.text} names a stage that is not in this stage's upstream list"
        if ref.stage in stages and ref.name not in stages[ref.stage].outputs:
            return (f"{ref.text} names an output stage {ref.stage!r} does not declare "
                    f"(outputs: {', '.join(stages[ref.stage].outputs) or 'none'})")
    return None
