"""The built-in stage kinds (stagestore.kinds) and their child entry point (stagestore.execution.kindstage).

Round trips, byte-for-byte determinism, damaged and hostile inputs (each must fail and leave no
output), the sums file checked by the real `sha256sum`/`b3sum`, keys, and bounded memory.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from stagestore.kinds import (KindError, KindOptions, ValidationFailureError, key_id, load_key,
                              parse_chunk_size, run_kind, validate, with_defaults)
from stagestore.kinds.errors import ChecksumMismatchError, DecryptionError
from stagestore.kinds.tarstream import MARKER_DATA, MARKER_NAME

ROOT = Path(__file__).resolve().parent.parent
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
COMPRESSORS = ("zstd", "gzip", "bz2", "xz")
CIPHERS = ("aes-256-gcm", "chacha20-poly1305")
CHUNK = 1024


def make_tree(root: Path, *, order: int = 1, mtime: int | None = None) -> Path:
    """A nested folder with text, binary, empty and executable files and an empty folder,
    created in the given order (1 or -1) so two copies differ in everything but content."""
    rng = random.Random(7)
    files = {
        "a.txt": b"alpha\n" * 300,
        "b/c/deep.bin": rng.randbytes(5000),
        "b/empty.txt": b"",
        "b-sibling.txt": b"sorted before b/ bytewise",
        "run.sh": b"#!/bin/sh\necho hi\n",
        "caf\u00e9/" + "n" * 120 + ".txt": b"a non-ASCII name longer than 100 bytes",
    }
    root.mkdir()
    (root / "empty-dir").mkdir()
    for relpath, data in list(files.items())[::order]:
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "run.sh").chmod(0o700)
    (root / "a.txt").chmod(0o600)
    if mtime is not None:
        for path in [root, *root.rglob("*")]:
            os.utime(path, (mtime, mtime))
    return root


def tree_state(root: Path) -> dict[str, object]:
    """What a restored folder must reproduce: every folder, and every file's bytes and exec bit."""
    state: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        relpath = path.relative_to(root).as_posix()
        state[relpath] = "dir" if path.is_dir() else (path.read_bytes(),
                                                      bool(path.stat().st_mode & 0o100))
    return state


def run(tmp_path: Path, kind: str, src: Path, name: str, **options) -> Path:
    """Run `kind` from `src` to a new path `name` in tmp_path; returns that path."""
    key = options.pop("key", None)
    options.setdefault("chunk_size", CHUNK)
    dest = tmp_path / name
    run_kind(KindOptions(kind=kind, **options), src, dest, key=key, workdir=tmp_path)
    return dest


def compressible(size: int, seed: int = 0) -> bytes:
    """Data with repeats at many distances, so compressors have real work to do."""
    rng = random.Random(seed)
    pieces, total = [], 0
    while total < size:
        piece = rng.randbytes(rng.randrange(8, 64)) * rng.randrange(1, 40)
        pieces.append(piece)
        total += len(piece)
    return b"".join(pieces)[:size]


# --- options -----------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    (1024, 1024), ("1KiB", 1024), ("100MiB", 100 * 2**20), ("4MB", 4_000_000),
    ("4MiB", 4 * 2**20), ("2048 B", 2048),
])
def test_chunk_size_accepts_the_range(value, expected):
    assert parse_chunk_size(value) == expected


@pytest.mark.parametrize("value", [1023, "101MiB", "1GB", 0, "lots", True])
def test_chunk_size_refuses_outside_the_range(value):
    with pytest.raises(KindError) as info:
        parse_chunk_size(value)
    message = str(info.value)
    assert "\n" not in message and repr(value) in message


def test_chunk_size_message_names_the_range():
    with pytest.raises(KindError, match=r"from 1 KiB \(1024 bytes\) to 100 MiB .*got 1023"):
        parse_chunk_size(1023)


@pytest.mark.parametrize("kind, algorithm, params, extra", [
    ("checksum", None, None, {}),
    ("checksum", "sha512", {}, {"expect": "sums.txt"}),
    ("compress", "zstd", {"level": 22}, {}),
    ("compress", "gzip", {"level": 1}, {}),
    ("compress", "xz", {"preset": 0}, {}),
    ("decompress", None, None, {}),
    ("encrypt", None, None, {"key_env": "K"}),
    ("decrypt", "chacha20-poly1305", None, {"key_file": "k.key"}),
    ("transform", None, None, {"call": "pkg.mod:fn"}),
    ("passthrough", None, None, {}),
])
def test_validate_accepts_good_settings(kind, algorithm, params, extra):
    assert validate(kind, algorithm, params, **extra) == []


