"""The item log of a run: its item manifests and item records, appended to segment files.

Format 3 keeps what a run records per item (one manifest per item stage, and the item record)
in append-only segments `runs/<run_id>/_items.<16 hex>.log` instead of one JSON file per item
stage (format 2's `runs/<run_id>/items/<item>/<stage>.json` and `_item.json`, still read).
Each process that writes a run's items appends to a segment of its own, created the first time
it writes one (so no two processes ever append to one file, also on a network filesystem);
records are synced in groups (`SegmentWriter`), and the commit point of a record is the fsync
that covers it.  docs/format.md, "runs/<run_id>/_items.<hex>.log", is the specification.

A segment is `HEADER`, then frames:

    magic  4   b"SSIR"
    kind   1   b"M" a stage manifest, b"I" an item record, b"D" a manifest's removal
    seq    8   the run's Lamport counter: 1 + the greatest seq the writer could see
    keylen 2   }
    paylen 4   } big-endian unsigned
    check 32   BLAKE3 of kind..paylen, the key and the payload
    key        the item id, NUL, the stage name (empty for the item record), UTF-8
    payload    the record exactly as `encode_record` writes it (a loose file's bytes); empty for D

Readers take, per (item, stage), the record with the greatest seq (ties: the greater segment
name, then the later offset).  A segment is read up to its first frame that is incomplete or
fails its check: that frame and everything after it is the segment's torn tail (a write a crash
cut short, or bytes never synced before a power loss), ignored by readers, reported by `verify`
and cut off by `recover`.
"""

from __future__ import annotations

import os
import re
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import blake3

from ..errors import CorruptRecordError, FormatVersionError
from . import durable

HEADER = b"stagestore item log 1\n"
_HEADER_PREFIX = b"stagestore item log "
MAGIC = b"SSIR"
_FIXED = struct.Struct(">cQHI")  # kind, seq, keylen, paylen
_CHECK = 32
FRAME_OVERHEAD = len(MAGIC) + _FIXED.size + _CHECK
KIND_MANIFEST, KIND_ITEM, KIND_REMOVED = b"M", b"I", b"D"
_KINDS = (KIND_MANIFEST, KIND_ITEM, KIND_REMOVED)
SEGMENT_RE = re.compile(r"_items\.[0-9a-f]{16}\.log")
ITEM_KEY = ""  # the stage part of an item record's key

# Group commit: a writer fsyncs its segment once SYNC_RECORDS records are pending, and its
# flusher thread at most SYNC_AFTER_S seconds after a record was appended (None: no thread; the
# crash-point and power-loss tests use that, so that a workload's operations come in a fixed
# order).  Runs sync before their run record says they finished (`ManifestStore.sync_items`).
SYNC_RECORDS = 1000
SYNC_AFTER_S: float | None = 0.2


def segment_name() -> str:
    return f"_items.{os.urandom(8).hex()}.log"


def encode_frame(kind: bytes, seq: int, item: str, stage: str, payload: bytes) -> bytes:
    key = f"{item}\x00{stage}".encode()
    fixed = _FIXED.pack(kind, seq, len(key), len(payload))
    check = blake3.blake3(fixed + key + payload).digest()
    return b"".join((MAGIC, fixed, check, key, payload))


class Entry(NamedTuple):
    """Where one record is: its segment, the offset of its frame and the frame's length."""

    seq: int
    segment: str
    offset: int
    length: int
    kind: bytes


class Frame(NamedTuple):
    kind: bytes
    seq: int
    item: str
    stage: str
    payload: bytes
    offset: int
    length: int


def parse_frame(data: bytes | memoryview, offset: int) -> Frame | None:
    """The frame at `offset`, or None when it is incomplete or fails its check."""
    end = offset + FRAME_OVERHEAD
    if len(data) < end or data[offset:offset + 4] != MAGIC:
        return None
    kind, seq, keylen, paylen = _FIXED.unpack_from(data, offset + 4)
    if kind not in _KINDS:
        return None
    total = FRAME_OVERHEAD + keylen + paylen
    if len(data) < offset + total:
        return None
    fixed = bytes(data[offset + 4:offset + 4 + _FIXED.size])
    body = bytes(data[end:offset + total])
    if blake3.blake3(fixed + body).digest() != bytes(data[end - _CHECK:end]):
        return None
    try:
        item, sep, stage = body[:keylen].decode("utf-8").partition("\x00")
    except UnicodeDecodeError:
        return None
    if not sep:
        return None
    return Frame(kind, seq, item, stage, body[keylen:], offset, total)


