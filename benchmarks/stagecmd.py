#!/usr/bin/env python3
"""Stage commands and floor probes of the benchmark, as one stand-alone script.

It is copied into every benchmark workspace and run as a stage (`{inputs.script}`), by DVC and
on its own (the floors), so all three run exactly the same code.  Standard library only, except
the `hash-*` probes, which import blake3 (and stagestore for `hash-stagestore`), and the peers of
the built-in kinds, which import cryptography (`aesgcm-file`) or zstandard (`zstd-oneshot`).

    write-file OUT SIZE [--fsync] [--ino-file PATH]   SIZE bytes from a page-aligned 1 MiB buffer
    write-files OUTDIR COUNT SIZE [--fsync]            COUNT files of SIZE bytes in a new folder
    write-small OUT                                     a 16-byte file
    hash-blake3 FILE                                    blake3 update_mmap, max_threads=AUTO
    hash-stagestore FILE                                stagestore.store.hashing.hash_file
    read-chunks FILE bytearray|mmap                     read in 1 MiB chunks into that buffer
    write-text OUT SIZE [--seed N]                      text-like data (words, ~3x compressible)
    aesgcm-file IN OUT                                  AESGCM(key).encrypt of the whole file,
                                                        in one call (read, encrypt, write)
    zstd-oneshot IN OUT LEVEL THREADS                   ZstdCompressor(...).compress of the whole
                                                        file, in one call (read, compress, write)
    obstore-put DIR BUCKET PREFIX ENDPOINT [JOBS]      obstore.put(store, key, Path) of every file
                                                        under DIR (key PREFIX/relative path), JOBS
                                                        threads (default 8); credentials: AWS_* env
    obstore-get BUCKET PREFIX DIR ENDPOINT [JOBS] [fsync]  obstore.get of every key under PREFIX,
                                                        each streamed into DIR/key, JOBS threads
                                                        (with `fsync`: each file fsynced)
    count-requests STAGESTORE-ARGS...                   run the stagestore CLI in-process, counting
                                                        the S3 requests of its remote (S3Storage)
    write-tree OUTDIR FOLDERS PER_FOLDER                FOLDERS folders of PER_FOLDER small text
                                                        files (each distinct, 20-40 bytes)
    stat-walk DIR                                       os.scandir walk, one lstat per entry

Every probe prints one JSON line on stdout: {"seconds": <time of the work alone>, ...}; the
write commands print it only with --report (a stage's stdout is stored as a log object).
"""

from __future__ import annotations

import json
import mmap
import os
import random
import sys
import time

CHUNK = 1 << 20


def _pattern(seed: int) -> mmap.mmap:
    """A page-aligned 1 MiB buffer of pseudo-random bytes (an anonymous mmap)."""
    buf = mmap.mmap(-1, CHUNK)
    buf[:] = random.Random(seed).randbytes(CHUNK)
    return buf


def write_file(out: str, size: int, fsync: bool, ino_file: str | None, seed: int = 1) -> dict:
    buf = _pattern(seed)
    view = memoryview(buf)
    t0 = time.perf_counter()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        done = 0
        index = 0
        while done < size:
            # Every chunk differs (its index in the first 8 bytes), so the file is not a
            # repetition a content-addressed or deduplicating store could shortcut.
            buf[0:8] = index.to_bytes(8, "little")
            n = min(CHUNK, size - done)
            part = view[:n]
            while part:
                written = os.write(fd, part)
                part = part[written:]
            done += n
            index += 1
        if fsync:
            os.fsync(fd)
        ino = os.fstat(fd).st_ino
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    if ino_file:
        with open(ino_file, "w") as f:
            f.write(f"{ino}\n")
    return {"seconds": seconds, "bytes": size, "ino": ino}


