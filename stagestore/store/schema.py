"""JSON Schema files for every on-disk record, generated from the msgspec Structs."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import msgspec

from ..model.records import DOCUMENTS


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


def write_schemas(out_dir: str | os.PathLike[str]) -> list[str]:
    """One NAME.schema.json per record in `out_dir` (created if needed); returns the paths."""
    from ..errors import UsageError

    folder = Path(out_dir)
    hint = "pass --out a folder (it is created if it does not exist)"
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder}: not a folder", hint=hint)
    written = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in render_schemas().items():
            path = folder / name
            path.write_bytes(data)
            written.append(str(path))
    except OSError as exc:
        raise UsageError(f"--out {folder}: cannot write {exc.filename or folder}: "
                         f"{exc.strerror}", hint=hint) from None
    return written