def check_header(data: bytes, where: str) -> int | None:
    """The length of a segment's header, or None for a segment cut short inside its header
    (a file that has no complete header holds no record).  A header of a later version is a
    `FormatVersionError`; anything else is a `CorruptRecordError`."""
    if data.startswith(HEADER):
        return len(HEADER)
    if HEADER.startswith(data[:len(HEADER)]) and len(data) < len(HEADER):
        return None
    if data.startswith(_HEADER_PREFIX):
        raise FormatVersionError(f"{where}: an item log of a later version "
                                 f"({data[:40]!r}); this stagestore reads version 1",
                                 hint="upgrade stagestore to read this store")
    raise CorruptRecordError(f"{where}: not a stagestore item log", path=where)


class Scan(NamedTuple):
    frames: list[Frame]
    end: int  # the end of the last good frame: where the torn tail starts
    size: int  # the bytes the segment had when it was read
    damaged: list[tuple[int, int]]  # (offset, length) of bad bytes with good frames after them


def scan(data: bytes, where: str, start: int = 0) -> Scan:
    """Every good frame of a segment's bytes (from its header on, or from offset `start` of
    the segment when `data` begins there)."""
    base = start
    offset = 0
    if start == 0:
        head = check_header(data, where)
        if head is None:
            return Scan([], 0, len(data), [])
        offset = head
    frames: list[Frame] = []
    damaged: list[tuple[int, int]] = []
    while True:
        frame = parse_frame(data, offset)
        if frame is not None:
            frames.append(frame._replace(offset=base + offset))
            offset += frame.length
            continue
        # Bad bytes: a torn tail, unless a good frame follows (damage in the middle, whose
        # records are lost; those after it are kept).
        resume = _next_frame(data, offset + 1)
        if resume is None:
            break
        damaged.append((base + offset, resume - offset))
        offset = resume
    return Scan(frames, base + offset, base + len(data), damaged)


def _next_frame(data: bytes, offset: int) -> int | None:
    while True:
        found = data.find(MAGIC, offset)
        if found < 0:
            return None
        if parse_frame(data, found) is not None:
            return found
        offset = found + 1


class _Segment:
    __slots__ = ("path", "ino", "end", "size", "torn", "error", "damaged")

    def __init__(self, path: Path, ino: int) -> None:
        self.path = path
        self.ino = ino
        self.end = 0  # the end of its last good frame (0: no complete header yet)
        self.size = 0  # its size when last read
        self.torn = 0  # bytes after `end` that are not a good frame
        self.damaged: list[tuple[int, int]] = []
        self.error: CorruptRecordError | FormatVersionError | None = None  # its header's


