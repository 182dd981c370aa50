#!/usr/bin/env python3
"""Stage `normalize`: clean up the text of every document.

Usage: normalize.py IN_FOLDER OUT_FOLDER

Parameters come from the environment variable STAGESTORE_PARAMS, a JSON
object (missing or empty means {}):
  lowercase  (bool, default true)  lowercase the whole text

For each IN_FOLDER/<stem>.txt: apply Unicode NFKC normalisation, collapse
runs of whitespace inside each line to one space, strip the line ends,
optionally lowercase, and write OUT_FOLDER/<stem>.txt ending in one newline.
"""
import json
import os
import re
import sys
import unicodedata
from pathlib import Path

WHITESPACE = re.compile(r"\s+")


def fail(message):
    print(f"normalize: error: {message}", file=sys.stderr)
    sys.exit(1)


def read_params():
    raw = os.environ.get("STAGESTORE_PARAMS", "").strip()
    if not raw:
        return {}
    try:
        params = json.loads(raw)
    except json.JSONDecodeError as exc:
        fail(f"STAGESTORE_PARAMS is not valid JSON: {exc}")
    if not isinstance(params, dict):
        fail("STAGESTORE_PARAMS must be a JSON object")
    return params


def make_output_folder(path):
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        fail(f"output path {str(path)!r} already exists and is not an empty folder")
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        fail(f"cannot create output folder {str(path)!r}: {exc}")


def normalize(text, lowercase):
    text = unicodedata.normalize("NFKC", text)
    lines = [WHITESPACE.sub(" ", line).strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    text = "\n".join(lines) + "\n"
    return text.lower() if lowercase else text


def main(argv):
    if len(argv) != 2:
        fail("usage: normalize.py IN_FOLDER OUT_FOLDER")
    src, out = Path(argv[0]), Path(argv[1])
    params = read_params()
    lowercase = params.get("lowercase", True)
    if not isinstance(lowercase, bool):
        fail(f"parameter 'lowercase' must be true or false, got {lowercase!r}")
    if not src.is_dir():
        fail(f"input folder {str(src)!r} does not exist or is not a folder")
    files = sorted(p for p in src.glob("*.txt") if p.is_file())
    if not files:
        fail(f"no .txt files found in {str(src)!r}")

    make_output_folder(out)
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            fail(f"{path} is not valid UTF-8: {exc}")
        (out / path.name).write_text(normalize(text, lowercase), encoding="utf-8", newline="\n")
    print(f"normalize: wrote {len(files)} document(s) to {out} (lowercase={lowercase})", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
