"""`diff_runs`: what changed between two runs, stage by stage, and why."""

from __future__ import annotations

from ..errors import CorruptRecordError, FormatVersionError, RunNotFoundError, StageNotFoundError
from ..model.records import ArtifactRef, StageManifest, TreeListing
from ..model.reports import DiffReport, FileChange, OutputChange, StageDiff
from ..store.store import Store
from ..store.trees import read_tree


Key = tuple[str | None, str]  # (item, stage); item None for a stage that runs once per run

# A run record that is missing (a run killed before writing it), unreadable, damaged or newer
# only costs the order of stages and items; anything else is a bug and propagates.
_NO_ORDER = (OSError, RunNotFoundError, CorruptRecordError, FormatVersionError)


def _manifests(store: Store, run_id: str, item: str | None) -> dict[Key, StageManifest]:
    """Every manifest of the run, run-level and per item (or only those of `item`)."""
    if not store.manifests.has_run(run_id):
        store.manifests.read_run(run_id)  # raises RunNotFoundError with its hint
    scopes = [None, *store.manifests.items(run_id)] if item is None else [None, item]
    return {(scope, stage): store.manifests.read(run_id, stage, scope)
            for scope in scopes for stage in store.manifests.stages(run_id, scope)}


def _items_order(store: Store, run_ids: tuple[str, str]) -> list[str]:
    order: dict[str, None] = {}  # a set that keeps order: a run may have 10,000 items
    for run_id in run_ids:
        try:
            order.update(dict.fromkeys(store.manifests.read_run(run_id).items))
        except _NO_ORDER:  # the order is cosmetic
            pass
    return list(order)


def _stage_order(store: Store, run_ids: tuple[str, str], names: set[str]) -> list[str]:
    order: list[str] = []
    for run_id in run_ids:
        try:
            order += [s for s in store.manifests.read_run(run_id).selected if s not in order]
        except _NO_ORDER:  # the order is cosmetic; fall back to names
            pass
    return [s for s in order if s in names] + sorted(names - set(order))


def diff_runs(store: Store, run_a: str, run_b: str, *, stage: str | None = None,
              item: str | None = None) -> DiffReport:
    """Stage by stage; in item runs, also each item's stages (matched by item id)."""
    a = _manifests(store, run_a, item)
    b = _manifests(store, run_b, item)
    keys = set(a) | set(b)
    names = {name for _, name in keys}
    if stage is not None:
        if stage not in names:
            raise StageNotFoundError(
                f"stage {stage!r} has no manifest in run {run_a} or {run_b}; stages: "
                + ", ".join(sorted(names)))
        names = {stage}
    stage_order = _stage_order(store, (run_a, run_b), names)
    item_order = _items_order(store, (run_a, run_b))
    with_manifests = {k[0] for k in keys if k[0] is not None}
    scopes = [None] + [i for i in item_order if i in with_manifests] + sorted(
        with_manifests - set(item_order))
    stages = []
    for scope in scopes:
        for name in stage_order:
            ma, mb = a.get((scope, name)), b.get((scope, name))
            if ma is None and mb is None:
                continue
            if ma is None or mb is None:
                present = mb if ma is None else ma
                assert present is not None
                stages.append(StageDiff(
                    stage=name, item=scope, change="added" if ma is None else "removed",
                    config_changed=False, inputs_changed=False, outputs_changed=False,
                    outputs=[OutputChange(output=o, change="added" if ma is None else "removed")
                             for o in sorted(present.outputs)]))
                continue
            stages.append(_diff_stage(store, name, ma, mb))
    return DiffReport(run_a=run_a, run_b=run_b, stages=stages)


def _diff_stage(store: Store, name: str, ma: StageManifest, mb: StageManifest) -> StageDiff:
    changed_inputs = sorted(
        key for key in set(ma.inputs) | set(mb.inputs)
        if (ma.inputs.get(key) or _NONE).hash != (mb.inputs.get(key) or _NONE).hash)
    outputs = []
    for output in sorted(set(ma.outputs) | set(mb.outputs)):
        ra, rb = ma.outputs.get(output), mb.outputs.get(output)
        if ra is None:
            outputs.append(OutputChange(output=output, change="added"))
        elif rb is None:
            outputs.append(OutputChange(output=output, change="removed"))
        elif ra.hash == rb.hash:
            outputs.append(OutputChange(output=output, change="unchanged"))
        else:
            outputs.append(OutputChange(output=output, change="modified",
                                        files=_diff_files(store, ra, rb)))
    config_changed = ma.config_hash != mb.config_hash
    inputs_changed = ma.input_hash != mb.input_hash
    outputs_changed = ma.output_hash != mb.output_hash or ma.status != mb.status
    change = "changed" if (config_changed or inputs_changed or outputs_changed) else "unchanged"
    return StageDiff(stage=name, item=ma.item, change=change, config_changed=config_changed,
                     inputs_changed=inputs_changed, outputs_changed=outputs_changed,
                     changed_inputs=changed_inputs, outputs=outputs)


_NONE = ArtifactRef(hash="", size=0, kind="file")


def _files(store: Store, ref: ArtifactRef) -> dict[str, str | None]:
    if ref.kind != "tree":
        return {}
    listing: TreeListing = read_tree(store.objects, ref.hash)
    return {e.path: e.hash for e in listing.entries if e.kind == "file"}


def _diff_files(store: Store, ra: ArtifactRef, rb: ArtifactRef) -> list[FileChange]:
    if ra.kind != "tree" and rb.kind != "tree":
        return []
    fa, fb = _files(store, ra), _files(store, rb)
    changes = []
    for path in sorted(set(fa) | set(fb)):
        if path not in fa:
            changes.append(FileChange(path=path, change="added"))
        elif path not in fb:
            changes.append(FileChange(path=path, change="removed"))
        elif fa[path] != fb[path]:
            changes.append(FileChange(path=path, change="modified"))
    return changes