class RunLog:
    """What the segments of one run hold: the latest record per (item, stage), kept up to date
    by `refresh` (which reads only what was appended since it last looked)."""

    # A folder whose mtime is this recent may change again within the same clock tick, so its
    # listing is read again until it is older (as git does for its index).
    _RACY_NS = 100_000_000

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.lock = threading.RLock()
        self._reset()

    def _reset(self) -> None:
        self.segments: dict[str, _Segment] = {}
        self.latest: dict[str, dict[str, Entry]] = {}  # item -> stage ('' for its record)
        self.max_seq = 0
        self._dir_sig: tuple[int, int] | None = None
        self._dir_racy = True

    def refresh(self) -> None:
        with self.lock:
            try:
                st = os.stat(self.run_dir)
            except (FileNotFoundError, NotADirectoryError):
                self._reset()
                return
            sig = (st.st_ino, st.st_mtime_ns)
            if sig != self._dir_sig or self._dir_racy:
                if self._dir_sig is not None and sig[0] != self._dir_sig[0]:
                    self._reset()  # the run folder was replaced (forgotten, made again)
                names = sorted(e.name for e in os.scandir(self.run_dir)
                               if SEGMENT_RE.fullmatch(e.name))
                if set(self.segments) - set(names):
                    self._reset()
                for name in names:
                    if name not in self.segments:
                        self.segments[name] = _Segment(self.run_dir / name, -1)
                self._dir_sig = sig
                self._dir_racy = time.time_ns() - st.st_mtime_ns < self._RACY_NS
            for name, seg in list(self.segments.items()):
                try:
                    sst = os.stat(seg.path)
                except FileNotFoundError:
                    self._reset()
                    return self.refresh()
                if seg.ino == -1:
                    seg.ino = sst.st_ino
                if sst.st_ino != seg.ino or sst.st_size < seg.end:
                    self._reset()  # cut back or replaced: read every segment again
                    return self.refresh()
                if sst.st_size != seg.size:
                    self._read(name, seg, sst.st_size)

    def _read(self, name: str, seg: _Segment, size: int) -> None:
        with open(seg.path, "rb") as f:
            f.seek(seg.end)
            data = f.read(size - seg.end)
        start = seg.end
        try:
            found = scan(data, str(seg.path), start)
        except (CorruptRecordError, FormatVersionError) as exc:  # its header: nothing read
            seg.error, seg.size, seg.torn = exc, size, 0
            return
        for frame in found.frames:
            self._index(name, frame)
        seg.end = found.end
        seg.size = start + len(data)
        seg.torn = seg.size - found.end
        seg.damaged.extend(found.damaged)

    def _index(self, name: str, frame: Frame) -> None:
        entry = Entry(frame.seq, name, frame.offset, frame.length, frame.kind)
        stages = self.latest.setdefault(frame.item, {})
        old = stages.get(frame.stage)
        if old is None or (entry.seq, entry.segment, entry.offset) > (old.seq, old.segment, old.offset):
            stages[frame.stage] = entry
        if frame.seq > self.max_seq:
            self.max_seq = frame.seq

    def note(self, name: str, path: Path, ino: int, frame: Frame, end: int) -> None:
        """A frame this process has just appended to its own segment (no need to read it)."""
        with self.lock:
            seg = self.segments.get(name)
            if seg is None:
                seg = self.segments[name] = _Segment(path, ino)
            if seg.end == frame.offset and seg.size == frame.offset:
                self._index(name, frame)
                seg.end = seg.size = end

    # --- reading ---

    def get(self, item: str, stage: str) -> Entry | None:
        """The latest record of (item, stage); a segment of a later version hides them all."""
        self.check_version()
        return self.latest.get(item, {}).get(stage)

    def check_version(self) -> None:
        for seg in self.segments.values():
            if isinstance(seg.error, FormatVersionError):
                raise seg.error

    def of_item(self, item: str) -> dict[str, Entry]:
        self.check_version()
        return self.latest.get(item, {})

    def payload(self, entry: Entry, item: str, stage: str) -> bytes:
        """The bytes of a record, read again and checked again."""
        path = self.run_dir / entry.segment
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.pread(fd, entry.length, entry.offset)
        finally:
            os.close(fd)
        frame = parse_frame(data, 0)
        if frame is None or (frame.item, frame.stage) != (item, stage):
            raise CorruptRecordError(f"{path}: the record of item {item!r} "
                                     f"{'stage ' + stage if stage else 'record'} at offset "
                                     f"{entry.offset} no longer passes its check", path=str(path))
        return frame.payload

    def items(self) -> list[str]:
        """Items with at least one record that is not a removal."""
        return [item for item, stages in self.latest.items()
                if any(e.kind != KIND_REMOVED for e in stages.values())]

    def damaged(self) -> list[tuple[Path, int, int]]:
        """(segment, offset, length) of bad bytes followed by good records."""
        return [(seg.path, offset, length) for _, seg in sorted(self.segments.items())
                for offset, length in seg.damaged]

    def invalid(self) -> list[tuple[Path, CorruptRecordError | FormatVersionError]]:
        return [(seg.path, seg.error) for _, seg in sorted(self.segments.items())
                if seg.error is not None]

    def torn_tails(self) -> list[tuple[Path, int, int]]:
        """(segment, where its torn tail starts, its length) for each segment that has one."""
        return [(seg.path, seg.end, seg.torn) for _, seg in sorted(self.segments.items())
                if seg.torn]


