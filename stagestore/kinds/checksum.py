"""The checksum kind: a sums file that `sha256sum -c`, `sha512sum -c` and `b3sum -c` read.

One line per file, `<hex>  <relpath>\\n`, sorted bytewise by relpath.  A name holding a newline
or a backslash is written the coreutils way: the line starts with `\\`, and in the name `\\`
becomes `\\\\` and a newline `\\n`.  With `expect`, the computed sums are compared with a sums
file and every difference is reported at once.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import blake3

from .errors import ChecksumMismatchError, KindError
from .options import KindOptions
from .walk import walk_files

HEX_LENGTHS = {"blake3": 64, "sha256": 64, "sha512": 128}
# With `parallel`, a folder's files are split over `workers` threads from this mean size on;
# below it, opening and reading a file holds the GIL longer than hashing it releases it, and
# threads do not help (measured here, 10,000 files of 4 KiB: 86 ms on one thread and 84 ms on
# two at load 0.9; 91 ms and 131 ms at load 3.5).
POOL_MIN_AVERAGE = 1 << 20


def checksum(opts: KindOptions, src: Path, dest: Path, workdir: Path) -> tuple[int, int]:
    """Write the sums file of `src` (a file or folder) to `dest`; returns (bytes in, bytes out).

    Raises `ChecksumMismatchError` if `opts.expect` names a sums file that differs.
    """
    algorithm = opts.algorithm
    if src.is_dir():
        # Many files: read and hashed in one loop per thread (`_hash_many`), the same per-file
        # path as folder snapshots; a task per file costs more than hashing a small file.
        sums = _hash_many(walk_files(src), algorithm, opts.chunk_size, opts.threads)
    else:
        # One file: blake3 spreads it over threads itself.
        digest, size = hash_file(src, algorithm, opts.chunk_size, opts.threads)
        sums = [(src.name, digest, size)]
    if opts.expect is not None:
        expect_path = workdir / opts.expect
        compare(parse_sums(_read_text(expect_path), algorithm, opts.expect),
                {relpath: digest for relpath, digest, _ in sums}, opts.expect)
    text = format_sums([(relpath, digest) for relpath, digest, _ in sums])
    with open(dest, "xb") as out:
        out.write(text)
    return sum(size for _, _, size in sums), len(text)


def _hash_many(files: list[tuple[str, str]], algorithm: str, chunk_size: int,
               threads: int) -> list[tuple[str, str, int]]:
    """(relpath, hex, size) of many files.  Each is read into one reused buffer: a small file
    in one `readv` (a read that returns less than the buffer holds ends a regular file), a
    large one a buffer at a time, so no stat and no allocation per file.  With `threads` > 1
    and large files (`POOL_MIN_AVERAGE`), the files are split into that many runs, one per
    thread (`open`, `read` and the hashing of large buffers release the GIL)."""
    if algorithm == "blake3":
        def new(data: Any) -> Any:
            return blake3.blake3(data)
    else:
        def new(data: Any) -> Any:
            return hashlib.new(algorithm, data)

    def run(part: list[tuple[str, str]]) -> list[tuple[str, str, int]]:
        buffer = bytearray(chunk_size)
        view = memoryview(buffer)
        out = []
        for relpath, path in part:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                count = os.readv(fd, (buffer,))
                hasher = new(view[:count])
                size = count
                while count == chunk_size:
                    count = os.readv(fd, (buffer,))
                    hasher.update(view[:count])
                    size += count
            finally:
                os.close(fd)
            out.append((relpath, hasher.hexdigest(), size))
        return out

    if threads <= 1 or len(files) < 2 * threads or _mean_size(files) < POOL_MIN_AVERAGE:
        return run(files)
    step = -(-len(files) // threads)
    parts = [files[i:i + step] for i in range(0, len(files), step)]
    with ThreadPoolExecutor(len(parts)) as pool:
        return [row for part in pool.map(run, parts) for row in part]


def _mean_size(files: list[tuple[str, str]]) -> float:
    """The mean size of up to 16 files spread over the list: enough to tell many small files
    from large ones without a stat per file."""
    sample = files[::max(1, len(files) // 16)][:16]
    return sum(os.stat(path).st_size for _, path in sample) / max(1, len(sample))


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
