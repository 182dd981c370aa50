"""A folder as one deterministic tar stream, and back (docs/kinds.md, "Packed folders").

`source_pieces` gives compress and encrypt one byte stream for either input shape: a file's
bytes, or a folder packed as a POSIX ustar/pax archive whose first member is the marker
`.stagestore-folder`.  Headers are built here rather than by `tarfile`, so the bytes are fixed
by this module and its spec, not by a Python version.  `restore` reads a decompressed or
decrypted stream back: a stream that starts with the marker header becomes a folder, any other
stream a file.  Unpacking uses `tarfile`'s reader and accepts only plain relative names,
regular files and folders.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import InvalidNameError
from ..store.layout import validate_relpath
from .chunks import PieceReader, read_pieces
from .errors import KindError
from .walk import Entry, walk

BLOCK = 512
RECORD = 20 * BLOCK
MARKER_NAME = ".stagestore-folder"
MARKER_DATA = b"stagestore folder v1\n"
USTAR_MAGIC = b"ustar\x0000"
_NAME_FIELD = 100
_MAX_OCTAL_SIZE = 8 ** 11  # what fits in the 12-byte size field (11 octal digits and a NUL)


def source_pieces(src: Path, chunk_size: int) -> tuple[Iterator[bytes], int]:
    """The byte stream to compress or encrypt for `src`, and its content size in bytes.

    For a file: its bytes.  For a folder: the packed tar stream; the size counts file contents
    only.  Nothing is read until the iterator is consumed.
    """
    if src.is_dir():
        entries = walk(src)
        if any(entry.relpath == MARKER_NAME for entry in entries):
            raise KindError(f"{src} holds a file named {MARKER_NAME}, a name reserved for the "
                            "marker of packed folders; rename it")
        return pack(entries, chunk_size), sum(entry.size for entry in entries)
    return _file_pieces(src, chunk_size), src.stat().st_size


def pack(entries: list[Entry], chunk_size: int) -> Iterator[bytes]:
    """The tar stream of `entries` (from `walk`): the marker, each entry in order, the end."""
    yield _header(MARKER_NAME, typeflag=b"0", mode=0o644, size=len(MARKER_DATA))
    yield MARKER_DATA + _padding(len(MARKER_DATA))
    written = 2 * BLOCK
    for entry in entries:
        if entry.is_dir:
            header = _header(entry.relpath + "/", typeflag=b"5", mode=0o755, size=0)
            yield header
            written += len(header)
            continue
        header = _header(entry.relpath, typeflag=b"0", size=entry.size,
                         mode=0o755 if entry.executable else 0o644)
        padding = _padding(entry.size)
        yield header
        yield from _exact_file_pieces(entry, chunk_size)
        yield padding
        written += len(header) + entry.size + len(padding)
    end = 2 * BLOCK
    yield bytes(end + (-(written + end) % RECORD))


def is_packed_folder(head: bytes) -> bool:
    """Whether a stream starting with `head` is a packed folder: its first 512 bytes are a
    ustar header with a valid checksum, type regular file, named `.stagestore-folder`."""
    if len(head) < BLOCK or head[257:265] != USTAR_MAGIC or head[156:157] != b"0":
        return False
    if head[:_NAME_FIELD].rstrip(b"\x00") != MARKER_NAME.encode("ascii"):
        return False
    try:
        stored = int(head[148:156].rstrip(b"\x00 ").decode("ascii"), 8)
    except ValueError:
        return False
    return stored == _header_checksum(head[:BLOCK])


def restore(pieces: Iterator[bytes], dest: Path, chunk_size: int) -> int:
    """Write a decompressed or decrypted stream to `dest`: a folder if the stream is a packed
    folder, else a file.  Returns the content bytes written.  Reads the stream to its end."""
    reader = PieceReader(pieces)
    if is_packed_folder(reader.peek(BLOCK)):
        return unpack(reader, dest, chunk_size)
    written = 0
    with open(dest, "xb") as out:
        while piece := reader.read(chunk_size):
            out.write(piece)
            written += len(piece)
    return written


def unpack(reader: PieceReader, dest: Path, chunk_size: int) -> int:
    """Create folder `dest` from a packed-folder stream; returns the content bytes written.

    Refuses (`KindError`) an unknown marker, links, devices, absolute or `..` names, a name
    twice, and anything but zero bytes after the end of the archive.
    """
    dest.mkdir()
    written = 0
    try:
        with tarfile.open(fileobj=reader, mode="r|", bufsize=RECORD) as archive:
            members = iter(archive)
            _check_marker(archive, next(members))
            for member in members:
                written += _extract(archive, member, dest, chunk_size)
    except tarfile.TarError as exc:
        raise KindError(f"the packed folder is damaged: {exc}") from None
    while rest := reader.read(chunk_size):
        if rest.count(0) != len(rest):
            raise KindError("the packed folder has data after the end of its archive")
    return written


def _file_pieces(path: Path, chunk_size: int) -> Iterator[bytes]:
    with open(path, "rb") as file:
        yield from read_pieces(file, chunk_size)


def _exact_file_pieces(entry: Entry, chunk_size: int) -> Iterator[bytes]:
    """The file's bytes, checking that it still has the size its header promised."""
    remaining = entry.size
    with open(entry.path, "rb") as file:
        while remaining:
            piece = file.read(min(chunk_size, remaining))
            if not piece:
                break
            remaining -= len(piece)
            yield piece
        if remaining or file.read(1):
            raise KindError(f"{entry.relpath} changed size while it was being packed")


