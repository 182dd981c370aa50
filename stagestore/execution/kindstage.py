"""Child-process entry point for built-in stage kinds (docs/kinds.md).

Run as `python -m stagestore.execution.kindstage CONTEXT.json` by the executor, so a crash, an out-of-memory
kill or a misbehaving `transform` function ends this process only, never the runner.  The
context file holds the stage's settings and paths, never the key: encrypt and decrypt read it
here from the inherited environment (`key_env`) or from `key_file`.

Exit codes: 0 success (KindStats written as JSON to the `stats` path); 3 the input failed the
kind's check (`ValidationFailure: <message>` on stderr); 2 any other kind error
(`KindFailure: <message>`); 1 an unexpected error, with its traceback.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import msgspec

from ..kinds import KindError, KindOptions, ValidationFailureError, parse_chunk_size, run_kind

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_KIND_FAILURE = 2
EXIT_VALIDATION_FAILURE = 3

_SETTINGS = ("kind", "algorithm", "params", "chunk_size", "parallel", "workers", "call", "expect")


def build_options(data: dict[str, Any]) -> KindOptions:
    """The `KindOptions` a context names; absent or null settings take their defaults.

    Types are checked here (`KindError` names the field); ranges are checked by `run_kind`.
    """
    settings = {key: data[key] for key in _SETTINGS if data.get(key) is not None}
    if "chunk_size" in settings:
        settings["chunk_size"] = parse_chunk_size(settings["chunk_size"])
    try:
        return msgspec.convert(settings, KindOptions)
    except msgspec.ValidationError as exc:
        raise KindError(f"invalid stage settings: {exc}") from None


def run(data: dict[str, Any]) -> None:
    """Run the kind a context describes and write its stats; raises `KindError` on failure."""
    workdir = Path(data["workdir"])
    key = None
    if data.get("key_env") is not None or data.get("key_file") is not None:
        from ..kinds.crypto import load_key

        key = load_key(data.get("key_env"), data.get("key_file"), workdir, os.environ)
    opts = build_options(data)
    if data.get("code_dir") and opts.call:
        # The stage's snapshot of its module, hashed as its `_code` input, is the code that
        # runs (as for `call` stages): imported first, so `transform` finds it loaded.
        sys.path.insert(0, data["code_dir"])
        try:
            importlib.import_module(opts.call.partition(":")[0])
        except ImportError:
            pass  # `transform` reports it, naming the call
    stats = run_kind(opts, Path(data["src"]), Path(data["dest"]), key=key, workdir=workdir)
    Path(data["stats"]).write_bytes(msgspec.json.encode(
        dict(msgspec.to_builtins(stats), workers=opts.threads)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        run(json.loads(Path(argv[0]).read_text()))
    except ValidationFailureError as exc:
        print(f"ValidationFailure: {_one_line(exc.message)}", file=sys.stderr)
        return EXIT_VALIDATION_FAILURE
    except KindError as exc:
        print(f"KindFailure: {_one_line(exc.message)}", file=sys.stderr)
        return EXIT_KIND_FAILURE
    except Exception:  # noqa: BLE001 - a bug or a bad context: show everything
        traceback.print_exc()
        return EXIT_INTERNAL
    return EXIT_OK


def _one_line(message: str) -> str:
    return " ".join(message.splitlines())


if __name__ == "__main__":
    sys.exit(main())
