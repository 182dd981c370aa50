#!/usr/bin/env python3
"""Stage `ingest`: copy up to LIMIT source documents into OUT_FOLDER.

Usage: ingest.py SRC_FOLDER OUT_FOLDER LIMIT

Finds every *.txt file under SRC_FOLDER (recursively), sorts them by their
path relative to SRC_FOLDER, keeps the first LIMIT and writes each one,
unchanged, to OUT_FOLDER/<stem>.txt. Fails if there is no .txt file, if the
text is not valid UTF-8, or if two files share a stem.
"""
import sys
from pathlib import Path


def fail(message):
    print(f"ingest: error: {message}", file=sys.stderr)
    sys.exit(1)


def make_output_folder(path):
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        fail(f"output path {str(path)!r} already exists and is not an empty folder")
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        fail(f"cannot create output folder {str(path)!r}: {exc}")


def main(argv):
    if len(argv) != 3:
        fail("usage: ingest.py SRC_FOLDER OUT_FOLDER LIMIT")
    src, out, limit_text = Path(argv[0]), Path(argv[1]), argv[2]
    try:
        limit = int(limit_text)
    except ValueError:
        fail(f"LIMIT must be an integer, got {limit_text!r}")
    if limit < 1:
        fail(f"LIMIT must be at least 1, got {limit}")
    if not src.is_dir():
        fail(f"source folder {str(src)!r} does not exist or is not a folder")

    files = sorted(
        (p for p in src.rglob("*.txt") if p.is_file()),
        key=lambda p: p.relative_to(src).as_posix(),
    )
    if not files:
        fail(f"no .txt files found in {str(src)!r}")
    files = files[:limit]

    seen = {}
    for path in files:
        if path.stem in seen:
            fail(f"duplicate document name {path.stem!r}: {seen[path.stem]} and {path}")
        seen[path.stem] = path

    make_output_folder(out)
    for path in files:
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            fail(f"{path} is not valid UTF-8: {exc}")
        (out / f"{path.stem}.txt").write_bytes(data)
    print(f"ingest: wrote {len(files)} document(s) to {out}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
