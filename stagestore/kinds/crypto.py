"""The encrypt and decrypt kinds: chunked AEAD streams, and the keys they use.

The stream (docs/kinds.md, "Encrypted streams") is a 32-byte header, then chunks of
`chunk_size` plaintext bytes each sealed with AES-256-GCM or ChaCha20-Poly1305 (the last chunk
shorter, possibly empty).  Each file gets its own key and nonce prefix, derived with HKDF-SHA256
from the user's key and a random 16-byte salt in the header, so nonces never repeat under one
key.  The associated data of every chunk binds the header, the chunk's index and whether it is
the last, so reordering, truncation, dropping or appending chunks all fail authentication.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .chunks import fixed_chunks, mark_last, ordered_map, read_pieces
from .errors import DecryptionError, KindError
from .options import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, KindOptions
from .tarstream import restore, source_pieces

KEY_SIZE = 32
TAG_SIZE = 16
SALT_SIZE = 16
MAGIC = b"SSENC1\x00"
VERSION = 1
# magic, version, algorithm id, 3 reserved zero bytes, chunk size, salt: 32 bytes, big-endian.
HEADER = struct.Struct(">7sBB3sI16s")
ALGORITHM_IDS = {"aes-256-gcm": 1, "chacha20-poly1305": 2}
_CIPHERS = {"aes-256-gcm": AESGCM, "chacha20-poly1305": ChaCha20Poly1305}
KEY_ID_CONTEXT = "stagestore 2026-12 key id v1"
_FAILED = "wrong key, or the data was tampered with, truncated or reordered"


def load_key(key_env: str | None, key_file: str | None, workdir: Path,
             environ: Mapping[str, str]) -> bytes:
    """The 32-byte key from environment variable `key_env` or from file `key_file`.

    The variable holds 64 hex characters or the base64 of 32 bytes; the file holds the same
    text, or exactly 32 raw bytes.  `key_file` is relative to `workdir`.  Errors (`KindError`)
    name the variable or file and what is wrong, never the key.
    """
    if (key_env is None) == (key_file is None):
        raise KindError("give exactly one key source: key_env or key_file")
    if key_env is not None:
        value = environ.get(key_env)
        if value is None:
            raise KindError(f"environment variable {key_env} is not set; it must hold the key "
                            "(64 hex characters, or base64 of 32 bytes)")
        return _decode_key(value, f"environment variable {key_env}")
    path = workdir / key_file
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KindError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    if len(data) == KEY_SIZE:
        return data
    # Non-ASCII bytes become U+FFFD, which is neither hex nor base64, so they are refused below.
    return _decode_key(data.decode("ascii", errors="replace"),
                       f"key file {path} ({len(data)} bytes, not 32 raw bytes)")


def key_id(key: bytes) -> str:
    """A public name for `key`: 32 hex characters of a BLAKE3 key derivation from it.

    It is what manifests and config hashes carry, so two keys can be told apart without either
    being stored.
    """
    return blake3.blake3(key, derive_key_context=KEY_ID_CONTEXT).hexdigest()[:32]


def encrypt(opts: KindOptions, src: Path, dest: Path, key: bytes) -> tuple[int, int]:
    """Encrypt `src` (a file, or a folder packed as a tar stream) into file `dest`."""
    algorithm = opts.algorithm
    header = HEADER.pack(MAGIC, VERSION, ALGORITHM_IDS[algorithm], bytes(3), opts.chunk_size,
                         os.urandom(SALT_SIZE))
    cipher, prefix = _file_cipher(algorithm, key, header)
    pieces, bytes_in = source_pieces(src, opts.chunk_size)

    def seal(item: tuple[int, tuple[bytes, bool]]) -> bytes:
        index, (chunk, last) = item
        return cipher.encrypt(prefix + index.to_bytes(8, "big"), chunk,
                              _associated_data(header, index, last))

    with open(dest, "xb") as out:
        out.write(header)
        for sealed in ordered_map(seal, enumerate(_plain_chunks(pieces, opts.chunk_size)),
                                  opts.threads):
            out.write(sealed)
    return bytes_in, dest.stat().st_size


def decrypt(opts: KindOptions, src: Path, dest: Path, key: bytes) -> tuple[int, int]:
    """Decrypt file `src` into `dest`: a folder if it holds a packed folder, else a file.

    Raises `DecryptionError` on a damaged header or on the first chunk that does not
    authenticate; nothing is written from a chunk before it authenticates.
    """
    if src.is_dir():
        raise KindError(f"decrypt takes a file, and {src} is a folder")
    with open(src, "rb") as file:
        header = file.read(HEADER.size)
        algorithm, chunk_size = _parse_header(header)
        if opts.algorithm is not None and opts.algorithm != algorithm:
            raise KindError(f"{src} was encrypted with {algorithm}, but algorithm = "
                            f"{opts.algorithm!r}")
        cipher, prefix = _file_cipher(algorithm, key, header)
        record = chunk_size + TAG_SIZE

        def open_chunk(item: tuple[int, tuple[bytes, bool]]) -> bytes:
            index, (sealed, last) = item
            try:
                return cipher.decrypt(prefix + index.to_bytes(8, "big"), sealed,
                                      _associated_data(header, index, last))
            except InvalidTag:
                raise DecryptionError(f"decryption failed at chunk {index}: {_FAILED}",
                                      chunk=index) from None

        sealed = enumerate(mark_last(fixed_chunks(read_pieces(file, record), record)))
        plain = _require_chunks(ordered_map(open_chunk, sealed, opts.threads))
        bytes_out = restore(plain, dest, opts.chunk_size)
    return src.stat().st_size, bytes_out


def _decode_key(text: str, where: str) -> bytes:
    text = text.strip()
    if not text:
        raise KindError(f"{where} is empty; it must hold the key (64 hex characters, or base64 "
                        "of 32 bytes)")
    if len(text) == 2 * KEY_SIZE:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    try:
        key = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise KindError(f"{where} is neither 64 hex characters nor base64 (of a 32-byte "
                        "key)") from None
    if len(key) != KEY_SIZE:
        raise KindError(f"{where} holds base64 of {len(key)} bytes; the key must be 32 bytes "
                        "(64 hex characters, or base64 of 32 bytes)")
    return key


def _file_cipher(algorithm: str, key: bytes, header: bytes) -> tuple[AESGCM | ChaCha20Poly1305,
                                                                     bytes]:
    """This file's AEAD and 4-byte nonce prefix: HKDF-SHA256 of the key with the header's salt."""
    if len(key) != KEY_SIZE:
        raise KindError(f"the key must be {KEY_SIZE} bytes; got {len(key)}")
    salt = header[-SALT_SIZE:]
    derived = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE + 4, salt=salt,
                   info=b"stagestore encrypt v1 " + algorithm.encode("ascii")).derive(key)
    return _CIPHERS[algorithm](derived[:KEY_SIZE]), derived[KEY_SIZE:]


def _associated_data(header: bytes, index: int, last: bool) -> bytes:
    return header + index.to_bytes(8, "big") + (b"\x01" if last else b"\x00")


def _plain_chunks(pieces: Iterable[bytes], chunk_size: int) -> Iterator[tuple[bytes, bool]]:
    """`(chunk, is_last)` over the plaintext; an empty plaintext is one empty last chunk."""
    empty = True
    for chunk, last in mark_last(fixed_chunks(pieces, chunk_size)):
        empty = False
        yield chunk, last
    if empty:
        yield b"", True


def _parse_header(header: bytes) -> tuple[str, int]:
    """The algorithm and chunk size a stream header names; `DecryptionError` if it is damaged."""
    if len(header) < HEADER.size:
        raise DecryptionError(f"the input is {len(header)} bytes, shorter than the "
                              f"{HEADER.size}-byte header of an encrypted stream")
    magic, version, algorithm_id, reserved, chunk_size, _ = HEADER.unpack(header)
    if magic != MAGIC:
        raise DecryptionError(f"the input is not a stagestore encrypted stream (it starts with "
                              f"{header[:7]!r}, not {MAGIC!r})")
    if version != VERSION:
        raise DecryptionError(f"the input is an encrypted stream of version {version}; this "
                              f"stagestore reads version {VERSION} only")
    names = {number: name for name, number in ALGORITHM_IDS.items()}
    if algorithm_id not in names or reserved != bytes(3):
        raise DecryptionError(f"the encrypted stream's header is damaged (algorithm id "
                              f"{algorithm_id}, reserved bytes {reserved.hex()})")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise DecryptionError(f"the encrypted stream's header is damaged (chunk size "
                              f"{chunk_size} is outside 1 KiB to 100 MiB)")
    return names[algorithm_id], chunk_size


def _require_chunks(plain: Iterator[bytes]) -> Iterator[bytes]:
    """`plain`, raising `DecryptionError` if the stream ends right after its header."""
    count = 0
    for count, chunk in enumerate(plain, start=1):
        yield chunk
    if count == 0:
        raise DecryptionError("decryption failed at chunk 0: the stream ends after its header, "
                              "so it was truncated", chunk=0)
