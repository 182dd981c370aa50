"""The built-in stage kinds: checksum, compress, decompress, encrypt, decrypt, transform,
passthrough (docs/kinds.md).

A self-contained streaming library: `run_kind` turns one input (a file or folder) into one
output with bounded memory, and either writes the whole output or leaves nothing behind.  The
runner calls it in a child process (`python -m stagestore.execution.kindstage`); passthrough never gets
here, because its output is its input object, unchanged.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from .chunks import peak_rss_bytes
from .errors import ChecksumMismatchError, DecryptionError, KindError, ValidationFailureError
from .options import (ALGORITHMS, COMPRESSION_PARAMS, DEFAULT_ALGORITHMS, DEFAULT_CHUNK_SIZE,
                      DEFAULT_WORKERS, KINDS, MAX_CHUNK_SIZE, MAX_WORKERS, MIN_CHUNK_SIZE,
                      KindOptions, KindStats, option_problems, parse_chunk_size, validate,
                      with_defaults)

__all__ = [
    "ALGORITHMS", "COMPRESSION_PARAMS", "DEFAULT_ALGORITHMS", "DEFAULT_CHUNK_SIZE",
    "DEFAULT_WORKERS", "KINDS", "MAX_CHUNK_SIZE", "MAX_WORKERS", "MIN_CHUNK_SIZE",
    "ChecksumMismatchError", "DecryptionError", "KindError", "KindOptions", "KindStats",
    "ValidationFailureError", "key_id", "load_key", "parse_chunk_size", "run_kind", "validate",
    "with_defaults",
]


def run_kind(opts: KindOptions, src: Path, dest: Path, *, key: bytes | None = None,
             workdir: Path | None = None) -> KindStats:
    """Run one built-in kind from `src` (a file or folder) to `dest`, which must not exist.

    Writes `dest` (a file; a folder only when decompress or decrypt restores a packed folder)
    and nothing else.  On any failure `dest` is removed and the error raised: a
    `ValidationFailureError` when the input fails the kind's check, another `KindError` for
    bad options, input or key (an `OSError` while reading or writing becomes a `KindError`).
    `key` is needed by encrypt and decrypt; `workdir` (default: the current folder) is where
    `call` modules and a relative `expect` file are found.
    """
    src, dest = Path(src), Path(dest)
    workdir = Path.cwd() if workdir is None else Path(workdir)
    _check_run(opts, src, dest, key)
    opts = with_defaults(opts)
    started = time.perf_counter()
    try:
        bytes_in, bytes_out = _dispatch(opts, src, dest, key, workdir)
    except OSError as exc:
        _remove_partial(dest)
        raise KindError(f"{opts.kind} failed: {exc}") from exc
    except BaseException:
        _remove_partial(dest)
        raise
    return KindStats(bytes_in=bytes_in, bytes_out=bytes_out,
                     seconds=time.perf_counter() - started, peak_rss_bytes=peak_rss_bytes())


def __getattr__(name: str) -> object:
    """`key_id` and `load_key`, imported on first use: they pull in `cryptography`."""
    if name in ("key_id", "load_key"):
        from . import crypto

        return getattr(crypto, name)
    raise AttributeError(f"module 'stagestore.kinds' has no attribute {name!r}")


def _dispatch(opts: KindOptions, src: Path, dest: Path, key: bytes | None,
              workdir: Path) -> tuple[int, int]:
    # Each kind's module is imported when it runs: checksum needs neither zstandard nor
    # cryptography, and a child process that imports them pays 30 ms for nothing.
    match opts.kind:
        case "checksum":
            from .checksum import checksum

            return checksum(opts, src, dest, workdir)
        case "compress" | "decompress":
            from . import compress

            return getattr(compress, opts.kind)(opts, src, dest)
        case "encrypt" | "decrypt":
            from . import crypto

            return getattr(crypto, opts.kind)(opts, src, dest, key)
        case "transform":
            from .transform import transform

            return transform(opts, src, dest, workdir)
    raise KindError("passthrough is handled by the runner: its output is its input object")


def _check_run(opts: KindOptions, src: Path, dest: Path, key: bytes | None) -> None:
    """Refuse, before anything is written, options, paths or a key that cannot work."""
    if opts.kind not in KINDS:
        raise KindError(f"unknown kind {opts.kind!r} (known: {', '.join(KINDS)})")
    problems = option_problems(opts.kind, opts.algorithm, opts.params,
                               chunk_size=opts.chunk_size, workers=opts.workers, call=opts.call,
                               expect=opts.expect)
    if problems:
        raise KindError("; ".join(problems))
    if opts.kind in ("encrypt", "decrypt") and key is None:
        raise KindError(f"{opts.kind} needs a key: set key_env or key_file")
    if not src.exists():
        raise KindError(f"the input {src} does not exist")
    if os.path.lexists(dest):
        raise KindError(f"the output {dest} already exists; built-in kinds write only new paths")
    if not dest.parent.is_dir():
        raise KindError(f"the output's folder {dest.parent} does not exist")
    folder = dest.parent.resolve()
    if src.is_dir() and (folder == src.resolve() or src.resolve() in folder.parents):
        raise KindError(f"the output {dest} is inside the input folder {src}")


def _remove_partial(dest: Path) -> None:
    if dest.is_dir() and not dest.is_symlink():
        shutil.rmtree(dest)
    elif os.path.lexists(dest):
        dest.unlink()
