#!/usr/bin/env python3
"""Stage `fetch` (domain "infrastructure"): read an item's recipe, "download" its source.

Usage: fetch.py ITEM RECIPE_TXT SOURCE_OUT

RECIPE_TXT is the item's data file (data/<item>.txt): `key: value` lines, blank lines and
`#` comments ignored.  Keys: name, version, mirror, test, source.  Writes SOURCE_OUT, a JSON
object with the item id and every recipe field.

Fails, on purpose and always for the same recipes (the message is what the pipeline's
classify rules match):
  a line that is not `key: value` with a known key
      -> "fetch: error: cannot parse recipe line N: ..."        (RecipeParseFailure)
  mirror: unreachable
      -> "fetch: error: mirror unreachable: URL"                 (InfrastructureGateFailure)
  mirror: flaky, on the first attempt only (STAGESTORE_ATTEMPT=1)
      -> "fetch: error: connection reset by peer: URL"           (retryable; the retry succeeds)
"""
import json
import os
import sys

KEYS = ("name", "version", "mirror", "test", "source")


def fail(message):
    print(f"fetch: error: {message}", file=sys.stderr)
    sys.exit(1)


def parse(path):
    recipe = {}
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition(":")
            key = key.strip()
            if not sep or key not in KEYS:
                fail(f"cannot parse recipe line {number}: {line[:60]!r}")
            recipe[key] = value.strip()
    for key in ("name", "version"):
        if key not in recipe:
            fail(f"cannot parse recipe: no `{key}:` line")
    return recipe


def main(argv):
    if len(argv) != 3:
        fail("usage: fetch.py ITEM RECIPE_TXT SOURCE_OUT")
    item, recipe_path, out = argv
    recipe = parse(recipe_path)
    url = f"https://mirror.example.org/{recipe['name']}-{recipe['version']}.tar.gz"
    mirror = recipe.get("mirror", "ok")
    if mirror == "unreachable":
        fail(f"mirror unreachable: {url}")
    if mirror == "flaky" and os.environ.get("STAGESTORE_ATTEMPT", "1") == "1":
        fail(f"connection reset by peer: {url}")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(dict(recipe, item=item, url=url), f, sort_keys=True, indent=2)
        f.write("\n")
    print(f"fetched {url}")


if __name__ == "__main__":
    main(sys.argv[1:])
