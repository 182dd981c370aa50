"""The compress and decompress kinds: zstd, gzip, bz2 and xz, streamed chunk by chunk.

Compressed output is a function of the input bytes, the algorithm and its params only:

- zstd always runs libzstd's multi-threaded mode (`threads >= 1`, never 0).  libzstd's
  single-threaded mode (`threads=0`) cuts blocks differently, so its frames differ from the
  multi-threaded ones, while the multi-threaded mode gives the same bytes for any number of
  workers (measured with libzstd 1.5.7 on 40 MiB at levels 1, 3 and 19 with 1, 2, 4 and 8
  threads, and any write size).  Frames carry a content checksum and no content size.
- gzip writes mtime 0 and no file name (its OS byte is always 255, "unknown").
- bz2 and xz (check CRC64) have no varying header fields.

The same bytes hold for one version of each library; another libzstd, zlib, bzip2 or liblzma
may compress differently.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from .errors import KindError
from .options import COMPRESSION_ALGORITHMS, KindOptions
from .tarstream import restore, source_pieces
from .zstdframes import truncation

MAGIC = {
    "zstd": b"\x28\xb5\x2f\xfd",
    "gzip": b"\x1f\x8b",
    "bz2": b"BZh",
    "xz": b"\xfd7zXZ\x00",
}
# What a damaged or truncated stream raises while it is read, by library.
_CORRUPT = (zstandard.ZstdError, lzma.LZMAError, zlib.error, EOFError, OSError)


def compress(opts: KindOptions, src: Path, dest: Path) -> tuple[int, int]:
    """Compress `src` (a file, or a folder packed as a tar stream) into file `dest`.

    `opts` has its defaults filled in (`with_defaults`).
    """
    pieces, bytes_in = source_pieces(src, opts.chunk_size)
    with open(dest, "xb") as raw:
        with _compressor(opts.algorithm, opts.params, opts.threads, raw) as writer:
            for piece in pieces:
                writer.write(piece)
    return bytes_in, dest.stat().st_size


def decompress(opts: KindOptions, src: Path, dest: Path) -> tuple[int, int]:
    """Decompress file `src` into `dest`: a folder if it holds a packed folder, else a file."""
    if src.is_dir():
        raise KindError(f"decompress takes a file, and {src} is a folder")
    with open(src, "rb") as raw:
        algorithm = _check_format(raw.read(8), opts.algorithm, src)
        if algorithm == "zstd" and (problem := truncation(raw)) is not None:
            raise KindError(f"{src} is damaged or truncated zstd data: {problem}")
        raw.seek(0)
        with _decompressor(algorithm, raw) as reader:
            bytes_out = restore(_read_checked(reader, algorithm, opts.chunk_size), dest,
                                opts.chunk_size)
    return src.stat().st_size, bytes_out


def detect(head: bytes) -> str | None:
    """The compression format whose magic bytes `head` starts with, or None."""
    for algorithm, magic in MAGIC.items():
        if head.startswith(magic):
            return algorithm
    return None


def _check_format(head: bytes, algorithm: str | None, src: Path) -> str:
    found = detect(head)
    if found is None:
        start = f"starts with {head[:6].hex(' ')}" if head else "is empty"
        raise KindError(f"{src} is not {algorithm or 'compressed'} data: it {start}, not the "
                        f"magic bytes of {algorithm or ', '.join(COMPRESSION_ALGORITHMS)}")
    if algorithm is not None and found != algorithm:
        raise KindError(f"{src} is {found} data, but algorithm = {algorithm!r}")
    return found


@contextlib.contextmanager
def _compressor(algorithm: str, params: dict[str, Any], threads: int,
                raw: BinaryIO) -> Iterator[BinaryIO]:
    """A writable that compresses into `raw`; leaving the block ends the stream, not `raw`."""
    if algorithm == "zstd":
        # threads >= 1 always: see the module docstring for why 0 would change the bytes.
        context = zstandard.ZstdCompressor(level=params["level"], threads=max(1, threads),
                                           write_checksum=True)
        writer = context.stream_writer(raw, closefd=False)
    elif algorithm == "gzip":
        writer = gzip.GzipFile(filename="", mode="wb", compresslevel=params["level"],
                               fileobj=raw, mtime=0)
    elif algorithm == "bz2":
        writer = bz2.BZ2File(raw, "wb", compresslevel=params["level"])
    else:
        writer = lzma.LZMAFile(raw, "wb", format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                               preset=params["preset"])
    with writer:
        yield writer


def _decompressor(algorithm: str, raw: BinaryIO) -> Any:
    """A readable of the decompressed bytes of `raw` (every frame or member, not only the first)."""
    if algorithm == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                          closefd=False)
    if algorithm == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if algorithm == "bz2":
        return bz2.BZ2File(raw, "rb")
    return lzma.LZMAFile(raw, "rb", format=lzma.FORMAT_XZ)


def _read_checked(reader: BinaryIO, algorithm: str, size: int) -> Iterator[bytes]:
    """The decompressed bytes, `size` at a time; a damaged stream raises `KindError`."""
    while True:
        try:
            piece = reader.read(size)
        except _CORRUPT as exc:
            raise KindError(f"the input is not valid {algorithm} data: {exc}") from None
        if not piece:
            return
        yield piece
