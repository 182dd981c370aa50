"""Generates docs/api.md from the docstrings of everything in `stagestore.__all__`, so the
Python API reference cannot drift from the code: each name's signature and docstring, grouped
by job (`GROUPS`; a name in no group is an error, so a new one gets a place)."""

from __future__ import annotations

import inspect

import stagestore

# Every public name, by the job it does; the order is the page's.
GROUPS: dict[str, list[str]] = {
    "Pipelines": ["load_pipeline", "Pipeline", "check", "compatibility_warnings", "plan",
                  "status", "contracts"],
    "Stores and runs": ["Store", "run", "list_runs", "show_run", "show_stage", "stage_logs",
                        "failure_report", "stage_stats", "diff_runs", "checkout"],
    "Item runs elsewhere": ["LocalScheduler", "DaskScheduler", "PoolScheduler", "ItemScheduler",
                            "ItemHost"],
    "Integrity and maintenance": ["verify", "recover", "doctor", "forget", "gc"],
    "Remotes": ["add_remote", "list_remotes", "remove_remote", "push", "pull", "remote_runs",
                "verify_remote", "gc_remote"],
    "Record schemas": ["schemas", "write_schemas"],
    "Errors": ["StagestoreError"],
}

# Public methods shown under a class (the rest are the model's own plumbing).
METHODS: dict[str, list[str]] = {
    "Store": ["open", "create"],
    "Pipeline": ["stage", "to_toml", "write", "from_toml", "validate", "order"],
    "ItemScheduler": ["check", "session", "run_items"],
    "ItemHost": ["before", "body", "after", "aborted", "stopping", "stop", "emit", "start",
                 "run_inputs", "replay", "lose"],
}


class _Annotation(str):
    """A string annotation (`from __future__ import annotations`) shown as written, unquoted."""

    def __repr__(self) -> str:
        return str(self)


def _signature(obj: object, name: str) -> str:
    """`name(params) -> result`, on one line, or one parameter a line when that is long."""
    try:
        sig = inspect.signature(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return f"{name}(...)"
    params = [p.replace(annotation=_Annotation(p.annotation))
              if isinstance(p.annotation, str) else p for p in sig.parameters.values()]
    if params and params[0].name == "self":
        params = params[1:]
    result = sig.return_annotation
    if inspect.isclass(obj) or result is inspect.Signature.empty:
        result = inspect.Signature.empty
    elif isinstance(result, str):
        result = _Annotation(result)
    sig = sig.replace(parameters=params, return_annotation=result)
    text = f"{name}{sig}"
    if len(text) <= 96:
        return text
    parts = [str(p) for p in sig.replace(return_annotation=inspect.Signature.empty)
             .parameters.values()]
    # the bare `*` and `/` markers of the one-line form, which `str(Parameter)` does not give
    shown, kw_marked = [], False
    for param, part in zip(sig.parameters.values(), parts, strict=True):
        if param.kind is param.KEYWORD_ONLY and not kw_marked:
            shown.append("*")
            kw_marked = True
        elif param.kind is param.VAR_POSITIONAL:
            kw_marked = True
        shown.append(part)
    tail = "" if sig.return_annotation is inspect.Signature.empty else \
        f" -> {inspect.formatannotation(sig.return_annotation)}"
    return f"{name}(\n" + "".join(f"    {part},\n" for part in shown) + f"){tail}"


def _doc(obj: object) -> str:
    return inspect.getdoc(obj) or ""


def _entry(name: str, obj: object, level: str = "###") -> list[str]:
    kind = "class" if inspect.isclass(obj) else "def"
    lines = [f"{level} `{name}`", "", "```python", f"{kind} {_signature(obj, name)}", "```", ""]
    doc = _doc(obj)
    if doc:
        lines += [doc, ""]
    return lines


def render_api_reference() -> str:
    listed = [name for names in GROUPS.values() for name in names]
    missing = sorted(set(stagestore.__all__) - set(listed))
    extra = sorted(set(listed) - set(stagestore.__all__))
    if missing or extra:
        raise SystemExit(f"apidoc.GROUPS is out of date: missing {missing}, not exported {extra}")
    lines = ["# Python API reference", "",
             "Generated from the docstrings of `stagestore.__all__` by `make docs`; a test fails "
             "when it is stale.", "",
             "Every `stagestore` command is one of these calls (the CLI opens the store, makes "
             "the call, renders the report, exits).  Each returns a report, a msgspec Struct "
             "(`msgspec.json.encode(report)` is what the command's `--json` prints), never prints "
             "or exits, and raises a `StagestoreError` subclass for anything a caller can get "
             "wrong ([errors.md](errors.md) lists them; they live in `stagestore.errors`).", ""]
    for group, names in GROUPS.items():
        lines += [f"- {group}: " + ", ".join(f"`{name}`" for name in names)]
    lines.append("")
    for group, names in GROUPS.items():
        lines += [f"## {group}", ""]
        for name in names:
            obj = getattr(stagestore, name)
            lines += _entry(name, obj)
            for method in METHODS.get(name, []):
                lines += _entry(f"{name}.{method}", getattr(obj, method), "####")
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(render_api_reference(), end="")
