"""Streaming helpers shared by the kinds: chunking, an ordered bounded thread pool, a reader.

Every kind moves data as an iterator of byte strings ("pieces").  Memory stays bounded because
no helper here holds more than a chunk or two, and `ordered_map` keeps at most
`2 * workers` chunks in flight.
"""

from __future__ import annotations

import resource
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def read_pieces(file: BinaryIO, size: int) -> Iterator[bytes]:
    """`file`'s bytes from where it is to its end, `size` bytes at a time (the last may be short)."""
    while piece := file.read(size):
        yield piece


def fixed_chunks(pieces: Iterable[bytes], size: int) -> Iterator[bytes]:
    """The bytes of `pieces` regrouped into chunks of exactly `size` bytes; the last is shorter
    (and non-empty).  Pieces that already are whole chunks pass through uncopied."""
    buffer = bytearray()
    for piece in pieces:
        if not buffer and len(piece) == size:
            yield piece
            continue
        buffer += piece
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)


def mark_last(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """`(item, is_last)` for each item; reads one item ahead to know which is last."""
    iterator = iter(items)
    try:
        previous = next(iterator)
    except StopIteration:
        return
    for item in iterator:
        yield previous, False
        previous = item
    yield previous, True


def ordered_map(function: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """`function(item)` for each item, in input order, on `workers` threads.

    At most `2 * workers` items are submitted ahead of the one being yielded, so a fast reader
    cannot pile up chunks in memory.  The first exception (in input order) propagates; pending
    work is cancelled.  With one worker it runs inline, without a thread.
    """
    if workers <= 1:
        yield from map(function, items)
        return
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stagestore-kind") as pool:
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


class PieceReader:
    """A read-only binary file over an iterator of pieces, with `peek` to look ahead."""

    def __init__(self, pieces: Iterable[bytes]) -> None:
        self._pieces = (piece for piece in pieces if piece)
        self._buffer = bytearray()

    def peek(self, size: int) -> bytes:
        """Up to `size` bytes from the front, without consuming them (fewer only at the end)."""
        self._fill(size)
        return bytes(self._buffer[:size])

    def read(self, size: int | None = -1) -> bytes:
        """Up to `size` bytes (all the rest if `size` is None or negative); b"" at the end."""
        if size is None or size < 0:
            rest = bytes(self._buffer) + b"".join(self._pieces)
            self._buffer.clear()
            return rest
        if not self._buffer:
            piece = next(self._pieces, b"")
            if len(piece) <= size:
                return piece
            self._buffer += piece
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _fill(self, size: int) -> None:
        while len(self._buffer) < size:
            piece = next(self._pieces, None)
            if piece is None:
                return
            self._buffer += piece


def peak_rss_bytes() -> int:
    """The peak resident set size of this process so far, in bytes."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    return peak if sys.platform == "darwin" else peak * 1024
