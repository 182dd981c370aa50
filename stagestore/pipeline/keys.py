"""The two keys that decide whether work is identical: `input_hash` and `config_hash`.

Neither depends on where the workspace or the store lives: the command is hashed as written
(placeholders unrendered), inputs by name and content hash only.  Together they cover everything
a stage's process is handed that can differ between two stages or two items (the stage name, its
item, params, env, ...); what they leave out is either a path stagestore chooses or something
that differs only between runs or attempts (run id, attempt number, the inherited environment,
the workspace's path).  docs/stages.md#what-is-in-the-key states the rule.
"""

from __future__ import annotations

import msgspec

from ..model.records import ArtifactRef, StageSpec
from ..store.hashing import digest_canonical


CONFIG_HASH_VERSION = 3
"""The version of `config_hash`'s recipe.  It was the manifest's schema version until manifest
version 3, which changed nothing a result depends on; a new recipe gets a new number, and
invalidates every cached result.  Version 3 added the stage name."""


def config_hash(stage: str, spec: StageSpec, kind_config: dict | None = None) -> str:
    """Over the stage name, cmd/call as written, shell, params, declared env, outputs, checks,
    kind and the recipe's version; for a built-in kind, also `kind_config` (`stagekinds.config`:
    its input, algorithm, chunk size, key id, ...).  Not over what only decides how failures are
    handled (domain, classify, retries, timeout, on_failure, disk) or how fast a kind runs
    (parallel, workers): changing those never invalidates a succeeded result.

    The stage name is in because the process is handed it (`STAGESTORE_STAGE`, `ctx.stage`):
    two stages with the same command and inputs may write different outputs, so one must never
    reuse the other's."""
    fields = {
        "schema_version": CONFIG_HASH_VERSION,
        "stage": stage,
        "kind": spec.kind or ("cmd" if spec.cmd is not None else "call"),
        "cmd": spec.cmd,
        "call": spec.call,
        "shell": spec.shell,
        "params": spec.params,
        "env": spec.env,
        "outputs": sorted(spec.outputs),
        "checks": msgspec.to_builtins(spec.checks),
    }
    if spec.kind is not None:
        if kind_config is None:
            raise ValueError(f"config_hash of a {spec.kind!r} stage needs its kind_config")
        fields["kind_config"] = kind_config
    return digest_canonical(fields)


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