@pytest.mark.parametrize("kind, algorithm, params, extra, expected", [
    ("archive", None, None, {}, "unknown kind 'archive'"),
    ("compress", "lz4", None, {}, "unknown algorithm 'lz4' for compress (known: zstd, gzip"),
    ("compress", "zstd", {"level": 23}, {}, "zstd level must be an integer from 1 to 22; got 23"),
    ("compress", None, {"level": 0}, {}, "zstd level must be an integer from 1 to 22; got 0"),
    ("compress", "gzip", {"level": 10}, {}, "gzip level must be an integer from 1 to 9"),
    ("compress", "bz2", {"level": True}, {}, "bz2 level must be an integer from 1 to 9"),
    ("compress", "xz", {"preset": 10}, {}, "xz preset must be an integer from 0 to 9"),
    ("compress", "zstd", {"lvl": 3}, {}, "unknown param 'lvl' for zstd (valid: level)"),
    ("checksum", "blake3", {"level": 3}, {}, "checksum with blake3 takes no params"),
    ("decompress", None, {"level": 3}, {}, "decompress takes no params"),
    ("compress", None, None, {"chunk_size": 512}, "chunk_size must be from 1 KiB"),
    ("compress", None, None, {"workers": 0}, "workers must be an integer from 1 to 64"),
    ("transform", None, None, {}, 'transform needs call = "module:function"'),
    ("transform", None, None, {"call": "no-colon"}, 'call must be "module:function"'),
    ("compress", None, None, {"call": "m:f"}, "call is only for transform stages"),
    ("compress", None, None, {"expect": "s"}, "expect is only for checksum stages"),
    ("encrypt", None, None, {}, "encrypt needs a key: set key_env"),
    ("decrypt", None, None, {"key_env": "K", "key_file": "f"}, "not both"),
    ("compress", None, None, {"key_env": "K"}, "key_env is only for encrypt and decrypt"),
    ("passthrough", "zstd", None, {}, "passthrough takes no algorithm"),
])
def test_validate_names_each_problem(kind, algorithm, params, extra, expected):
    problems = validate(kind, algorithm, params, **extra)
    assert len(problems) == 1 and expected in problems[0], problems


def test_validate_reports_every_problem_at_once():
    problems = validate("compress", "zstd", {"level": 99, "speed": 1}, workers=0, call="m:f")
    assert len(problems) == 4


def test_with_defaults_fills_algorithm_and_params():
    assert with_defaults(KindOptions(kind="compress")).params == {"level": 3}
    assert with_defaults(KindOptions(kind="compress", algorithm="xz")).params == {"preset": 6}
    assert with_defaults(KindOptions(kind="checksum")).algorithm == "blake3"
    assert with_defaults(KindOptions(kind="encrypt")).algorithm == "aes-256-gcm"
    assert with_defaults(KindOptions(kind="decompress")).algorithm is None


# --- compress and decompress -------------------------------------------------------------

@pytest.mark.parametrize("algorithm", COMPRESSORS)
def test_compress_round_trip_of_a_file(tmp_path, algorithm):
    src = tmp_path / "data.bin"
    src.write_bytes(compressible(50_000))
    packed = run(tmp_path, "compress", src, "data.pack", algorithm=algorithm)
    assert packed.stat().st_size < src.stat().st_size
    back = run(tmp_path, "decompress", packed, "back.bin")
    assert back.is_file() and back.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("algorithm", COMPRESSORS)