def write_files(outdir: str, count: int, size: int, fsync: bool, seed: int = 2) -> dict:
    base = bytearray(random.Random(seed).randbytes(size))
    t0 = time.perf_counter()
    os.mkdir(outdir)
    for i in range(count):
        base[0:8] = i.to_bytes(8, "little")
        fd = os.open(os.path.join(outdir, f"f{i:06d}.bin"), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                     0o644)
        try:
            os.write(fd, base)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    if fsync:
        dfd = os.open(outdir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return {"seconds": time.perf_counter() - t0, "files": count, "bytes": count * size}


def hash_blake3(path: str) -> dict:
    import blake3

    t0 = time.perf_counter()
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    hasher.update_mmap(path)
    digest = hasher.hexdigest()
    return {"seconds": time.perf_counter() - t0, "digest": digest}


def hash_stagestore(path: str) -> dict:
    from stagestore.store.hashing import hash_file

    t0 = time.perf_counter()
    digest = hash_file(path)
    return {"seconds": time.perf_counter() - t0, "digest": digest}


def read_chunks(path: str, kind: str) -> dict:
    buf = bytearray(CHUNK) if kind == "bytearray" else mmap.mmap(-1, CHUNK)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            total += n
    return {"seconds": time.perf_counter() - t0, "bytes": total}


LETTERS = "etaoinshrdlucmfwypvbgkjqxz"
LETTER_WEIGHTS = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.2, 2.0,
                  2.0, 1.9, 1.0, 1.5, 2.0, 0.8, 0.2, 0.1, 0.2, 0.1]


def _word_table(rng: random.Random) -> list[bytes]:
    """65,536 word slots: 2,048 made-up words of English-like letters, each in as many slots
    as a Zipf law (exponent 1.1) gives it, some with a comma, a capital, a number or a full
    stop and line feed, shuffled.  A uniform 16-bit index into it draws words the Zipf way."""
    words = []
    for _ in range(2048):
        n = min(12, max(1, int(rng.expovariate(1 / 5)) + 1))
        words.append("".join(rng.choices(LETTERS, LETTER_WEIGHTS, k=n)).encode())
    ranks = [1 / (r + 1) ** 1.1 for r in range(len(words))]
    total = sum(ranks)
    table: list[bytes] = []
    for word, p in zip(words, ranks):
        table += [word] * max(1, round(p / total * 65536))
    table = table[:65536]
    while len(table) < 65536:
        table.append(rng.choice(words))
    rng.shuffle(table)
    for i in range(0, 65536, 7):
        word = table[i]
        table[i] = (word + b"," if i % 3 == 0 else word.capitalize() if i % 3 == 1
                    else word + str(rng.randrange(1000)).encode())
    for i in range(0, 65536, 97):
        table[i] += b".\n"
    return table


