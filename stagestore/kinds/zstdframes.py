"""A check that a zstd file ends where its last frame ends (RFC 8878, section 3.1).

python-zstandard's stream reader stops quietly when its input ends inside a frame, so a
truncated file would decompress to a shorter output without an error.  Walking the frame and
block headers (without decompressing anything) tells a truncated file from a whole one; libzstd
itself checks the content checksum while decompressing.
"""

from __future__ import annotations

import os
from typing import BinaryIO

ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MASK = 0xFFFFFFF0
_SKIPPABLE_MAGIC = 0x184D2A50
_FCS_SIZES = (0, 2, 4, 8)
_DICT_ID_SIZES = (0, 1, 2, 4)


def truncation(file: BinaryIO) -> str | None:
    """Why `file` (a seekable zstd file) is not a sequence of whole frames, or None if it is."""
    end = file.seek(0, os.SEEK_END)
    position = 0
    while position < end:
        file.seek(position)
        magic = _read_le(file, 4)
        if magic is None:
            return f"it ends inside a frame header at byte {position}"
        if magic & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
            size = _read_le(file, 4)
            if size is None:
                return f"it ends inside a skippable frame at byte {position}"
            position += 8 + size
        elif magic == ZSTD_MAGIC:
            position = _frame_end(file, position)
            if position < 0:
                return "it ends inside a frame"
        else:
            return f"byte {position} does not start a zstd frame"
    if position > end:
        return "it ends inside a frame"
    return None


def _frame_end(file: BinaryIO, start: int) -> int:
    """Where the zstd frame at `start` ends (just after its magic was read); -1 if cut short."""
    descriptor = _read_le(file, 1)
    if descriptor is None:
        return -1
    single_segment = bool(descriptor & 0x20)
    fcs_size = _FCS_SIZES[descriptor >> 6] or (1 if single_segment else 0)
    header = 1 + (0 if single_segment else 1) + _DICT_ID_SIZES[descriptor & 0x03] + fcs_size
    position = start + 4 + header
    while True:
        file.seek(position)
        block = _read_le(file, 3)
        if block is None:
            return -1
        block_type, block_size = (block >> 1) & 0x03, block >> 3
        position += 3 + (1 if block_type == 1 else block_size)
        if block & 0x01:
            return position + (4 if descriptor & 0x04 else 0)


def _read_le(file: BinaryIO, size: int) -> int | None:
    data = file.read(size)
    return int.from_bytes(data, "little") if len(data) == size else None