def test_compress_round_trip_of_a_folder(tmp_path, algorithm):
    src = make_tree(tmp_path / "tree")
    packed = run(tmp_path, "compress", src, "tree.pack", algorithm=algorithm)
    back = run(tmp_path, "decompress", packed, "back")
    assert back.is_dir() and tree_state(back) == tree_state(src)
    assert not (back / MARKER_NAME).exists()
    assert (back / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (back / "a.txt").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("algorithm", COMPRESSORS)
def test_compress_is_deterministic(tmp_path, algorithm):
    src = tmp_path / "data.bin"
    src.write_bytes(compressible(40_000))
    first = run(tmp_path, "compress", src, "one", algorithm=algorithm)
    second = run(tmp_path, "compress", src, "two", algorithm=algorithm)
    assert first.read_bytes() == second.read_bytes()


def test_zstd_bytes_do_not_depend_on_workers(tmp_path):
    # Level 1 uses 2 MiB jobs, so 5 MiB is several jobs spread over the workers.
    src = tmp_path / "data.bin"
    src.write_bytes(compressible(5 * 2**20))
    outputs = {
        run(tmp_path, "compress", src, f"out-{label}", params={"level": 1}, chunk_size="64KiB",
            **settings).read_bytes()
        for label, settings in [("serial", {"parallel": False}), ("w1", {"workers": 1}),
                                ("w2", {"workers": 2}), ("w4", {"workers": 4})]
    }
    assert len(outputs) == 1


def test_gzip_header_has_no_name_and_no_mtime(tmp_path):
    src = tmp_path / "named.txt"
    src.write_bytes(b"x" * 100)
    header = run(tmp_path, "compress", src, "out.gz", algorithm="gzip").read_bytes()[:10]
    assert header[3] == 0  # flags: no FNAME, no FEXTRA, no FCOMMENT
    assert header[4:8] == bytes(4)  # mtime 0


def test_folder_packing_ignores_mtimes_owners_and_creation_order(tmp_path):
    one = make_tree(tmp_path / "one", order=1, mtime=1_000_000)
    two = make_tree(tmp_path / "two", order=-1, mtime=2_000_000_000)
    if os.geteuid() == 0:
        for path in [two, *two.rglob("*")]:
            os.chown(path, 1234, 5678)
    for algorithm in ("zstd", "gzip"):
        assert (run(tmp_path, "compress", one, f"one.{algorithm}", algorithm=algorithm).read_bytes()
                == run(tmp_path, "compress", two, f"two.{algorithm}", algorithm=algorithm).read_bytes())


def test_packed_folder_is_a_plain_tar_with_the_marker_first(tmp_path):
    packed = run(tmp_path, "compress", make_tree(tmp_path / "tree"), "t.gz", algorithm="gzip")
    with tarfile.open(packed) as archive:
        members = archive.getmembers()
        assert members[0].name == MARKER_NAME
        assert archive.extractfile(members[0]).read() == MARKER_DATA
        names = [member.name for member in members[1:]]
        assert names == sorted(names, key=lambda name: name.encode())
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}


@pytest.mark.parametrize("algorithm", COMPRESSORS)
def test_decompress_detects_the_format(tmp_path, algorithm):
    src = tmp_path / "data.bin"
    src.write_bytes(compressible(10_000))
    packed = run(tmp_path, "compress", src, "data.x", algorithm=algorithm)
    assert run(tmp_path, "decompress", packed, "back").read_bytes() == src.read_bytes()
    other = "gzip" if algorithm != "gzip" else "zstd"
    with pytest.raises(KindError, match=f"is {algorithm} data, but algorithm = '{other}'"):
        run(tmp_path, "decompress", packed, "wrong", algorithm=other)
    assert not (tmp_path / "wrong").exists()


