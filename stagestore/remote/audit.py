"""`verify --remote` and `gc --remote`: what a remote holds, checked and reclaimed.

Verify re-hashes remote objects (all, or a random sample) and checks that every remote
manifest and record decodes and that every object it names (with the files of folder outputs)
is on the remote.  Gc removes objects no remote manifest or record names, once they are older
than a grace period: a push sends objects before its manifests, so a young unreferenced
object may belong to a push that has not committed yet.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import blake3

from ..errors import StagestoreError
from ..model.records import ItemRecord, RunRecord, TreeListing, decode_record
from ..model.reports import Finding, RemoteGcReport, VerifyReport
from ..store.hashing import PREFIX
from ..store.store import Store
from ..store.trees import check_tree, subtrees
from .remotes import FORMAT_KEY, PROBE, RUNS, object_digest, object_key, open_remote, parse_run_key
from .storage import BlobInfo, RemoteError, Storage, pages_flat
from .transfer import decode_manifest, manifest_refs, record_refs

DEFAULT_GRACE_HOURS = 24.0
# Library words; the CLI names its command instead (`stagestore.cli.cli_hint`).
VERIFY_REMOTE_HINT = "verify the remote (`verify_remote`): it names every record it cannot read"


class _Inventory:
    """One listing of the whole remote, sorted into objects, run keys and the rest."""

    def __init__(self, storage: Storage) -> None:
        self.objects: dict[str, BlobInfo] = {}  # digest -> listing entry
        self.run_keys: list[BlobInfo] = []
        self.strays: list[BlobInfo] = []
        self.probes: list[BlobInfo] = []
        for info in pages_flat(storage.list("")):
            digest = object_digest(info.key)
            if digest is not None:
                self.objects[digest] = info
            elif info.key.startswith(RUNS):
                self.run_keys.append(info)
            elif info.key.startswith(PROBE):
                self.probes.append(info)
            elif info.key == FORMAT_KEY or info.key.startswith("cache/"):
                continue
            else:
                self.strays.append(info)


class _References:
    """Every object the remote's manifests and records name, and what was wrong on the way."""

    def __init__(self, storage: Storage, inventory: _Inventory, run_ids: list[str] | None,
                 jobs: int) -> None:
        self.storage = storage
        self.inventory = inventory
        self.live: dict[str, str] = {}  # digest -> who names it first
        self.findings: list[Finding] = []
        self.manifests = 0
        self.runs: set[str] = set()
        keys = []
        for info in inventory.run_keys:
            run_id = info.key.split("/")[1]
            if run_ids is not None and run_id not in run_ids:
                continue
            kind = parse_run_key(run_id, info.key)
            if kind is None:
                self.findings.append(Finding(kind="stray_file", severity="warning",
                                             message=f"{storage.where(info.key)} is neither a "
                                             "manifest nor a record", run_id=run_id,
                                             path=info.key))
                continue
            self.runs.add(run_id)
            keys.append((info.key, run_id, kind))

        def read(key: str) -> bytes | StagestoreError:
            try:
                return storage.read(key)
            except StagestoreError as exc:
                return exc

        with ThreadPoolExecutor(jobs) as pool:
            blobs = list(pool.map(read, [k for k, _, _ in keys]))
        trees: dict[str, str] = {}
        for (key, run_id, kind), data in zip(keys, blobs, strict=True):
            where = storage.where(key)
            if isinstance(data, StagestoreError):
                self.problem("unreadable", data.message, run_id=run_id, path=key)
                continue
            try:
                if kind.stage is not None:
                    manifest = decode_manifest(data, run_id, kind.stage, kind.item, where)
                    self.manifests += 1
                    direct, tree_refs = manifest_refs(manifest)
                else:
                    type_ = RunRecord if kind.item is None else ItemRecord
                    record = decode_record(data, type_, where)
                    direct, tree_refs = record_refs(record.inputs)
            except StagestoreError as exc:
                self.problem("manifest_invalid", exc.message, run_id=run_id, path=key)
                continue
            for digest in direct:
                self.live.setdefault(digest, key)
            for tree in tree_refs:
                trees.setdefault(tree, key)
        pending = list(trees.items())
        while pending:  # a tree's subtrees are read in turn (version-2 trees of trees)
            tree, named_by = pending.pop()
            if tree not in inventory.objects:
                continue  # reported as missing below
            try:
                data = storage.read(object_key(tree))
                listing: TreeListing = decode_record(data, TreeListing, f"remote tree {tree}")
                check_tree(listing, f"remote tree {tree}")
            except StagestoreError as exc:
                self.problem("tree_invalid", exc.message, object=tree, path=named_by)
                continue
            for entry in listing.entries:
                if entry.hash is not None:
                    self.live.setdefault(entry.hash, f"{named_by} (in tree {tree})")
            for sub in subtrees(listing):
                if sub not in trees:
                    trees[sub] = f"{named_by} (in tree {tree})"
                    pending.append((sub, trees[sub]))

    def problem(self, kind: str, message: str, **where: str | None) -> None:
        self.findings.append(Finding(kind=kind, severity="problem", message=message, **where))


