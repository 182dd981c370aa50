"""JSON Schema files for every on-disk record, generated from the msgspec Structs."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import msgspec

from ..model.records import DOCUMENTS

# Library words; the CLI names its flag instead (`stagestore.cli.cli_hint`).
SCHEMA_FOLDER_HINT = "write the schemas into a folder (it is created if it does not exist)"


def render_schemas() -> dict[str, bytes]:
    """File name -> schema bytes, one per record type (stable output, for a drift test)."""
    out = {}
    for name, type_ in DOCUMENTS.items():
        schema = _clean_descriptions(msgspec.json.schema(type_))
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["title"] = type_.__name__
        encoded = msgspec.json.encode(schema, order="sorted")
        out[f"{name}.schema.json"] = msgspec.json.format(encoded, indent=2) + b"\n"
    return out


def _clean_descriptions(node: object) -> object:
    """Docstrings dedented as `inspect.cleandoc` does: msgspec 0.23 does it, 0.22 did not."""
    if isinstance(node, dict):
        return {key: inspect.cleandoc(value) if key == "description" and isinstance(value, str)
                else _clean_descriptions(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_clean_descriptions(value) for value in node]
    return node


def schemas() -> dict[str, Any]:
    """Every record's JSON Schema, by file name (`NAME.schema.json`): what `write_schemas`
    writes, decoded."""
    return {name: msgspec.json.decode(data) for name, data in render_schemas().items()}


def write_schemas(out_dir: str | os.PathLike[str]) -> list[str]:
    """One NAME.schema.json per record in `out_dir` (created if needed); returns the paths.
    Raises `UsageError` when `out_dir` is a file or cannot be written."""
    from ..errors import UsageError

    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder}: not a folder", hint=SCHEMA_FOLDER_HINT)
    written = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in render_schemas().items():
            path = folder / name
            path.write_bytes(data)
            written.append(str(path))
    except OSError as exc:
        raise UsageError(f"{folder}: cannot write {exc.filename or folder}: "
                         f"{exc.strerror}", hint=SCHEMA_FOLDER_HINT) from None
    return written