def test_decompress_refuses_data_that_is_not_compressed(tmp_path):
    src = tmp_path / "plain.txt"
    src.write_bytes(b"just text")
    with pytest.raises(KindError, match="not compressed data"):
        run(tmp_path, "decompress", src, "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("algorithm", COMPRESSORS)
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_decompress_of_damaged_data_fails_and_leaves_nothing(tmp_path, algorithm, damage):
    src = tmp_path / "data.bin"
    src.write_bytes(random.Random(3).randbytes(20_000))
    data = bytearray(run(tmp_path, "compress", src, "data.x", algorithm=algorithm).read_bytes())
    if damage == "truncate":
        del data[-5:]
    else:
        data[len(data) // 2] ^= 0x10
    bad = tmp_path / "bad.x"
    bad.write_bytes(data)
    with pytest.raises(KindError):
        run(tmp_path, "decompress", bad, "out")
    assert not (tmp_path / "out").exists()


def test_a_plain_tar_file_stays_a_file(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("hello.txt")
        info.size = 5
        archive.addfile(info, io.BytesIO(b"hello"))
    src = tmp_path / "archive.tar"
    src.write_bytes(buffer.getvalue())
    back = run(tmp_path, "decompress", run(tmp_path, "compress", src, "a.zst"), "back.tar")
    assert back.is_file() and back.read_bytes() == src.read_bytes()


def hostile_archive(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    """A gzip file holding the marker, then `member`: what an attacker could hand decompress."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        marker = tarfile.TarInfo(MARKER_NAME)
        marker.size = len(MARKER_DATA)
        archive.addfile(marker, io.BytesIO(MARKER_DATA))
        member.size = len(data)
        archive.addfile(member, io.BytesIO(data))
    path = tmp_path / "hostile.gz"
    path.write_bytes(gzip.compress(buffer.getvalue()))
    return path


@pytest.mark.parametrize("name, kind", [
    ("../escaped.txt", tarfile.REGTYPE), ("/abs.txt", tarfile.REGTYPE),
    ("ok/../../escaped.txt", tarfile.REGTYPE), ("link", tarfile.SYMTYPE),
    ("hard", tarfile.LNKTYPE), ("dev", tarfile.CHRTYPE),
])
def test_decompress_refuses_unsafe_members(tmp_path, name, kind):
    member = tarfile.TarInfo(name)
    member.type = kind
    member.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    data = b"evil" if kind == tarfile.REGTYPE else b""
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(KindError):
        run(work, "decompress", hostile_archive(tmp_path, member, data), "out")
    assert not (work / "out").exists()
    assert not (tmp_path / "escaped.txt").exists() and not Path("/abs.txt").exists()


def test_decompress_refuses_an_unknown_marker_version(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        marker = tarfile.TarInfo(MARKER_NAME)
        marker.size = len(b"stagestore folder v2\n")
        archive.addfile(marker, io.BytesIO(b"stagestore folder v2\n"))
    src = tmp_path / "future.gz"
    src.write_bytes(gzip.compress(buffer.getvalue()))
    with pytest.raises(KindError, match="newer stagestore"):
        run(tmp_path, "decompress", src, "out")
    assert not (tmp_path / "out").exists()


def test_packing_refuses_symlinks_and_the_marker_name(tmp_path):
    tree = make_tree(tmp_path / "tree")
    (tree / "link").symlink_to("a.txt")
    with pytest.raises(KindError, match="link in .* is a symlink"):
        run(tmp_path, "compress", tree, "out.zst")
    (tree / "link").unlink()
    (tree / MARKER_NAME).write_bytes(b"mine")
    with pytest.raises(KindError, match="reserved"):
        run(tmp_path, "compress", tree, "out.zst")
    assert not (tmp_path / "out.zst").exists()


# --- encrypt and decrypt -----------------------------------------------------------------

@pytest.mark.parametrize("algorithm", CIPHERS)
@pytest.mark.parametrize("size", [0, 1, CHUNK, 3 * CHUNK, 3 * CHUNK + 500])
def test_encrypt_round_trip(tmp_path, algorithm, size):
    src = tmp_path / "plain.bin"
    src.write_bytes(random.Random(size).randbytes(size))
    sealed = run(tmp_path, "encrypt", src, "sealed", algorithm=algorithm, key=KEY)
    chunks = max(1, -(-size // CHUNK))
    assert sealed.stat().st_size == 32 + size + 16 * chunks
    assert run(tmp_path, "decrypt", sealed, "back", key=KEY).read_bytes() == src.read_bytes()


@pytest.mark.parametrize("algorithm", CIPHERS)
def test_encrypt_round_trip_of_a_folder(tmp_path, algorithm):
    src = make_tree(tmp_path / "tree")
    sealed = run(tmp_path, "encrypt", src, "sealed", algorithm=algorithm, key=KEY, workers=2)
    back = run(tmp_path, "decrypt", sealed, "back", key=KEY, workers=2)
    assert tree_state(back) == tree_state(src)


def test_encryption_is_not_deterministic_but_the_header_is_as_documented(tmp_path):
    src = tmp_path / "plain.bin"
    src.write_bytes(b"same input")
    one = run(tmp_path, "encrypt", src, "one", algorithm="chacha20-poly1305", key=KEY).read_bytes()
    two = run(tmp_path, "encrypt", src, "two", algorithm="chacha20-poly1305", key=KEY).read_bytes()
    assert one != two and one[:16] == two[:16]
    assert one[:7] == b"SSENC1\x00" and one[7] == 1 and one[8] == 2
    assert one[9:12] == bytes(3) and int.from_bytes(one[12:16], "big") == CHUNK


def sealed_stream(tmp_path: Path) -> bytes:
    """An encrypted stream of 3.5 chunks: header (32 bytes), then records of 1040 bytes."""
    src = tmp_path / "plain.bin"
    src.write_bytes(random.Random(1).randbytes(3 * CHUNK + 512))
    return run(tmp_path, "encrypt", src, "sealed", key=KEY, workers=2).read_bytes()


RECORD = CHUNK + 16


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1:]


DAMAGES = {
    "magic byte": lambda d: _flip(d, 0),
    "version byte": lambda d: _flip(d, 7),
    "algorithm byte": lambda d: _flip(d, 8),
    "reserved byte": lambda d: _flip(d, 10),
    "chunk size byte": lambda d: _flip(d, 14),
    "salt byte": lambda d: _flip(d, 20),
    "middle chunk byte": lambda d: _flip(d, 32 + RECORD + 100),
    "first chunk tag": lambda d: _flip(d, 32 + RECORD - 1),
    "last chunk tag": lambda d: _flip(d, len(d) - 1),
    "swap chunks 0 and 1": lambda d: d[:32] + d[32 + RECORD:32 + 2 * RECORD]
    + d[32:32 + RECORD] + d[32 + 2 * RECORD:],
    "drop last chunk": lambda d: d[:32 + 3 * RECORD],
    "truncate mid-chunk": lambda d: d[:32 + RECORD + 300],
    "truncate to the header": lambda d: d[:32],
    "truncate inside the header": lambda d: d[:20],
    "append garbage": lambda d: d + b"garbage",
    "append a copy of the last chunk": lambda d: d + d[32 + 3 * RECORD:],
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_streams_fail_validation_and_leave_nothing(tmp_path, damage):
    bad = tmp_path / "bad"
    bad.write_bytes(DAMAGES[damage](sealed_stream(tmp_path)))
    with pytest.raises(ValidationFailureError) as info:
        run(tmp_path, "decrypt", bad, "out", key=KEY, workers=2)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_damaged_folder_stream_fails_and_leaves_no_folder(tmp_path):
    sealed = run(tmp_path, "encrypt", make_tree(tmp_path / "tree"), "sealed", key=KEY, workers=2)
    data = bytearray(sealed.read_bytes())
    data[32 + 5 * RECORD + 7] ^= 0x01
    sealed.write_bytes(data)
    with pytest.raises(DecryptionError, match="at chunk 5:"):
        run(tmp_path, "decrypt", sealed, "back", key=KEY, workers=2)
    assert not (tmp_path / "back").exists()


def test_wrong_key_fails_at_chunk_zero(tmp_path):
    sealed = tmp_path / "sealed.bin"
    sealed.write_bytes(sealed_stream(tmp_path))
    with pytest.raises(DecryptionError, match="decryption failed at chunk 0: wrong key") as info:
        run(tmp_path, "decrypt", sealed, "out", key=OTHER_KEY)
    assert info.value.chunk == 0 and not (tmp_path / "out").exists()


def test_dropping_the_last_chunk_is_reported_at_its_predecessor(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(DAMAGES["drop last chunk"](sealed_stream(tmp_path)))
    with pytest.raises(DecryptionError, match="at chunk 2:"):
        run(tmp_path, "decrypt", bad, "out", key=KEY)


def test_decrypt_with_the_wrong_algorithm_setting_is_refused(tmp_path):
    sealed = tmp_path / "sealed.bin"
    sealed.write_bytes(sealed_stream(tmp_path))
    with pytest.raises(KindError, match="encrypted with aes-256-gcm, but algorithm"):
        run(tmp_path, "decrypt", sealed, "out", key=KEY, algorithm="chacha20-poly1305")


def documented_decryptor():
    """`decrypt_stream` from the Python block in docs/kinds.md, which uses no stagestore code."""
    text = (ROOT / "docs" / "kinds.md").read_text()
    blocks = [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]
    namespace: dict = {}
    exec(next(block for block in blocks if "def decrypt_stream" in block), namespace)
    return namespace["decrypt_stream"]


@pytest.mark.parametrize("algorithm", CIPHERS)
@pytest.mark.parametrize("size", [0, 3 * CHUNK, 3 * CHUNK + 7])
def test_the_documented_recipe_decrypts_real_streams(tmp_path, algorithm, size):
    src = tmp_path / "plain.bin"
    src.write_bytes(random.Random(size).randbytes(size))
    sealed = run(tmp_path, "encrypt", src, "sealed", algorithm=algorithm, key=KEY, workers=2)
    assert documented_decryptor()(sealed.read_bytes(), KEY) == src.read_bytes()


def test_encrypt_needs_a_key(tmp_path):
    src = tmp_path / "plain.bin"
    src.write_bytes(b"x")
    with pytest.raises(KindError, match="encrypt needs a key"):
        run(tmp_path, "encrypt", src, "out")


# --- keys --------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [KEY.hex(), KEY.hex().upper(), base64.b64encode(KEY).decode(),
                                  f"  {KEY.hex()}\n"])
def test_load_key_from_the_environment(tmp_path, text):
    assert load_key("STAGE_KEY", None, tmp_path, {"STAGE_KEY": text}) == KEY


@pytest.mark.parametrize("content", [KEY, KEY.hex().encode() + b"\n",
                                     base64.b64encode(KEY) + b"\n"])
def test_load_key_from_a_file(tmp_path, content):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "stage.key").write_bytes(content)
    assert load_key(None, "keys/stage.key", tmp_path, {}) == KEY


@pytest.mark.parametrize("environ, expected", [
    ({}, "environment variable STAGE_KEY is not set"),
    ({"STAGE_KEY": ""}, "environment variable STAGE_KEY is empty"),
    ({"STAGE_KEY": KEY.hex()[:62]}, "neither 64 hex characters nor base64"),
    ({"STAGE_KEY": base64.b64encode(KEY[:16]).decode()}, "holds base64 of 16 bytes"),
    ({"STAGE_KEY": "not a key!"}, "neither 64 hex characters nor base64"),
])
def test_load_key_errors_name_the_variable_not_the_key(tmp_path, environ, expected):
    with pytest.raises(KindError, match=expected) as info:
        load_key("STAGE_KEY", None, tmp_path, environ)
    value = environ.get("STAGE_KEY", "")
    assert "\n" not in str(info.value) and (not value or value not in str(info.value))


def test_load_key_file_errors(tmp_path):
    with pytest.raises(KindError, match="cannot read key file .*missing.key"):
        load_key(None, "missing.key", tmp_path, {})
    (tmp_path / "short.key").write_bytes(KEY[:31])
    with pytest.raises(KindError, match=r"short.key \(31 bytes, not 32 raw bytes\) is neither"):
        load_key(None, "short.key", tmp_path, {})
    with pytest.raises(KindError, match="exactly one key source"):
        load_key("A", "b", tmp_path, {})


def test_key_id_is_stable_short_and_reveals_nothing():
    assert key_id(KEY) == key_id(bytes(KEY))
    assert key_id(KEY) != key_id(OTHER_KEY)
    assert len(key_id(KEY)) == 32 and int(key_id(KEY), 16) >= 0
    assert key_id(KEY) not in KEY.hex() and KEY.hex()[:8] not in key_id(KEY)


# --- checksum ----------------------------------------------------------------------------

CHECKERS = {"sha256": "sha256sum", "sha512": "sha512sum", "blake3": "b3sum"}


@pytest.mark.parametrize("algorithm", CHECKERS)
def test_sums_file_is_read_by_the_standard_tool(tmp_path, algorithm):
    tool = shutil.which(CHECKERS[algorithm])
    if tool is None:
        pytest.skip(f"{CHECKERS[algorithm]} is not on PATH")
    tree = make_tree(tmp_path / "tree")
    (tree / "odd\nname.txt").write_bytes(b"a newline in a name is escaped")
    sums = run(tmp_path, "checksum", tree, "SUMS", algorithm=algorithm, workers=2)
    result = subprocess.run([tool, "-c", str(sums)], cwd=tree, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": OK") == 7


def test_sums_file_lines_are_sorted_bytewise(tmp_path):
    tree = make_tree(tmp_path / "tree")
    lines = run(tmp_path, "checksum", tree, "SUMS").read_text().splitlines()
    paths = [line.split("  ", 1)[1] for line in lines]
    assert paths == sorted(paths, key=lambda p: p.encode()) and "b-sibling.txt" in paths
    assert paths.index("b-sibling.txt") < paths.index("b/c/deep.bin")
    assert all(len(line.split("  ", 1)[0]) == 64 for line in lines)


def test_checksum_of_a_single_file_uses_its_own_name(tmp_path):
    src = tmp_path / "report.csv"
    src.write_bytes(b"a,b\n")
    text = run(tmp_path, "checksum", src, "SUMS", algorithm="sha256").read_text()
    assert text == f"{hashlib.sha256(src.read_bytes()).hexdigest()}  report.csv\n"


def test_checksum_with_parallel_workers_matches_serial(tmp_path):
    tree = make_tree(tmp_path / "tree")
    serial = run(tmp_path, "checksum", tree, "serial", parallel=False).read_bytes()
    assert run(tmp_path, "checksum", tree, "parallel", workers=4).read_bytes() == serial


def test_checksum_expect_passes_when_sums_match(tmp_path):
    tree = make_tree(tmp_path / "tree")
    expected = run(tmp_path, "checksum", tree, "expected.sums", algorithm="sha256")
    out = run(tmp_path, "checksum", tree, "SUMS", algorithm="sha256", expect="expected.sums")
    assert out.read_bytes() == expected.read_bytes()


def test_checksum_expect_mismatch_names_every_file(tmp_path):
    tree = make_tree(tmp_path / "tree")
    run(tmp_path, "checksum", tree, "expected.sums")
    (tree / "a.txt").write_bytes(b"changed")
    (tree / "b" / "empty.txt").unlink()
    (tree / "new.txt").write_bytes(b"new")
    with pytest.raises(ChecksumMismatchError) as info:
        run(tmp_path, "checksum", tree, "SUMS", expect="expected.sums")
    error = info.value
    assert isinstance(error, ValidationFailureError)
    assert (error.differ, error.missing, error.extra) == (["a.txt"], ["b/empty.txt"], ["new.txt"])
    for path in ("a.txt", "b/empty.txt", "new.txt"):
        assert path in str(error)
    assert not (tmp_path / "SUMS").exists()


def test_checksum_expect_that_is_not_a_sums_file_is_refused(tmp_path):
    src = tmp_path / "f.txt"
    src.write_bytes(b"x")
    (tmp_path / "bad.sums").write_text("this is not a sums file\n")
    with pytest.raises(KindError, match="bad.sums, line 1: not `<blake3 hex>  <path>`"):
        run(tmp_path, "checksum", src, "SUMS", expect="bad.sums")


# --- transform, passthrough, run_kind's guards -------------------------------------------

TRANSFORM_MODULE = """
    import time

    def shout(chunk):
        # Later chunks finish first, so only ordered writing gives the right output.
        time.sleep(0.002 * (chunk[0] % 5))
        return chunk.upper()

    def explode(chunk):
        if b"boom" in chunk:
            raise RuntimeError("found a boom")
        return chunk

    def not_bytes(chunk):
        return len(chunk)
"""


@pytest.fixture
def transform_workdir(tmp_path: Path) -> Path:
    name = f"kindfns_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(TRANSFORM_MODULE))
    yield tmp_path
    sys.modules.pop(name, None)


def _call(workdir: Path, function: str) -> str:
    return f"kindfns_{workdir.name.replace('-', '_')}:{function}"


def test_transform_applies_in_order_with_parallel_workers(transform_workdir):
    src = transform_workdir / "in.txt"
    src.write_bytes(b"".join(bytes([97 + i % 26]) * CHUNK for i in range(40)) + b"tail")
    out = run(transform_workdir, "transform", src, "out.txt",
              call=_call(transform_workdir, "shout"), workers=4)
    assert out.read_bytes() == src.read_bytes().upper()


def test_transform_failure_names_the_chunk(transform_workdir):
    src = transform_workdir / "in.txt"
    src.write_bytes(b"a" * CHUNK * 2 + b"boom" + b"a" * 100)
    with pytest.raises(KindError, match="failed on chunk 2: RuntimeError: found a boom"):
        run(transform_workdir, "transform", src, "out", call=_call(transform_workdir, "explode"),
            workers=2)
    assert not (transform_workdir / "out").exists()


def test_transform_must_return_bytes(transform_workdir):
    src = transform_workdir / "in.txt"
    src.write_bytes(b"abc")
    with pytest.raises(KindError, match="returned int for chunk 0"):
        run(transform_workdir, "transform", src, "out", call=_call(transform_workdir, "not_bytes"))


def test_transform_that_cannot_be_loaded(tmp_path):
    src = tmp_path / "in.txt"
    src.write_bytes(b"abc")
    with pytest.raises(KindError, match="cannot load transform 'no_such_module_xyz:f'"):
        run(tmp_path, "transform", src, "out", call="no_such_module_xyz:f")


def test_passthrough_is_left_to_the_runner(tmp_path):
    src = tmp_path / "in.txt"
    src.write_bytes(b"abc")
    with pytest.raises(KindError, match="handled by the runner"):
        run(tmp_path, "passthrough", src, "out")
    assert not (tmp_path / "out").exists()


def test_run_kind_refuses_an_existing_output_and_one_inside_the_input(tmp_path):
    tree = make_tree(tmp_path / "tree")
    (tmp_path / "taken").write_bytes(b"keep me")
    with pytest.raises(KindError, match="already exists"):
        run(tmp_path, "checksum", tree, "taken")
    assert (tmp_path / "taken").read_bytes() == b"keep me"
    with pytest.raises(KindError, match="inside the input folder"):
        run(tree, "checksum", tree, "SUMS")


# --- memory and the child entry point ----------------------------------------------------

MEMORY_PROBE = """
import sys
from pathlib import Path
from stagestore.kinds import KindOptions, run_kind
from stagestore.kinds.chunks import peak_rss_bytes

kind, algorithm, src, dest = sys.argv[1:5]
options = {"params": {"level": 1}} if kind == "compress" else {}
before = peak_rss_bytes()
stats = run_kind(KindOptions(kind=kind, algorithm=algorithm, chunk_size=2**20, workers=2,
                             **options), Path(src), Path(dest), key=bytes(32))
print(stats.peak_rss_bytes - before)
"""


@pytest.mark.parametrize("kind, algorithm", [("compress", "zstd"), ("encrypt", "aes-256-gcm")])
def test_memory_stays_bounded_on_a_large_input(tmp_path, kind, algorithm):
    src = tmp_path / "big.bin"
    block = os.urandom(2**20)
    with open(src, "wb") as out:
        for _ in range(64):
            out.write(block)
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, kind, algorithm, str(src),
                             str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    growth = int(result.stdout)
    assert growth < 64 * 2**20, f"peak RSS grew by {growth >> 20} MiB on a 64 MiB input"


def kindstage(tmp_path: Path, context: dict, env: dict | None = None) -> subprocess.CompletedProcess:
    path = tmp_path / "context.json"
    path.write_text(json.dumps({"workdir": str(tmp_path), "stats": str(tmp_path / "stats.json"),
                                "chunk_size": "1KiB", **context}))
    return subprocess.run([sys.executable, "-m", "stagestore.execution.kindstage", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_kindstage_success_writes_stats(tmp_path):
    src = tmp_path / "in.txt"
    src.write_bytes(b"hello " * 1000)
    result = kindstage(tmp_path, {"kind": "compress", "algorithm": "gzip", "params": {"level": 9},
                                  "src": str(src), "dest": str(tmp_path / "out.gz")})
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["bytes_in"] == 6000 and 0 < stats["bytes_out"] < 6000
    assert stats["peak_rss_bytes"] > 0 and stats["seconds"] >= 0
    assert gzip.decompress((tmp_path / "out.gz").read_bytes()) == src.read_bytes()


def test_kindstage_reads_the_key_from_the_environment(tmp_path):
    src = tmp_path / "in.txt"
    src.write_bytes(b"secret " * 500)
    common = {"key_env": "STAGE_KEY", "src": str(src)}
    sealed = kindstage(tmp_path, {"kind": "encrypt", "dest": str(tmp_path / "sealed"), **common},
                       env={"STAGE_KEY": KEY.hex()})
    assert sealed.returncode == 0, sealed.stderr
    assert KEY.hex() not in (tmp_path / "context.json").read_text()
    common["src"] = str(tmp_path / "sealed")
    wrong = kindstage(tmp_path, {"kind": "decrypt", "dest": str(tmp_path / "back"), **common},
                      env={"STAGE_KEY": OTHER_KEY.hex()})
    assert wrong.returncode == 3
    assert wrong.stderr.strip().startswith("ValidationFailure: decryption failed at chunk 0")
    assert not (tmp_path / "back").exists()
    missing = kindstage(tmp_path, {"kind": "decrypt", "dest": str(tmp_path / "back"), **common},
                        env={"STAGE_KEY": ""})
    assert missing.returncode == 2
    assert missing.stderr == "KindFailure: environment variable STAGE_KEY is empty; it must " \
        "hold the key (64 hex characters, or base64 of 32 bytes)\n"


def test_kindstage_exit_codes_for_failures(tmp_path):
    src = tmp_path / "in.txt"
    src.write_bytes(b"data")
    (tmp_path / "expected.sums").write_text(f"{'0' * 64}  in.txt\n")
    mismatch = kindstage(tmp_path, {"kind": "checksum", "expect": "expected.sums",
                                    "src": str(src), "dest": str(tmp_path / "SUMS")})
    assert mismatch.returncode == 3
    assert mismatch.stderr.startswith("ValidationFailure: checksums do not match expected.sums")
    bad_level = kindstage(tmp_path, {"kind": "compress", "params": {"level": 50},
                                     "src": str(src), "dest": str(tmp_path / "out")})
    assert bad_level.returncode == 2
    assert bad_level.stderr.startswith("KindFailure: zstd level must be an integer from 1 to 22")
    wrong_type = kindstage(tmp_path, {"kind": "compress", "parallel": "yes", "src": str(src),
                                      "dest": str(tmp_path / "out")})
    assert wrong_type.returncode == 2
    assert wrong_type.stderr.startswith("KindFailure: invalid stage settings: Expected `bool`")
    broken = kindstage(tmp_path, {"kind": "compress", "dest": str(tmp_path / "out")})
    assert broken.returncode == 1 and "Traceback" in broken.stderr and "KeyError" in broken.stderr
    assert not (tmp_path / "SUMS").exists() and not (tmp_path / "out").exists()
