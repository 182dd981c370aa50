#!/usr/bin/env python3
"""Stage `link`: resolve wiki links into a document graph.

Usage: link.py LINKS_JSON TERMS_FOLDER GRAPH_OUT

The set of documents is the stems of TERMS_FOLDER/*.json. Every link in
LINKS_JSON ({doc: [targets]}) whose target is a known document becomes an
edge; the others are reported as dangling. Self links are ignored.

Writes GRAPH_OUT JSON:
  {"edges": [[src, dst], ...], "dangling": [[src, target], ...],
   "backlinks": {doc: [sorted sources]}, "orphans": [docs with no inbound link]}
"""
import json
import sys
from pathlib import Path


def fail(message):
    print(f"link: error: {message}", file=sys.stderr)
    sys.exit(1)


def load_json(path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        fail(f"file {str(path)!r} not found")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(f"{path} is not valid JSON: {exc}")


def main(argv):
    if len(argv) != 3:
        fail("usage: link.py LINKS_JSON TERMS_FOLDER GRAPH_OUT")
    links_path, terms_dir, graph_out = Path(argv[0]), Path(argv[1]), Path(argv[2])
    links = load_json(links_path)
    if not isinstance(links, dict) or not all(
        isinstance(v, list) and all(isinstance(t, str) for t in v) for v in links.values()
    ):
        fail(f"{links_path} must be a JSON object mapping document names to lists of strings")
    if not terms_dir.is_dir():
        fail(f"terms folder {str(terms_dir)!r} does not exist or is not a folder")
    docs = sorted(p.stem for p in terms_dir.glob("*.json") if p.is_file())
    if not docs:
        fail(f"no .json files found in {str(terms_dir)!r}")
    unknown = sorted(set(links) - set(docs))
    if unknown:
        fail(f"{links_path} has links from unknown document(s): {', '.join(unknown)}")

    known = set(docs)
    edges, dangling = [], []
    backlinks = {doc: [] for doc in docs}
    for src in sorted(links):
        for target in sorted(set(links[src])):
            if target == src:
                continue
            if target in known:
                edges.append([src, target])
                backlinks[target].append(src)
            else:
                dangling.append([src, target])
    for sources in backlinks.values():
        sources.sort()
    graph = {
        "backlinks": backlinks,
        "dangling": dangling,
        "edges": edges,
        "orphans": [doc for doc in docs if not backlinks[doc]],
    }
    graph_out.write_text(json.dumps(graph, sort_keys=True, indent=2) + "\n", encoding="utf-8", newline="\n")
    print(
        f"link: {len(edges)} edge(s), {len(dangling)} dangling, {len(graph['orphans'])} orphan(s)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
