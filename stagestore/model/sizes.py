"""Sizes as pipelines write them (`512MiB`, `2 GB`, or bytes).

Below both the pipeline loader and the built-in kinds, which parse sizes from a stage's
settings; it imports nothing of stagestore, so a kind's child process stays light.
"""

from __future__ import annotations

import re


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def parse_size(value: int | str) -> int:
    """Bytes from an integer or a string such as `512MiB` or `2 GB` (KiB: 1024, KB: 1000)."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative: {value}")
        return value
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(f"not a size: {value!r} (write bytes, or a number with B, KB, MB, GB, "
                         "TB, KiB, MiB, GiB or TiB)")
    size = float(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if not size < _MAX_SIZE:
        raise ValueError(f"size {value!r} is too large (at most 1 EiB)")
    return int(size)


_MAX_SIZE = float(2 ** 60)
