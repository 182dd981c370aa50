#!/usr/bin/env python3
"""Stage `serve`: answer a fixed list of queries against the index.

Usage: serve.py INDEX_JSON GRAPH_JSON QUERIES_TXT RESULTS_OUT

QUERIES_TXT holds one query per line; blank lines and lines starting with
'#' are ignored. Query words are tokenised like the documents (lowercased,
runs of 3+ letters, stopwords dropped).

A document's score is the sum, over the distinct query terms it contains,
of tf * idf with tf = count / doc_length and idf = ln((N + 1) / (df + 1)) + 1,
plus BACKLINK_BOOST for each document linking to it. Only documents that
contain at least one query term are ranked; ties break by name.

Writes RESULTS_OUT JSON:
  {"queries": [{"query": q, "results": [{"doc": d, "score": s}, ... top 3]}]}
with scores rounded to 4 decimals.
"""
import json
import math
import re
import sys
from pathlib import Path

TOP_K = 3
BACKLINK_BOOST = 0.005
WORD = re.compile(r"[^\W\d_]{3,}")
# Same list as extract.py (kept inline: scripts are run from stored copies).
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
    print(f"serve: error: {message}", file=sys.stderr)
    sys.exit(1)


def load_json(path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        fail(f"file {str(path)!r} not found")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(f"{path} is not valid JSON: {exc}")


def read_queries(path):
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        fail(f"queries file {str(path)!r} not found")
    except UnicodeDecodeError as exc:
        fail(f"{path} is not valid UTF-8: {exc}")
    queries = [" ".join(line.split()) for line in lines]
    queries = [q for q in queries if q and not q.startswith("#")]
    if not queries:
        fail(f"no queries found in {str(path)!r}")
    return queries


def score(query, postings, doc_lengths, backlinks):
    n_docs = len(doc_lengths)
    terms = sorted({w for w in WORD.findall(query.lower()) if w not in STOPWORDS})
    scores = {}
    for term in terms:
        docs = postings.get(term, {})
        idf = math.log((n_docs + 1) / (len(docs) + 1)) + 1
        for doc in sorted(docs):
            tf = docs[doc] / doc_lengths[doc]
            scores[doc] = scores.get(doc, 0.0) + tf * idf
    ranked = sorted(
        (
            (round(s + BACKLINK_BOOST * len(backlinks.get(doc, [])), 4), doc)
            for doc, s in scores.items()
        ),
        key=lambda item: (-item[0], item[1]),
    )
    return [{"doc": doc, "score": s} for s, doc in ranked[:TOP_K]]


def main(argv):
    if len(argv) != 4:
        fail("usage: serve.py INDEX_JSON GRAPH_JSON QUERIES_TXT RESULTS_OUT")
    index_path, graph_path, queries_path, results_out = map(Path, argv)
    index = load_json(index_path)
    if not isinstance(index, dict) or not isinstance(index.get("terms"), dict) \
            or not isinstance(index.get("doc_lengths"), dict) or not index["doc_lengths"]:
        fail(f"{index_path} must be an index with non-empty 'terms' and 'doc_lengths' objects")
    graph = load_json(graph_path)
    if not isinstance(graph, dict) or not isinstance(graph.get("backlinks"), dict):
        fail(f"{graph_path} must be a graph with a 'backlinks' object")
    queries = read_queries(queries_path)

    results = {
        "queries": [
            {"query": q, "results": score(q, index["terms"], index["doc_lengths"], graph["backlinks"])}
            for q in queries
        ]
    }
    results_out.write_text(json.dumps(results, sort_keys=True, indent=2) + "\n", encoding="utf-8", newline="\n")
    print(f"serve: answered {len(queries)} quer{'y' if len(queries) == 1 else 'ies'}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
