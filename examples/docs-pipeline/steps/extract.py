#!/usr/bin/env python3
"""Stage `extract`: pull terms and wiki links out of every document.

Usage: extract.py IN_FOLDER TERMS_OUT LINKS_OUT

For each IN_FOLDER/<stem>.txt:
  * links are wiki-style `[[target]]` or `[[target|label]]`; the target is
    what counts (a document stem),
  * terms are runs of 3 or more letters, minus a small stopword list,
    counted per document (the words of a link's label count as text).

Writes TERMS_OUT/<stem>.json = {"doc": stem, "terms": {term: count}} and a
single LINKS_OUT JSON file = {doc: [sorted unique link targets]}.
"""
import json
import re
import sys
from collections import Counter
from pathlib import Path

LINK = re.compile(r"\[\[([^\[\]\n]+?)\]\]")
WORD = re.compile(r"[^\W\d_]{3,}")
STOPWORDS = frozenset("""
    about after again all also and any are as because been before being
    but can cannot could did does doing each either every for from had has
    have how into its itself may more most must never nor not now off once
    one only other our out over same see should since some such than that
    the their them then there these they this those through too under
    until very was were what when where which while who why will with
    within without would you your
""".split())


def fail(message):
    print(f"extract: error: {message}", file=sys.stderr)
    sys.exit(1)


def write_json(path, data):
    path.write_text(json.dumps(data, sort_keys=True, indent=2) + "\n", encoding="utf-8", newline="\n")


def make_output_folder(path):
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        fail(f"output path {str(path)!r} already exists and is not an empty folder")
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        fail(f"cannot create output folder {str(path)!r}: {exc}")


def extract(text):
    targets = set()

    def replace_link(match):
        target, _, label = match.group(1).partition("|")
        target = " ".join(target.split())
        if target:
            targets.add(target)
        return " " + (label or target) + " "

    text = LINK.sub(replace_link, text)
    terms = Counter(w for w in WORD.findall(text) if w.lower() not in STOPWORDS)
    return dict(terms), sorted(targets)


def main(argv):
    if len(argv) != 3:
        fail("usage: extract.py IN_FOLDER TERMS_OUT LINKS_OUT")
    src, terms_out, links_out = Path(argv[0]), Path(argv[1]), Path(argv[2])
    if not src.is_dir():
        fail(f"input folder {str(src)!r} does not exist or is not a folder")
    files = sorted(p for p in src.glob("*.txt") if p.is_file())
    if not files:
        fail(f"no .txt files found in {str(src)!r}")

    make_output_folder(terms_out)
    links = {}
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            fail(f"{path} is not valid UTF-8: {exc}")
        terms, targets = extract(text)
        write_json(terms_out / f"{path.stem}.json", {"doc": path.stem, "terms": terms})
        links[path.stem] = targets
    write_json(links_out, links)
    print(f"extract: processed {len(files)} document(s)", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