class SegmentWriter:
    """This process's segment of one run: thread-safe appends, synced in groups.

    A record is appended at once (so every reader sees it), and fsynced with the next group:
    when `SYNC_RECORDS` are pending, `SYNC_AFTER_S` after the oldest pending one was appended
    (the flusher thread), or when `sync` is called."""

    def __init__(self, run_dir: Path, log: RunLog, owner_tmp: Path,
                 deferral: durable.Deferral | None = None) -> None:
        # The store's deferred writes (store/unsynced.py): synced with the group, before it.
        self.deferral = deferral
        self.name = segment_name()
        self.path = run_dir / self.name
        self.log = log
        self.pid = os.getpid()
        # Header through a temp, fsync and rename: the segment appears whole or not at all.
        durable.write_file_atomic(self.path, HEADER, owner_tmp)
        self.fd = durable.open_append(self.path)
        self.ino = os.fstat(self.fd).st_ino
        self.end = len(HEADER)
        self.synced = self.end
        self.pending = 0
        self.first_pending = 0.0
        self._lock = threading.Lock()  # appends
        self._sync_lock = threading.Lock()  # fsyncs, one at a time
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._error: OSError | None = None
        self._waiting: list[tuple[int, Callable[[], None]]] = []
        with log.lock:
            seg = log.segments.setdefault(self.name, _Segment(self.path, self.ino))
            seg.end = seg.size = self.end
        self._flusher: threading.Thread | None = None
        if SYNC_AFTER_S is not None:
            self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                             name=f"itemlog-{self.name}")
            self._flusher.start()

    def alive(self) -> bool:
        """Whether this writer may still be used: same process, not closed, its file still
        the run's (a `forget` moves the run folder away)."""
        if self._closed or self.pid != os.getpid():
            return False
        try:
            return os.stat(self.path).st_ino == self.ino
        except FileNotFoundError:
            return False

    def append(self, kind: bytes, item: str, stage: str, payload: bytes) -> None:
        if self._error is not None:
            raise self._error
        with self.log.lock:
            self.log.refresh()  # other writers' records: this one's seq goes above theirs
            with self._lock:
                seq = self.log.max_seq + 1
                frame = encode_frame(kind, seq, item, stage, payload)
                durable.append(self.fd, frame, self.path)
                offset = self.end
                self.end += len(frame)
                self.log.note(self.name, self.path, self.ino,
                              Frame(kind, seq, item, stage, payload, offset, len(frame)), self.end)
                if not self.pending:
                    self.first_pending = time.monotonic()
                    self._wake.notify()
                self.pending += 1
                due = self.pending >= SYNC_RECORDS
        if due:
            self.sync()

    def sync(self) -> None:
        """Make every record appended so far durable (one fsync, unless already done), then
        call what waited for them (`when_durable`)."""
        with self._sync_lock:
            with self._lock:
                target, count = self.end, self.pending
            if target > self.synced:
                # The objects and cache entries that item stages wrote without fsync (rule 18)
                # were written before the records that name them: one syncfs makes all of them,
                # and this segment up to `target`, durable; else the segment's own fsync.
                if self.deferral is None or not self.deferral.sync():
                    durable.fsync_fd(self.fd, self.path)
                with self._lock:
                    self.synced = target
                    self.pending -= count
            with self._lock:
                ready = [call for at, call in self._waiting if at <= self.synced]
                self._waiting = [(at, call) for at, call in self._waiting if at > self.synced]
            for call in ready:
                call()

    def when_durable(self, call: Callable[[], None]) -> None:
        """Call `call` once every record appended so far is durable: now, or after the sync
        that covers them (in the order of the calls to this method)."""
        with self._sync_lock:
            with self._lock:
                if self.end > self.synced or self._waiting:
                    self._waiting.append((self.end, call))
                    return
            call()

    def close(self) -> None:
        """Sync, stop the flusher and close the segment."""
        if self._closed:
            return
        try:
            if self.pid == os.getpid():
                self.sync()
        finally:
            with self._lock:
                self._closed = True
                self._wake.notify()
            if self._flusher is not None and self._flusher is not threading.current_thread() \
                    and self.pid == os.getpid():
                self._flusher.join()
            os.close(self.fd)

    def _flush_loop(self) -> None:
        assert SYNC_AFTER_S is not None
        interval = SYNC_AFTER_S
        while True:
            with self._lock:
                while True:
                    if self._closed:
                        return
                    if not self.pending:
                        self._wake.wait()
                        continue
                    wait = self.first_pending + interval - time.monotonic()
                    if wait <= 0:
                        break
                    self._wake.wait(wait)
            try:
                self.sync()
            except OSError as exc:  # the next append (or close) reports it
                self._error = exc
                return


# One writer per (store, run) and process: a Store opened twice in one process (a worker's
# tasks, the API) shares its segment.
_WRITERS: dict[tuple[str, str], SegmentWriter] = {}
_WRITERS_LOCK = threading.Lock()


def writer(root: Path, run_id: str, run_dir: Path, log: RunLog, tmp: Path,
           deferral: durable.Deferral | None = None) -> SegmentWriter:
    key = (str(root), run_id)
    with _WRITERS_LOCK:
        found = _WRITERS.get(key)
        if found is not None and found.alive():
            return found  # also for another Store object of this process: one segment
        made = SegmentWriter(run_dir, log, tmp, deferral)
        _WRITERS[key] = made
        return made


def existing_writer(root: Path, run_id: str) -> SegmentWriter | None:
    with _WRITERS_LOCK:
        found = _WRITERS.get((str(root), run_id))
        return found if found is not None and found.alive() else None


def close_writer(root: Path, run_id: str) -> None:
    with _WRITERS_LOCK:
        found = _WRITERS.pop((str(root), run_id), None)
    if found is not None and found.pid == os.getpid():
        found.close()
