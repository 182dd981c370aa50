#!/usr/bin/env python3
"""Stage `build` (domain "build"): "compile" an item's source and run its self-test.

Usage: build.py SOURCE_JSON ARTIFACT_OUT

SOURCE_JSON is the `source` output of `fetch`.  The item id comes from STAGESTORE_ITEM.
Writes ARTIFACT_OUT, a JSON object: name, version, item, the source and a digest of it.

Fails, on purpose and always for the same recipes (the message is what the pipeline's
classify rules match):
  source with unbalanced brackets
      -> "build: error: compile failed: ..."       (BuildFailure)
  test: fail
      -> "build: error: self-test failed: ..."     (ValidationFailure)
"""
import hashlib
import json
import os
import sys

PAIRS = {")": "(", "]": "[", "}": "{"}


def fail(message):
    print(f"build: error: {message}", file=sys.stderr)
    sys.exit(1)


def unbalanced(source):
    stack = []
    for column, char in enumerate(source, start=1):
        if char in "([{":
            stack.append((char, column))
        elif char in PAIRS:
            if not stack or stack[-1][0] != PAIRS[char]:
                return f"unexpected {char!r} at column {column}"
            stack.pop()
    if stack:
        return f"unclosed {stack[-1][0]!r} opened at column {stack[-1][1]}"
    return None


def main(argv):
    if len(argv) != 2:
        fail("usage: build.py SOURCE_JSON ARTIFACT_OUT")
    source_path, out = argv
    item = os.environ.get("STAGESTORE_ITEM", "?")
    with open(source_path, encoding="utf-8") as f:
        recipe = json.load(f)
    source = recipe.get("source", "")
    problem = unbalanced(source)
    if problem:
        fail(f"compile failed: {recipe['name']}.c: {problem}")
    if recipe.get("test", "pass") != "pass":
        fail(f"self-test failed: {recipe['name']} {recipe['version']}: expected 42, got 41")
    artifact = {
        "item": item,
        "name": recipe["name"],
        "version": recipe["version"],
        "source": source,
        "object": hashlib.sha256(source.encode("utf-8")).hexdigest(),
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(artifact, f, sort_keys=True, indent=2)
        f.write("\n")
    print(f"built {recipe['name']} {recipe['version']} for item {item}")


if __name__ == "__main__":
    main(sys.argv[1:])
