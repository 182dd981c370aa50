"""The checksum kind: a sums file that `sha256sum -c`, `sha512sum -c` and `b3sum -c` read.

One line per file, `<hex>  <relpath>\\n`, sorted bytewise by relpath.  A name holding a newline
or a backslash is written the coreutils way: the line starts with `\\`, and in the name `\\`
becomes `\\\\` and a newline `\\n`.  With `expect`, the computed sums are compared with a sums
file and every difference is reported at once.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import blake3

from .chunks import ordered_map
from .errors import ChecksumMismatchError, KindError
from .options import KindOptions
from .walk import walk

HEX_LENGTHS = {"blake3": 64, "sha256": 64, "sha512": 128}
POOL_MIN_AVERAGE = 1 << 20  # a folder's files are hashed on a thread pool from this mean size


def checksum(opts: KindOptions, src: Path, dest: Path, workdir: Path) -> tuple[int, int]:
    """Write the sums file of `src` (a file or folder) to `dest`; returns (bytes in, bytes out).

    Raises `ChecksumMismatchError` if `opts.expect` names a sums file that differs.
    """
    algorithm = opts.algorithm
    if src.is_dir():
        entries = [entry for entry in walk(src) if not entry.is_dir]
        files = [(entry.relpath, entry.path) for entry in entries]
        average = sum(entry.size for entry in entries) / max(1, len(entries))
    else:
        files = [(src.name, os.fspath(src))]
        average = 0
    # One file: blake3 spreads it over threads itself.  Many files: a thread per file pays only
    # when files are large; for small ones, opening and reading them holds the GIL longer than
    # hashing releases it, and the pool's overhead per task is larger than the hashing.
    per_file_threads = opts.threads if len(files) == 1 else 1
    pool_workers = opts.threads if len(files) > 1 and average >= POOL_MIN_AVERAGE else 1
    buffers = threading.local()  # one read buffer per thread, not one per file

    def hash_one(item: tuple[str, str]) -> tuple[str, str, int]:
        relpath, path = item
        buffer = getattr(buffers, "buffer", None)
        if buffer is None:
            buffer = buffers.buffer = bytearray(opts.chunk_size)
        digest, size = hash_file(path, algorithm, opts.chunk_size, per_file_threads, buffer)
        return relpath, digest, size

    sums = list(ordered_map(hash_one, files, pool_workers))
    if opts.expect is not None:
        expect_path = workdir / opts.expect
        compare(parse_sums(_read_text(expect_path), algorithm, opts.expect),
                {relpath: digest for relpath, digest, _ in sums}, opts.expect)
    text = format_sums([(relpath, digest) for relpath, digest, _ in sums])
    with open(dest, "xb") as out:
        out.write(text)
    return sum(size for _, _, size in sums), len(text)


def hash_file(path: str | os.PathLike[str], algorithm: str, chunk_size: int, threads: int = 1,
              buffer: bytearray | None = None) -> tuple[str, int]:
    """The hex digest and size of a file, read `chunk_size` bytes at a time into `buffer`
    (a new one when not given)."""
    hasher = _new_hasher(algorithm, threads)
    if buffer is None:
        buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    size = 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while count := os.readv(fd, (buffer,)):
            hasher.update(view[:count])
            size += count
    finally:
        os.close(fd)
    return hasher.hexdigest(), size


def format_sums(sums: list[tuple[str, str]]) -> bytes:
    """The sums file for `(relpath, hex)` pairs, in the order given."""
    lines = []
    for relpath, digest in sums:
        if "\\" in relpath or "\n" in relpath:
            escaped = relpath.replace("\\", "\\\\").replace("\n", "\\n")
            lines.append(f"\\{digest}  {escaped}\n")
        else:
            lines.append(f"{digest}  {relpath}\n")
    return "".join(lines).encode("utf-8")


def parse_sums(text: str, algorithm: str, where: str) -> dict[str, str]:
    """relpath -> hex from a sums file (text or `*` binary markers, coreutils escapes).

    Blank lines are skipped; any other line that is not `<hex>  <path>` raises `KindError`
    naming the file and line.
    """
    expected_length = HEX_LENGTHS[algorithm]
    sums: dict[str, str] = {}
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        escaped = line.startswith("\\")
        body = line[1:] if escaped else line
        digest, sep, rest = body.partition(" ")
        if (not sep or len(digest) != expected_length
                or any(c not in "0123456789abcdefABCDEF" for c in digest) or rest[:1] not in " *"
                or not rest[1:]):
            raise KindError(f"{where}, line {number}: not `<{algorithm} hex>  <path>`: "
                            f"{line[:80]!r}")
        relpath = _unescape(rest[1:]) if escaped else rest[1:]
        if relpath in sums:
            raise KindError(f"{where}, line {number}: {relpath} is listed twice")
        sums[relpath] = digest.lower()
    return sums


def compare(expected: dict[str, str], actual: dict[str, str], where: str) -> None:
    """Raise `ChecksumMismatchError` naming every path that differs, is missing or is extra."""
    differ = sorted(path for path in expected.keys() & actual.keys()
                    if expected[path] != actual[path])
    missing = sorted(expected.keys() - actual.keys())
    extra = sorted(actual.keys() - expected.keys())
    if not (differ or missing or extra):
        return
    parts = []
    for label, paths in (("differ", differ), ("missing (listed, not found)", missing),
                         ("extra (found, not listed)", extra)):
        if paths:
            parts.append(f"{label}: {', '.join(paths)}")
    raise ChecksumMismatchError(f"checksums do not match {where}: {'; '.join(parts)}",
                                differ=differ, missing=missing, extra=extra)


def _new_hasher(algorithm: str, threads: int) -> Any:
    if algorithm == "blake3":
        return blake3.blake3(max_threads=threads)
    return hashlib.new(algorithm)


def _unescape(name: str) -> str:
    out = []
    chars = iter(name)
    for char in chars:
        if char == "\\":
            following = next(chars, "")
            out.append({"\\": "\\", "n": "\n"}.get(following, "\\" + following))
        else:
            out.append(char)
    return "".join(out)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KindError(f"the expect sums file {path} does not exist") from None
    except UnicodeDecodeError:
        raise KindError(f"the expect sums file {path} is not UTF-8 text") from None
