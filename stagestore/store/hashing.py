"""BLAKE3 digests, always written as the prefixed string `blake3:<64 hex>`."""

from __future__ import annotations

import os
import re
from typing import Any

import blake3
import msgspec

PREFIX = "blake3:"
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")

# Below this size a plain read beats setting up a memory map and a thread pool.
_MMAP_THRESHOLD = 1 << 20
# Multi-threaded hashing only pays off once there is enough work to split.
_THREADS_THRESHOLD = 16 << 20
_CHUNK = 1 << 20


def digest_bytes(data: bytes | memoryview) -> str:
    return PREFIX + blake3.blake3(data).hexdigest()


def digest_canonical(value: Any) -> str:
    """Digest of a value's canonical JSON encoding (keys and struct fields sorted)."""
    return digest_bytes(canonical_json(value))


def canonical_json(value: Any) -> bytes:
    return msgspec.json.encode(value, order="sorted")


def hash_file(path: str | os.PathLike[str], size: int | None = None) -> str:
    """Digest of a file's bytes; large files are memory-mapped and hashed on all cores."""
    if size is None:
        size = os.stat(path).st_size
    if size >= _MMAP_THRESHOLD:
        threads = blake3.blake3.AUTO if size >= _THREADS_THRESHOLD else 1
        hasher = blake3.blake3(max_threads=threads)
        hasher.update_mmap(os.fspath(path))
        return PREFIX + hasher.hexdigest()
    hasher = blake3.blake3()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # not open(): no buffered file object
    try:
        while chunk := os.read(fd, _CHUNK):
            hasher.update(chunk)
    finally:
        os.close(fd)
    return PREFIX + hasher.hexdigest()


def read_small(path: str | os.PathLike[str], size: int) -> bytes:
    """The bytes of a file stat-ed at `size` (a small one), in one `read` when it has not grown:
    a read that returns less than it asked for ends a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, size + 1)
        if len(data) > size:  # it grew since its stat
            chunks = [data]
            while chunk := os.read(fd, _CHUNK):
                chunks.append(chunk)
            data = b"".join(chunks)
    finally:
        os.close(fd)
    return data


def hash_path(path: str | os.PathLike[str], size: int) -> tuple[str, int]:
    """(digest, bytes read) of a file stat-ed at `size`: small files in one read."""
    if size < _MMAP_THRESHOLD:
        data = read_small(path, size)
        return PREFIX + blake3.blake3(data).hexdigest(), len(data)
    return hash_file(path, size), os.stat(path).st_size


def is_digest(value: object) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX) and bool(
        _HEX_RE.match(value[len(PREFIX):]))


def digest_hex(digest: str) -> str:
    """The 64 hex characters of a digest; raises ValueError on anything else."""
    if not is_digest(digest):
        raise ValueError(f"not a blake3 digest: {digest!r}")
    return digest[len(PREFIX):]


EMPTY_DIGEST = digest_bytes(b"")
