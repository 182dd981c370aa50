"""Item files: the list of items an item run takes through its per-item stages."""

from __future__ import annotations

import os

from ..errors import InvalidNameError, UsageError
from ..store.layout import item_dirname

# Library words; the CLI names its flag instead (`stagestore.cli.cli_hint`).
ITEMS_FILE_HINT = "give a file with one item id a line"


def read_items(path: str | os.PathLike[str]) -> list[str]:
    """One item id a line, in order; blank lines and lines starting with `#` are ignored and
    surrounding whitespace is stripped.  An id that appears twice, or that cannot be stored
    (see `layout.item_dirname`), is an error naming the line."""
    try:
        text = open(path, encoding="utf-8").read()  # noqa: SIM115
    except FileNotFoundError:
        raise UsageError(f"items file {path} not found",
                         hint=ITEMS_FILE_HINT) from None
    except UnicodeDecodeError:
        raise UsageError(f"items file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise UsageError(f"cannot read items file {path}: {exc.strerror}") from None
    items: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        try:
            item_dirname(item)
        except InvalidNameError as exc:
            raise UsageError(f"{path}:{number}: {exc}") from None
        if item in seen:
            raise UsageError(f"{path}:{number}: item {item!r} is listed twice (first on line "
                             f"{seen[item]})", hint="each item id may appear once")
        seen[item] = number
        items.append(item)
    if not items:
        raise UsageError(f"items file {path} lists no items",
                         hint="one item id a line; blank lines and # comments are ignored")
    return items
