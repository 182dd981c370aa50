#!/usr/bin/env python3
"""Stage `index`: build an inverted index from the per-document terms.

Usage: index.py TERMS_FOLDER INDEX_OUT

Reads TERMS_FOLDER/<stem>.json ({"doc": stem, "terms": {term: count}}) and
writes INDEX_OUT JSON:
  {"doc_lengths": {doc: total term count},
   "terms": {term: {doc: count}}}
"""
import json
import sys
from pathlib import Path


def fail(message):
    print(f"index: error: {message}", file=sys.stderr)
    sys.exit(1)


def main(argv):
    if len(argv) != 2:
        fail("usage: index.py TERMS_FOLDER INDEX_OUT")
    terms_dir, index_out = Path(argv[0]), Path(argv[1])
    if not terms_dir.is_dir():
        fail(f"terms folder {str(terms_dir)!r} does not exist or is not a folder")
    files = sorted(p for p in terms_dir.glob("*.json") if p.is_file())
    if not files:
        fail(f"no .json files found in {str(terms_dir)!r}")

    postings, doc_lengths = {}, {}
    for path in files:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            fail(f"{path} is not valid JSON: {exc}")
        if not isinstance(record, dict):
            record = {}
        terms = record.get("terms")
        if record.get("doc") != path.stem or not isinstance(terms, dict) or not all(
            isinstance(c, int) and c > 0 for c in terms.values()
        ):
            fail(f"{path} must be {{\"doc\": {path.stem!r}, \"terms\": {{term: positive count}}}}")
        doc_lengths[path.stem] = sum(terms.values())
        for term, count in terms.items():
            postings.setdefault(term, {})[path.stem] = count

    index = {"doc_lengths": doc_lengths, "terms": postings}
    index_out.write_text(json.dumps(index, sort_keys=True, indent=2) + "\n", encoding="utf-8", newline="\n")
    print(f"index: {len(postings)} term(s) over {len(doc_lengths)} document(s)", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