def _header(name: str, *, typeflag: bytes, mode: int, size: int) -> bytes:
    """A ustar header for `name`, preceded by a pax header when the name or size needs one."""
    encoded = name.encode("utf-8")
    records = {}
    if len(encoded) > _NAME_FIELD or not name.isascii():
        records["path"] = encoded
    if size >= _MAX_OCTAL_SIZE:
        records["size"] = str(size).encode("ascii")
    prefix = b""
    if records:
        payload = b"".join(_pax_record(key, value) for key, value in records.items())
        prefix = (_ustar_block(b"././@PaxHeader", b"x", 0o644, len(payload))
                  + payload + _padding(len(payload)))
    short_name = name.encode("ascii", "replace")[:_NAME_FIELD]
    return prefix + _ustar_block(short_name, typeflag, mode, 0 if "size" in records else size)


def _ustar_block(name: bytes, typeflag: bytes, mode: int, size: int) -> bytes:
    header = bytearray(BLOCK)
    header[0:len(name)] = name
    header[100:108] = b"%07o\x00" % mode
    header[108:116] = b"0000000\x00"  # uid
    header[116:124] = b"0000000\x00"  # gid
    header[124:136] = b"%011o\x00" % size
    header[136:148] = b"00000000000\x00"  # mtime
    header[156:157] = typeflag
    header[257:265] = USTAR_MAGIC
    header[329:337] = b"0000000\x00"  # devmajor
    header[337:345] = b"0000000\x00"  # devminor
    header[148:156] = b"%06o\x00 " % _header_checksum(header)
    return bytes(header)


def _header_checksum(header: bytes | bytearray) -> int:
    """The ustar checksum: the sum of the header's bytes with the checksum field as spaces."""
    return sum(header[:148]) + 8 * 0x20 + sum(header[156:BLOCK])


def _pax_record(key: str, value: bytes) -> bytes:
    """One pax record, `"<length> <key>=<value>\\n"`, where length counts the whole record."""
    body = b" " + key.encode("ascii") + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode("ascii") + body


def _padding(size: int) -> bytes:
    return bytes(-size % BLOCK)


def _check_marker(archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
    data = archive.extractfile(member).read(BLOCK) if member.isfile() else b""
    if data != MARKER_DATA:
        raise KindError(f"the packed folder's marker reads {data[:40]!r}, not {MARKER_DATA!r}: "
                        "it was written by a newer stagestore, or is damaged")


def _extract(archive: tarfile.TarFile, member: tarfile.TarInfo, dest: Path,
             chunk_size: int) -> int:
    """Create one member below `dest`; returns the bytes written."""
    try:
        relpath = validate_relpath(member.name, "name in the packed folder")
    except InvalidNameError as exc:
        raise KindError(str(exc)) from None
    target = dest / relpath
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        target.chmod(0o755)
        return 0
    if not member.isfile():
        raise KindError(f"{relpath} in the packed folder is a link or a device; packed folders "
                        "hold only regular files and folders")
    target.parent.mkdir(parents=True, exist_ok=True)
    source = archive.extractfile(member)
    try:
        out = open(target, "xb")
    except FileExistsError:
        raise KindError(f"{relpath} appears twice in the packed folder") from None
    with out:
        while piece := source.read(chunk_size):
            out.write(piece)
    os.chmod(target, 0o755 if member.mode & 0o111 else 0o644)
    return member.size
