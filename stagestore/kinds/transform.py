"""The transform kind: a user function applied to each chunk of a file, output kept in order.

`call = "module:function"` names a function taking `bytes` and returning a bytes-like object.
It sees one chunk at a time, so it must not rely on chunk boundaries falling anywhere in
particular, and with `parallel` it runs on several threads at once.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from .chunks import fixed_chunks, ordered_map, read_pieces
from .errors import KindError
from .options import KindOptions


def load_function(call: str, workdir: Path) -> Callable[[bytes], object]:
    """Import `module:function` with `workdir` first on `sys.path` (for this import only)."""
    module_name, _, function_name = call.partition(":")
    sys.path.insert(0, str(workdir))
    try:
        module = importlib.import_module(module_name)
        function = getattr(module, function_name)
    except Exception as exc:  # noqa: BLE001 - user code; any failure to import is reported
        raise KindError(f"cannot load transform {call!r}: {type(exc).__name__}: {exc}") from None
    finally:
        sys.path.remove(str(workdir))
    if not callable(function):
        raise KindError(f"transform {call!r} is not a function")
    return function


def transform(opts: KindOptions, src: Path, dest: Path, workdir: Path) -> tuple[int, int]:
    """Write `function(chunk)` for each chunk of file `src`, in order, to `dest`.

    An empty input has no chunks, so the function is not called and `dest` is empty.
    """
    if src.is_dir():
        raise KindError(f"transform takes a file, and {src} is a folder")
    function = load_function(opts.call, workdir)

    def apply(item: tuple[int, bytes]) -> bytes | bytearray | memoryview:
        index, chunk = item
        try:
            result = function(chunk)
        except Exception as exc:  # noqa: BLE001 - user code; report what it raised
            raise KindError(f"transform {opts.call} failed on chunk {index}: "
                            f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(result, (bytes, bytearray, memoryview)):
            raise KindError(f"transform {opts.call} returned {type(result).__name__} for chunk "
                            f"{index}; it must return bytes")
        return result

    bytes_out = 0
    with open(src, "rb") as file, open(dest, "xb") as out:
        chunks = enumerate(fixed_chunks(read_pieces(file, opts.chunk_size), opts.chunk_size))
        for result in ordered_map(apply, chunks, opts.threads):
            bytes_out += out.write(result)
    return src.stat().st_size, bytes_out
