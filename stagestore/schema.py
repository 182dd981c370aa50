"""JSON Schema files for every on-disk record, generated from the msgspec Structs."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from .records import DOCUMENTS


def render_schemas() -> dict[str, bytes]:
    """File name -> schema bytes, one per record type (stable output, for a drift test)."""
    out = {}
    for name, type_ in DOCUMENTS.items():
        schema = msgspec.json.schema(type_)
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["title"] = type_.__name__
        encoded = msgspec.json.encode(schema, order="sorted")
        out[f"{name}.schema.json"] = msgspec.json.format(encoded, indent=2) + b"\n"
    return out


def write_schemas(out_dir: str | os.PathLike[str]) -> list[str]:
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in render_schemas().items():
        path = folder / name
        path.write_bytes(data)
        written.append(str(path))
    return written
