"""The two keys that decide whether work is identical: `input_hash` and `config_hash`.

Neither depends on where the workspace or the store lives: the command is hashed as written
(placeholders unrendered), inputs by name and content hash only.
"""

from __future__ import annotations

import msgspec

from .hashing import digest_canonical
from .records import MANIFEST_SCHEMA_VERSION, ArtifactRef, StageSpec


def config_hash(spec: StageSpec) -> str:
    """Over cmd/call as written, shell, params, declared env, outputs, checks, kind and schema
    version.  Not over what only decides how failures are handled (domain, classify, retries,
    timeout, on_failure, disk): changing those never invalidates a succeeded result."""
    return digest_canonical({
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "kind": "cmd" if spec.cmd is not None else "call",
        "cmd": spec.cmd,
        "call": spec.call,
        "shell": spec.shell,
        "params": spec.params,
        "env": spec.env,
        "outputs": sorted(spec.outputs),
        "checks": msgspec.to_builtins(spec.checks),
    })


def input_key(kind: str, name: str, stage: str | None = None) -> str:
    """The name an input carries in a manifest: `inputs.NAME` or `upstream.STAGE.NAME`."""
    return f"upstream.{stage}.{name}" if kind == "upstream" else f"inputs.{name}"


def input_hash(inputs: dict[str, ArtifactRef], item: str | None = None) -> str:
    """Over the sorted (name, content hash) of every workspace input and upstream output, plus
    `("item", ITEM)` for a stage that runs per item (it sees its item id, so two items are never
    the same work, while the same item in a later run is)."""
    pairs = [(name, ref.hash) for name, ref in inputs.items()]
    if item is not None:
        pairs.append(("item", item))
    return digest_canonical(sorted(pairs))