def _rehash(storage: Storage, digest: str) -> tuple[str | None, int]:
    """(the digest the remote object's bytes hash to, or None if unreadable; bytes read)."""
    hasher = blake3.blake3()
    size = 0
    try:
        for chunk in storage.read_chunks(object_key(digest)):
            hasher.update(chunk)
            size += len(chunk)
    except RemoteError:
        return None, size
    return PREFIX + hasher.hexdigest(), size


def verify_remote(store: Store, remote: str | None, run_ids: Iterable[str] = (), *,
                  sample: float = 100.0, jobs: int = 8, seed: int | None = None) -> VerifyReport:
    """Check a remote: every manifest and record decodes, every object they name is there,
    and the remote objects (all, or `sample` percent chosen at random) hash to their names."""
    if not 0 < sample <= 100:
        from ..errors import UsageError

        raise UsageError(f"sample must be a percentage above 0 and at most 100, got {sample:g}")
    spec, storage = open_remote(store.layout, remote)
    inventory = _Inventory(storage)
    selected = list(run_ids) or None
    refs = _References(storage, inventory, selected, jobs)
    if selected:
        for run_id in selected:
            if run_id not in refs.runs:
                refs.problem("run_missing", f"run {run_id} is not on remote {spec.name!r}",
                             run_id=run_id)
    for digest, named_by in sorted(refs.live.items()):
        if digest not in inventory.objects:
            refs.problem("object_missing", f"object {digest}, named by "
                         f"{storage.where(named_by)}, is missing from the remote",
                         object=digest, path=named_by)
    for info in inventory.strays:
        refs.findings.append(Finding(kind="stray_file", severity="warning",
                                     message=f"{storage.where(info.key)} is not part of a "
                                     "stagestore remote", path=info.key))
    pool_of = sorted(inventory.objects) if selected is None else sorted(
        d for d in refs.live if d in inventory.objects)
    if sample < 100:
        rng = random.Random(seed)
        count = max(1, round(len(pool_of) * sample / 100)) if pool_of else 0
        pool_of = sorted(rng.sample(pool_of, count))
    checked = 0
    with ThreadPoolExecutor(jobs) as pool:
        for digest, (got, size) in zip(pool_of, pool.map(lambda d: _rehash(storage, d), pool_of),
                                       strict=True):
            checked += size
            if got is None:
                refs.problem("object_unreadable", f"remote object {digest} could not be read",
                             object=digest, path=object_key(digest))
            elif got != digest:
                refs.problem("object_damaged", f"remote object {digest} is damaged: its bytes "
                             f"hash to {got} ({storage.where(object_key(digest))})",
                             object=digest, path=object_key(digest))
    problems = [f for f in refs.findings if f.severity == "problem"]
    warnings = [f for f in refs.findings if f.severity == "warning"]
    return VerifyReport(ok=not problems, objects_checked=len(pool_of), bytes_checked=checked,
                        manifests_checked=refs.manifests, runs_checked=len(refs.runs),
                        problems=problems, warnings=warnings)


def gc_remote(store: Store, remote: str | None, *, grace_hours: float = DEFAULT_GRACE_HOURS,
              dry_run: bool = False, jobs: int = 8) -> RemoteGcReport:
    """Remove remote objects no remote manifest or record names and that are older than the
    grace period (and probe keys a killed probe left).  Refuses to remove anything when a
    manifest or record cannot be read: it would not know what that one names."""
    if grace_hours < 0:
        from ..errors import UsageError

        raise UsageError(f"grace_hours must be at least 0, got {grace_hours:g}")
    spec, storage = open_remote(store.layout, remote)
    inventory = _Inventory(storage)
    refs = _References(storage, inventory, None, jobs)
    unreadable = [f for f in refs.findings if f.severity == "problem"]
    if unreadable:
        raise RemoteError(f"gc of remote {spec.name!r}: {unreadable[0].message}; removing "
                          "nothing, since what that record names is unknown",
                          hint=VERIFY_REMOTE_HINT)
    cutoff = time.time() - grace_hours * 3600
    removed, young, kept, size = [], 0, 0, 0
    doomed = []
    for digest, info in sorted(inventory.objects.items()):
        if digest in refs.live:
            kept += 1
        elif info.modified > cutoff:
            young += 1
        else:
            doomed.append(info)
            removed.append(digest)
            size += info.size
    if doomed:
        # A push that committed a manifest since the listing may name one of them (it found
        # the object present and did not send it again): list the run keys again and keep
        # whatever a new manifest or record names.
        again = _Inventory(storage)
        seen = {info.key for info in inventory.run_keys}
        again.run_keys = [info for info in again.run_keys if info.key not in seen]
        named = _References(storage, again, None, jobs).live
        rescued = {d for d in removed if d in named}
        if rescued:
            doomed = [info for info in doomed if object_digest(info.key) not in rescued]
            removed = [d for d in removed if d not in rescued]
            kept += len(rescued)
            size = sum(info.size for info in doomed)
    doomed += [info for info in inventory.probes if info.modified <= cutoff]
    if not dry_run:
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(lambda info: storage.delete(info.key), doomed))
    return RemoteGcReport(dry_run=dry_run, remote=spec.name, grace_seconds=grace_hours * 3600,
                          objects_kept=kept, objects_young=young, objects_removed=len(removed),
                          bytes_removed=size, removed=removed)