def write_text(out: str, size: int, seed: int = 3) -> dict:
    """SIZE bytes of text-like data, the same for the same seed: words drawn from a Zipf-like
    vocabulary with random variation (about 3x compressible by zstd level 3, like prose or
    logs, and never a repetition of a whole block that a compressor's window could find)."""
    from array import array

    rng = random.Random(seed)
    table = _word_table(rng)
    t0 = time.perf_counter()
    done = 0
    with open(out, "xb") as f:
        while done < size:
            n = min(CHUNK, size - done)
            index = array("H")
            index.frombytes(rng.randbytes(2 * (n // 5 + 16)))  # words average over 5 bytes
            if sys.byteorder == "big":
                index.byteswap()  # the same words on every machine
            piece = b" ".join(map(table.__getitem__, index))[:n]
            f.write(piece)
            done += len(piece)
    return {"seconds": time.perf_counter() - t0, "bytes": done}


def aesgcm_file(src: str, out: str) -> dict:
    """The peer of the encrypt kind: the whole file in one `AESGCM(key).encrypt` call, as a
    user with the cryptography package would write it (read it all, one call, write it all)."""
    t0 = time.perf_counter()
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    t1 = time.perf_counter()
    with open(src, "rb") as f:
        data = f.read()
    t2 = time.perf_counter()
    sealed = AESGCM(bytes(range(32))).encrypt(bytes(12), data, None)
    t3 = time.perf_counter()
    with open(out, "xb") as f:
        f.write(sealed)
    t4 = time.perf_counter()
    return {"import": t1 - t0, "read": t2 - t1, "encrypt": t3 - t2, "write": t4 - t3,
            "seconds": t4 - t1, "bytes": len(data), "bytes_out": len(sealed)}


def zstd_oneshot(src: str, out: str, level: int, threads: int) -> dict:
    """python-zstandard's own one-shot compressor over the whole file (read, compress, write)."""
    t0 = time.perf_counter()
    import zstandard

    t1 = time.perf_counter()
    with open(src, "rb") as f:
        data = f.read()
    t2 = time.perf_counter()
    packed = zstandard.ZstdCompressor(level=level, threads=threads).compress(data)
    t3 = time.perf_counter()
    with open(out, "xb") as f:
        f.write(packed)
    t4 = time.perf_counter()
    return {"import": t1 - t0, "read": t2 - t1, "compress": t3 - t2, "write": t4 - t3,
            "seconds": t4 - t1, "bytes": len(data), "bytes_out": len(packed)}


def _s3(bucket: str, prefix: str, endpoint: str):  # noqa: ANN202
    """An obstore S3Store on BUCKET (credentials and region from the AWS_* environment)."""
    from obstore.store import S3Store

    return S3Store(bucket, prefix=prefix.strip("/") or None, endpoint=endpoint,
                   client_options={"allow_http": True} if endpoint.startswith("http://") else None)


def obstore_put(src: str, bucket: str, prefix: str, endpoint: str, jobs: int) -> dict:
    """The peer of `stagestore push`: a plain obstore PUT loop, `obstore.put(store, key,
    Path)` for every file under SRC (obstore's defaults: multipart above 5 MiB), JOBS at once."""
    t0 = time.perf_counter()
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    import obstore

    t1 = time.perf_counter()
    store = _s3(bucket, "", endpoint)
    files = []
    for folder, _, names in os.walk(src):
        files += [os.path.join(folder, name) for name in names]
    base = prefix.strip("/")

    def put(path: str) -> int:
        rel = os.path.relpath(path, src).replace(os.sep, "/")
        obstore.put(store, f"{base}/{rel}" if base else rel, Path(path))
        return os.path.getsize(path)

    with ThreadPoolExecutor(jobs) as pool:
        total = sum(pool.map(put, files))
    t2 = time.perf_counter()
    return {"import": t1 - t0, "seconds": t2 - t1, "objects": len(files), "bytes": total}


def obstore_get(bucket: str, prefix: str, dest: str, endpoint: str, jobs: int,
                fsync: bool = False) -> dict:
    """The peer of `stagestore pull`: list PREFIX, then a plain obstore GET loop, each object
    streamed into DEST/KEY (fsynced only with `fsync`), JOBS at once."""
    t0 = time.perf_counter()
    from concurrent.futures import ThreadPoolExecutor

    import obstore

    t1 = time.perf_counter()
    store = _s3(bucket, "", endpoint)
    keys = [meta["path"] for page in obstore.list(store, prefix=prefix.strip("/") or None,
                                                   chunk_size=1000) for meta in page]
    for folder in {os.path.dirname(key) for key in keys}:
        os.makedirs(os.path.join(dest, folder), exist_ok=True)

    def get(key: str) -> int:
        n = 0
        with open(os.path.join(dest, key), "xb") as f:
            for chunk in obstore.get(store, key):
                n += f.write(chunk)
            if fsync:
                os.fsync(f.fileno())
        return n

    with ThreadPoolExecutor(jobs) as pool:
        total = sum(pool.map(get, keys))
    t2 = time.perf_counter()
    return {"import": t1 - t0, "seconds": t2 - t1, "objects": len(keys), "bytes": total}


def count_requests(args: list[str]) -> dict:
    """Run `stagestore ARGS...` in this process with every S3 request of its remote counted
    (a list page is one request; an empty listing still one)."""
    from stagestore.remote import storage
    from stagestore.cli import main as cli_main

    counts: dict[str, int] = {}
    cls = storage.S3Storage

    def counted(name: str):  # noqa: ANN202
        original = getattr(cls, name)

        def call(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            counts[name] = counts.get(name, 0) + 1
            return original(self, *a, **k)
        return call

    original_list = cls.list

    def listing(self, prefix: str):  # noqa: ANN001, ANN202
        pages = 0
        for page in original_list(self, prefix):
            pages += 1
            yield page
        counts["list"] = counts.get("list", 0) + max(1, pages)

    for name in ("read", "read_chunks", "write", "write_file", "create", "delete", "stat"):
        setattr(cls, name, counted(name))
    cls.list = listing
    t0 = time.perf_counter()
    code = cli_main(args)
    return {"seconds": time.perf_counter() - t0, "exit_code": code, "requests": counts,
            "total": sum(counts.values())}


def write_tree(out: str, folders: int, per_folder: int) -> dict:
    """The 100,000-file input of issue 15: `d0000/f000000.txt`, ..., small and distinct."""
    t0 = time.perf_counter()
    os.mkdir(out)
    n = 0
    for d in range(folders):
        folder = os.path.join(out, f"d{d:04d}")
        os.mkdir(folder)
        for _ in range(per_folder):
            with open(os.path.join(folder, f"f{n:07d}.txt"), "w") as f:
                f.write(f"document {n} in folder {d}\n")
            n += 1
    return {"seconds": time.perf_counter() - t0, "files": n}


def stat_walk(root: str) -> dict:
    """What a snapshot cannot avoid: list every folder and lstat every entry (os.scandir's
    DirEntry.stat without following links; the type comes from the listing)."""
    t0 = time.perf_counter()
    files = 0
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                entry.stat(follow_symlinks=False)
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    files += 1
    return {"seconds": time.perf_counter() - t0, "files": files}


def main(argv: list[str]) -> int:
    report = "--report" in argv
    argv = [a for a in argv if a != "--report"]
    fsync = "--fsync" in argv
    argv = [a for a in argv if a != "--fsync"]
    ino_file = None
    if "--ino-file" in argv:
        i = argv.index("--ino-file")
        ino_file = argv[i + 1]
        del argv[i:i + 2]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "write-file":
        result = write_file(args[0], int(args[1]), fsync, ino_file)
    elif cmd == "write-files":
        result = write_files(args[0], int(args[1]), int(args[2]), fsync)
    elif cmd == "write-small":
        with open(args[0], "wb") as f:
            f.write(b"benchmark output")
        result = {"seconds": 0.0}
    elif cmd == "hash-blake3":
        result, report = hash_blake3(args[0]), True
    elif cmd == "hash-stagestore":
        result, report = hash_stagestore(args[0]), True
    elif cmd == "read-chunks":
        result, report = read_chunks(args[0], args[1]), True
    elif cmd == "write-text":
        seed = 3
        if "--seed" in args:
            i = args.index("--seed")
            seed = int(args[i + 1])
            del args[i:i + 2]
        result, report = write_text(args[0], int(args[1]), seed), True
    elif cmd == "aesgcm-file":
        result, report = aesgcm_file(args[0], args[1]), True
    elif cmd == "zstd-oneshot":
        result, report = zstd_oneshot(args[0], args[1], int(args[2]), int(args[3])), True
    elif cmd == "obstore-put":
        jobs = int(args[4]) if len(args) > 4 else 8
        result, report = obstore_put(args[0], args[1], args[2], args[3], jobs), True
    elif cmd == "obstore-get":
        jobs = int(args[4]) if len(args) > 4 else 8
        fsync = len(args) > 5 and args[5] == "fsync"
        result, report = obstore_get(args[0], args[1], args[2], args[3], jobs, fsync), True
    elif cmd == "count-requests":
        result, report = count_requests(args), True
    elif cmd == "write-tree":
        result = write_tree(args[0], int(args[1]), int(args[2]))
    elif cmd == "stat-walk":
        result, report = stat_walk(args[0]), True
    else:
        print(f"stagecmd: unknown command {cmd!r}", file=sys.stderr)
        return 2
    if report:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
