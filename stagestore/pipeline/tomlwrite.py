"""Writing TOML: the small subset `Pipeline.to_toml` needs, exactly (https://toml.io/en/v1.0.0).

Values are written inline (strings, integers, floats, booleans, dates and times, arrays, inline
tables), and a document is made of `[table]` and `[[array.of.tables]]` sections of `key = value`
lines.  Anything TOML cannot hold as it is — `None`, tuples, sets, bytes, integers beyond 64 bits,
lone surrogates — is refused with a `TomlValueError` saying where, rather than written as
something that reads back different.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_INT64 = range(-2**63, 2**63)

# `"` and `\` escaped; every control character too (TOML allows none but tab in a basic string),
# with the short form where TOML has one.
_ESCAPES = {**{code: f"\\u{code:04x}" for code in [*range(0x20), 0x7f]},
            ord('"'): '\\"', ord("\\"): "\\\\", ord("\b"): "\\b", ord("\t"): "\\t",
            ord("\n"): "\\n", ord("\f"): "\\f", ord("\r"): "\\r"}


class TomlValueError(ValueError):
    """A value that TOML cannot hold; `where` is its path in the document (`$.a.b[2]`)."""

    def __init__(self, reason: str, where: str) -> None:
        super().__init__(f"{reason} - at `{where}`")
        self.reason = reason
        self.where = where


def string(text: str, where: str = "$") -> str:
    """A basic string: `"..."`, with quotes, backslashes and control characters escaped."""
    if _SURROGATE_RE.search(text):
        raise TomlValueError("a string holding a lone surrogate is not valid Unicode", where)
    return '"' + text.translate(_ESCAPES) + '"'


def key(name: str, where: str = "$") -> str:
    """A key: bare when it is only letters, digits, `_` and `-`; otherwise a quoted string."""
    if not isinstance(name, str):
        raise TomlValueError(f"a TOML key must be a string, not {type(name).__name__}", where)
    return name if _BARE_KEY_RE.fullmatch(name) else string(name, where)


def value(item: Any, where: str = "$") -> str:
    """`item` as an inline TOML value; nested mappings become inline tables `{ k = v }`."""
    if isinstance(item, str):
        return string(item, where)
    if isinstance(item, bool):  # before int: bool is a subclass of int
        return "true" if item else "false"
    if isinstance(item, int):
        if item not in _INT64:
            raise TomlValueError(f"{item} is beyond TOML's 64-bit integers", where)
        return str(int(item))
    if isinstance(item, float):
        return _float(item)
    if isinstance(item, (dt.date, dt.time)):
        return _datetime(item, where)
    if isinstance(item, list):
        return "[" + ", ".join(value(v, f"{where}[{i}]") for i, v in enumerate(item)) + "]"
    if isinstance(item, Mapping):
        pairs = [f"{key(k, where)} = {value(v, f'{where}.{k}')}" for k, v in item.items()]
        return "{ " + ", ".join(pairs) + " }" if pairs else "{}"
    if item is None:
        raise TomlValueError("None has no TOML form (TOML has no null: leave the key out)", where)
    hint = " (use a list)" if isinstance(item, (tuple, set, frozenset)) else ""
    raise TomlValueError(f"a {type(item).__name__} has no TOML form{hint}", where)


def _float(number: float) -> str:
    if math.isnan(number):
        return "nan"
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    # Python's repr is the shortest text that reads back as the same float, and is a valid
    # TOML float (`1.0`, `1e+16`, `5e-324`) as long as it has a fraction or an exponent.
    return float.__repr__(number)


def _datetime(moment: dt.date | dt.time, where: str) -> str:
    """An offset or local date-time, a local date, or a local time, in RFC 3339 form."""
    if isinstance(moment, dt.time) and moment.tzinfo is not None:
        raise TomlValueError("a time with a time zone has no TOML form", where)
    offset = moment.utcoffset() if isinstance(moment, dt.datetime) else None
    if offset is not None and offset % dt.timedelta(minutes=1):
        raise TomlValueError(f"the UTC offset {offset} has seconds; TOML offsets are in minutes",
                             where)
    return moment.isoformat()


def section(header: Sequence[str], items: Mapping[str, Any], *, array: bool = False) -> str:
    """`[a.b]` (or `[[a.b]]` with `array`) and a `key = value` line per item, with a newline at
    the end; `header` holds the unquoted keys of the table's path."""
    where = "$" + "".join(f".{part}" for part in header)
    dotted = ".".join(key(part, where) for part in header)
    lines = [f"[[{dotted}]]" if array else f"[{dotted}]"]
    lines += [f"{key(k, where)} = {value(v, f'{where}.{k}')}" for k, v in items.items()]
    return "\n".join(lines) + "\n"
