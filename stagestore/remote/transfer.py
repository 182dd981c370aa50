"""`push` and `pull`: moving runs between the local store and a remote (docs/remote.md).

Push sends objects first, then each manifest with a create-only write: the manifest is the
commit point, so a remote manifest never names an object that is not already on the remote,
whenever a push stops.  Pull downloads every object a manifest names (outputs, the files of
folder outputs, input snapshots, logs), each checked against its name as it arrives and made
visible only by a rename, and then the manifests: a pulled store verifies on its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ObjectDamagedError, RunNotFoundError, StagestoreError
from ..model.records import (ArtifactRef, CacheEntry, ItemRecord, RemoteSpec, RunRecord,
                             StageManifest, decode_record, encode_record)
from ..model.reports import Conflict, PullReport, PushReport, RemoteRuns
from ..store import durable
from ..store.hashing import PREFIX, digest_bytes, hash_file
from ..store.layout import run_owner
from ..store.manifests import cache_key, check_manifest
from ..store.objects import SyncBatch
from ..store.store import Store
from ..store.trees import read_tree_object, subtrees
from .remotes import (RUNS, cache_entry_key, manifest_key, object_digest, object_key,
                      parse_run_key, record_key, remote_manifest_key, scope_key)
from .storage import PART_SIZE, RemoteError, RemoteNotFound, Storage, pages_flat

# Manifests with these statuses are results: one per stage, create-only on the remote.  A
# failed manifest is pushed under a content-named key (`remotes.remote_manifest_key`).
RESULTS = ("succeeded", "degraded", "disabled")
# Listing whole shards beats listing each shard once a push touches this many of the 256.
_LIST_ALL_FROM = 32
JOBS = 8


@dataclass
class Tally:
    objects: int = 0
    bytes: int = 0
    present: int = 0
    problems: list[str] = field(default_factory=list)


def new_push_report(remote: str, runs: list[str]) -> PushReport:
    return PushReport(ok=True, remote=remote, runs=runs, objects_uploaded=0, bytes_uploaded=0,
                      objects_present=0, manifests_pushed=0, manifests_present=0,
                      conflicts=[], problems=[])


def _version(manifest: StageManifest | None) -> str:
    if manifest is None:
        return "not a readable manifest"
    finished = manifest.finished_at.isoformat(timespec="seconds") if manifest.finished_at else "?"
    return (f"{manifest.status}, output_hash {manifest.output_hash}, input_hash "
            f"{manifest.input_hash}, finished {finished}")


def decode_manifest(data: bytes, run_id: str, stage: str, item: str | None,
                    where: str) -> StageManifest:
    """A manifest read from a remote, decoded and checked against where it was found."""
    manifest: StageManifest = decode_record(data, StageManifest, where)
    check_manifest(manifest, run_id, stage, where, item)
    return manifest


def _ref_hashes(refs: Iterable[ArtifactRef]) -> tuple[set[str], set[str]]:
    """(every object the refs name directly, the tree objects among them)."""
    direct, trees = set(), set()
    for ref in refs:
        direct.add(ref.hash)
        if ref.kind == "tree":
            trees.add(ref.hash)
    return direct, trees


def manifest_refs(manifest: StageManifest) -> tuple[set[str], set[str]]:
    """(every object a manifest names: outputs, inputs and logs; the tree objects among them)."""
    direct, trees = _ref_hashes([*manifest.outputs.values(), *manifest.inputs.values()])
    for log in manifest.logs:
        direct.update((log.stdout, log.stderr))
    return direct, trees


def record_refs(inputs: dict[str, dict[str, ArtifactRef]]) -> tuple[set[str], set[str]]:
    """(every object a run record's input snapshots name; the tree objects among them)."""
    return _ref_hashes([ref for refs in inputs.values() for ref in refs.values()])


class Transfer:
    """One remote, used for one command (or one run's lookups and pushes)."""

    def __init__(self, store: Store, name: str, storage: Storage, *, jobs: int = JOBS,
                 spec: RemoteSpec | None = None) -> None:
        self.store = store
        self.name = name
        self.spec = spec  # the remote's settings, for tasks that open it elsewhere
        self.storage = storage
        self.jobs = jobs
        self._present: set[str] = set()  # objects known to be on the remote
        self._committed: set[str] = set()  # manifest keys this Transfer has committed

    # --- objects ---

    def remote_objects(self, digests: set[str]) -> dict[str, int]:
        """digest -> size of those of `digests` the remote has, by listing (whole shards, in
        pages of 1000, never one request per object)."""
        shards = sorted({d[len(PREFIX):len(PREFIX) + 2] for d in digests})
        if len(shards) >= _LIST_ALL_FROM:
            prefixes = ["objects/"]
        else:
            prefixes = [f"objects/{s}/" for s in shards]

        def listed(prefix: str) -> dict[str, int]:
            found = {}
            for info in pages_flat(self.storage.list(prefix)):
                digest = object_digest(info.key)
                if digest in digests:
                    found[digest] = info.size
            return found

        present: dict[str, int] = {}
        with ThreadPoolExecutor(min(self.jobs, len(prefixes)) or 1) as pool:
            for found in pool.map(listed, prefixes):
                present.update(found)
        return present

    def _upload(self, digest: str) -> int:
        """Send one local object, after checking that its bytes still hash to its name."""
        path = self.store.objects.path(digest)
        size = os.stat(path).st_size
        if size <= PART_SIZE:
            data = path.read_bytes()
            got = digest_bytes(data)
        else:
            data, got = None, hash_file(path, size)
        if got != digest:
            raise ObjectDamagedError(f"local object {digest} is damaged (its bytes hash to "
                                     f"{got}); not pushed",
                                     hint="run `stagestore verify`, then `stagestore recover`")
        key = object_key(digest)
        if data is not None:
            self.storage.write(key, data)
        else:
            self.storage.write_file(key, path, size)
        return size

    def send_objects(self, digests: set[str], tally: Tally) -> set[str]:
        """Upload those of `digests` the remote lacks; returns the digests that failed."""
        wanted = digests - self._present
        if not wanted:
            return set()
        present = self.remote_objects(wanted)
        missing = []
        for digest in wanted:
            try:
                same = present.get(digest) == os.stat(self.store.objects.path(digest)).st_size
            except FileNotFoundError:
                same = False  # sending it fails, naming the object
            if same:
                tally.present += 1
                self._present.add(digest)
            else:
                missing.append(digest)
        failed: set[str] = set()

        def send(digest: str) -> tuple[str, int | StagestoreError]:
            try:
                return digest, self._upload(digest)
            except ObjectDamagedError as exc:
                return digest, exc
            except FileNotFoundError:
                return digest, ObjectDamagedError(f"local object {digest} is missing",
                                                  hint="run `stagestore verify`")

        with ThreadPoolExecutor(self.jobs) as pool:
            for digest, result in pool.map(send, sorted(missing)):
                if isinstance(result, StagestoreError):
                    failed.add(digest)
                    tally.problems.append(result.message)
                else:
                    tally.objects += 1
                    tally.bytes += result
                    self._present.add(digest)
        return failed

    def fetch_objects(self, digests: set[str], owner: str, batch: SyncBatch,
                      tally: Tally) -> set[str]:
        """Download those of `digests` the local store lacks, each checked as it arrives;
        returns the digests that could not be had (missing or damaged on the remote)."""
        objects = self.store.objects
        missing = sorted(d for d in digests if not objects.exists(d))
        tally.present += len(digests) - len(missing)
        failed: set[str] = set()

        def fetch(digest: str) -> tuple[Path, int, bool] | StagestoreError:
            key = object_key(digest)
            try:
                return objects.receive(self.storage.read_chunks(key), digest, owner,
                                       source=self.storage.where(key))
            except RemoteNotFound:
                return RemoteError(f"object {digest} is missing from remote {self.name!r} "
                                   f"({self.storage.where(key)})")
            except StagestoreError as exc:  # damaged, or the remote failed mid-download
                return exc

        received: list[tuple[Path, str, bool]] = []
        try:
            with ThreadPoolExecutor(self.jobs) as pool:
                for digest, result in zip(missing, pool.map(fetch, missing), strict=True):
                    if isinstance(result, StagestoreError):
                        failed.add(digest)
                        tally.problems.append(result.message)
                    else:
                        received.append((result[0], digest, result[2]))
                        tally.objects += 1
                        tally.bytes += result[1]
        except BaseException:
            for tmp, _, _ in received:
                durable.discard(tmp)
            raise
        objects.adopt(received, batch)
        return failed

    def _move_refs(self, direct: set[str], trees: set[str], move: Callable[[set[str]], set[str]],
                   tally: Tally) -> tuple[set[str], dict[str, set[str]]]:
        """Move (send or fetch) objects, then what the trees among them name: a tree's files
        and subtrees are known only once the tree object is local, so subtrees are moved a
        level at a time, then every file.  Returns the digests that could not be moved (a tree
        that does not decode among them) and everything each moved tree names."""
        failed = move(direct)
        files: dict[str, set[str]] = {}
        # (top tree, tree to read now) pairs, a level of the trees at a time
        level = [(tree, tree) for tree in trees - failed]
        broken: set[str] = set()
        moved_trees: set[str] = set()
        while level:
            below: list[tuple[str, str]] = []
            for top, tree in level:
                if top in broken:
                    continue
                try:
                    listing = read_tree_object(self.store.objects, tree)
                except StagestoreError as exc:
                    tally.problems.append(exc.message)
                    broken.add(top)
                    failed.add(top)
                    continue
                named = files.setdefault(top, set())
                named.update(e.hash for e in listing.entries if e.hash is not None)
                below.extend((top, sub) for sub in subtrees(listing))
            new_trees = {sub for _, sub in below} - moved_trees
            failed |= move(new_trees)
            moved_trees |= new_trees
            level = [(top, sub) for top, sub in below if sub not in failed]
        for top in broken:
            files.pop(top, None)
        named = set().union(*files.values()) if files else set()
        failed |= move(named - moved_trees)
        return failed, files

    @staticmethod
    def _needs(manifest: StageManifest, files: dict[str, set[str]]) -> set[str]:
        direct, trees = manifest_refs(manifest)
        return direct.union(*(files.get(tree, {tree}) for tree in trees))

    # --- push ---

    def push(self, run_ids: list[str]) -> PushReport:
        """Push runs (all of the store's when empty): objects, then manifests, then records."""
        manifests = self.store.manifests
        runs = run_ids or manifests.runs()
        for run_id in runs:
            if not manifests.layout.run_dir(run_id).is_dir():
                raise RunNotFoundError(f"run {run_id!r} not found in {self.store.root}",
                                       hint="`stagestore runs` lists the runs")
        tally = Tally()
        report = new_push_report(self.name, runs)
        for run_id in runs:
            self.push_run(run_id, tally, report)
        report.objects_uploaded, report.bytes_uploaded = tally.objects, tally.bytes
        report.objects_present = tally.present
        report.problems = tally.problems
        report.ok = not report.conflicts and not report.problems
        return report

    def push_run(self, run_id: str, tally: Tally, report: PushReport) -> None:
        """Push one run's manifests, then its ended run and item records."""
        manifests = self.store.manifests
        chosen: list[tuple[StageManifest, bytes]] = []
        for _, item, stage, manifest in manifests.iter_manifests([run_id]):
            where = f"run {run_id} " + (f"item {item!r} " if item else "") + f"stage {stage}"
            if isinstance(manifest, Exception):
                tally.problems.append(f"{where}: unreadable manifest, not pushed: "
                                      f"{getattr(manifest, 'message', manifest)}")
                continue
            chosen.append((manifest, manifests.read_bytes(run_id, stage, item)))
        records: list[tuple[str | None, bytes, dict]] = []
        if manifests.layout.run_record_path(run_id).exists():
            record = manifests.read_run(run_id)
            if record.finished_at is not None:
                records.append((None, manifests.layout.run_record_path(run_id).read_bytes(),
                                record.inputs))
        for item in manifests.items(run_id):
            item_record = manifests.read_item_optional(run_id, item)
            if item_record is not None and item_record.status != "running":
                records.append((item, manifests.read_item_bytes(run_id, item),
                                item_record.inputs))
        trouble = len(tally.problems) + len(report.conflicts)
        self.push_manifests(chosen, tally, report)
        if len(tally.problems) + len(report.conflicts) > trouble:
            # A record that names a stage whose manifest is not on the remote would make a
            # pulled run fail verify: the records wait until the whole run is there.
            tally.problems.append(f"run {run_id}: its run and item records were not pushed, "
                                  "since some of its manifests were not")
            return
        for item, data, inputs in records:
            failed, _ = self._move_refs(
                *record_refs(inputs), lambda digests: self.send_objects(digests, tally), tally)
            if not failed:
                self.storage.create(record_key(run_id, item, data), data)

    def push_manifests(self, chosen: list[tuple[StageManifest, bytes]], tally: Tally,
                       report: PushReport) -> None:
        """Each manifest's objects, then the manifest itself (create-only), then its cache
        entry; a manifest one of whose objects could not be sent is not pushed."""
        direct: set[str] = set()
        trees: set[str] = set()
        for manifest, _ in chosen:
            d, t = manifest_refs(manifest)
            direct |= d
            trees |= t
        failed, files = self._move_refs(
            direct, trees, lambda digests: self.send_objects(digests, tally), tally)
        for manifest, data in chosen:
            needs = self._needs(manifest, files)
            where = (f"run {manifest.run_id} "
                     + (f"item {manifest.item!r} " if manifest.item else "")
                     + f"stage {manifest.stage}")
            if needs & failed:
                tally.problems.append(f"{where}: not pushed, since {len(needs & failed)} of its "
                                      "objects could not be sent")
                continue
            self._commit_manifest(manifest, data, report)

    def _commit_manifest(self, manifest: StageManifest, data: bytes, report: PushReport) -> None:
        key = remote_manifest_key(manifest.run_id, manifest.stage, manifest.item,
                                  manifest.status, data)
        if key in self._committed:
            return  # `run --push` pushed it as it committed; the run's end pushes all again
        if self.storage.create(key, data):
            self._committed.add(key)
            report.manifests_pushed += 1
        else:
            theirs = self.storage.read(key)
            if theirs == data:
                report.manifests_present += 1
            else:
                try:
                    remote = decode_manifest(theirs, manifest.run_id, manifest.stage,
                                              manifest.item, self.storage.where(key))
                except StagestoreError:
                    remote = None
                report.conflicts.append(Conflict(
                    run_id=manifest.run_id, stage=manifest.stage, item=manifest.item,
                    local=self.store.manifests.location(manifest.run_id, manifest.stage,
                                                        manifest.item),
                    remote=self.storage.where(key), local_version=_version(manifest),
                    remote_version=_version(remote)))
                return
        if manifest.status == "succeeded":
            entry = CacheEntry(run_id=manifest.run_id, item=manifest.item, stage=manifest.stage,
                               input_hash=manifest.input_hash, config_hash=manifest.config_hash)
            self.storage.create(cache_entry_key(cache_key(manifest.input_hash,
                                                          manifest.config_hash)),
                                encode_record(entry))

    # --- pull ---

    def pull(self, run_ids: list[str]) -> PullReport:
        """Pull runs: every object their manifests and records name, then the manifests."""
        from ..store.locking import owner_locked

        listings: dict[str, list[str]] = {}
        for run_id in run_ids:
            keys = [b.key for b in pages_flat(self.storage.list(scope_key(run_id, None)))]
            if not keys:
                raise RunNotFoundError(f"run {run_id!r} is not on remote {self.name!r} "
                                       f"({self.storage.url})",
                                       hint=f"`stagestore remote runs {self.name}` lists the "
                                            "runs the remote has")
            listings[run_id] = keys
        tally = Tally()
        report = PullReport(ok=True, remote=self.name, runs=list(run_ids), objects_downloaded=0,
                            bytes_downloaded=0, objects_present=0, manifests_pulled=0,
                            manifests_present=0, conflicts=[], problems=[])
        for run_id, keys in listings.items():
            owner = run_owner(run_id)
            with owner_locked(self.store.layout, owner, f"run {run_id!r}"):
                try:
                    self._pull_run(run_id, keys, owner, tally, report)
                finally:  # what it appended to the run's item log: durable, let go of
                    self.store.manifests.close_items(run_id)
        report.objects_downloaded, report.bytes_downloaded = tally.objects, tally.bytes
        report.objects_present = tally.present
        report.problems = tally.problems
        report.ok = not report.conflicts and not report.problems
        return report

    def _read_all(self, keys: list[str]) -> list[bytes | StagestoreError]:
        def read(key: str) -> bytes | StagestoreError:
            try:
                return self.storage.read(key)
            except StagestoreError as exc:
                return exc
        with ThreadPoolExecutor(self.jobs) as pool:
            return list(pool.map(read, keys))

    def _pull_run(self, run_id: str, keys: list[str], owner: str, tally: Tally,
                  report: PullReport) -> None:
        """All of a run or nothing of it: its objects first; then, only if every chosen
        manifest's objects are here, the manifests, the item records and the run record."""
        parsed = [(key, parse_run_key(run_id, key)) for key in keys]
        parsed = [(key, kind) for key, kind in parsed if kind is not None]
        chosen: dict[tuple[str | None, str], tuple[StageManifest, bytes, bool]] = {}
        runs: list[tuple[RunRecord, bytes]] = []
        items: dict[str, tuple[ItemRecord, bytes]] = {}
        problems_before = len(tally.problems)
        for (key, kind), data in zip(parsed, self._read_all([k for k, _ in parsed]), strict=True):
            where = self.storage.where(key)
            if isinstance(data, StagestoreError):
                tally.problems.append(data.message)
                continue
            try:
                if kind.stage is not None:
                    manifest = decode_manifest(data, run_id, kind.stage, kind.item, where)
                    # The stage's result wins over its failed versions; of those, the latest.
                    slot = (kind.item, kind.stage)
                    held = chosen.get(slot)
                    if held is None or (held[2] and (not kind.failed or
                                                     manifest.finished_at > held[0].finished_at)):
                        chosen[slot] = (manifest, data, kind.failed)
                elif kind.item is None:
                    runs.append((decode_record(data, RunRecord, where), data))
                else:
                    record: ItemRecord = decode_record(data, ItemRecord, where)
                    latest = items.get(kind.item)
                    if latest is None or _newer(record, latest[0]):
                        items[kind.item] = (record, data)
            except StagestoreError as exc:
                tally.problems.append(exc.message)
        run_record = max(runs, key=lambda r: _when(r[0]), default=None)
        if run_record is None and not self.store.layout.run_record_path(run_id).exists():
            tally.problems.append(
                f"run {run_id} was not pulled: the remote has no run record for it (it was "
                "pushed while running, or its push was interrupted); push it again from the "
                "store that ran it")
            return
        batch = SyncBatch()
        direct: set[str] = set()
        trees: set[str] = set()
        for manifest, _, _ in chosen.values():
            d, t = manifest_refs(manifest)
            direct |= d
            trees |= t
        for record_inputs in [r[0].inputs for r in items.values()] + (
                [run_record[0].inputs] if run_record else []):
            d, t = record_refs(record_inputs)
            direct |= d
            trees |= t
        if run_record is not None:
            outcomes = run_record[0].outcomes
            lacking = sorted(stage for stage, outcome in outcomes.items()
                             if outcome != "skipped" and (None, stage) not in chosen)
            if lacking:
                tally.problems.append(
                    f"run {run_id} was not pulled: its run record on the remote names stages "
                    f"whose manifests are not there ({', '.join(lacking)})")
                return
        failed, _ = self._move_refs(
            direct, trees, lambda digests: self.fetch_objects(digests, owner, batch, tally),
            tally)
        batch.flush()
        if failed or len(tally.problems) > problems_before:
            tally.problems.append(
                f"run {run_id} was not pulled: of what its manifests and records name, "
                f"{len(failed)} objects could not be had (see above); the objects that could "
                "are kept, so pulling again transfers only what is missing")
            return
        layout = self.store.layout
        manifests = self.store.manifests
        for manifest, data, _ in chosen.values():
            path = manifests.location(run_id, manifest.stage, manifest.item)
            if manifests.exists(run_id, manifest.stage, manifest.item):
                ours = manifests.read_bytes(run_id, manifest.stage, manifest.item)
                if ours == data:
                    report.manifests_present += 1
                    continue
                try:
                    local = decode_manifest(ours, run_id, manifest.stage, manifest.item, path)
                except StagestoreError:
                    local = None
                report.conflicts.append(Conflict(
                    run_id=run_id, stage=manifest.stage, item=manifest.item, local=path,
                    remote=self.storage.where(remote_manifest_key(
                        run_id, manifest.stage, manifest.item, manifest.status, data)),
                    local_version=_version(local), remote_version=_version(manifest)))
                continue
            # The cache entry first, as the runner writes it: a crash between the two writes
            # leaves an entry that misses, never a manifest the index cannot find
            # (docs/format.md, "Manifest last").
            if manifest.status == "succeeded" and \
                    self.store.cache.lookup(manifest.input_hash, manifest.config_hash) is None:
                self.store.cache.record(manifest, owner)
            manifests.install(run_id, manifest.item, f"{manifest.stage}.json", data, owner)
            report.manifests_pulled += 1
        for item, (record, data) in items.items():
            if manifests.read_item_optional(run_id, item) is None:
                manifests.install(run_id, item, "_item.json", data, owner)
        manifests.sync_items(run_id)  # the run's item records durable before its run record
        if run_record is not None and not layout.run_record_path(run_id).exists():
            manifests.install(run_id, None, "_run.json", run_record[1], owner)

    # --- single manifests and items (`run --executor dask --remote`) ---

    def fetch_manifest(self, run_id: str, stage: str, item: str | None, owner: str) -> bool:
        """Install the remote's result manifest of one stage into the local store, after every
        object it names; True when the local store has it (now or before), False when the
        remote has no such manifest.  A local manifest with other bytes is left as it is."""
        key = manifest_key(run_id, stage, item)
        manifests = self.store.manifests
        try:
            data = self.storage.read(key)
        except RemoteNotFound:
            found = self._latest_failed(run_id, stage, item)
            if found is None:
                return False
            key, data = found
        if manifests.exists(run_id, stage, item) and \
                manifests.read_bytes(run_id, stage, item) == data:
            return True
        manifest = decode_manifest(data, run_id, stage, item, self.storage.where(key))
        tally = Tally()
        batch = SyncBatch()
        failed, _ = self._move_refs(
            *manifest_refs(manifest),
            lambda digests: self.fetch_objects(digests, owner, batch, tally), tally)
        batch.flush()
        if failed:
            raise RemoteError(f"cannot pull {self.storage.where(key)}: " + "; ".join(
                tally.problems[:3]))
        if not manifests.exists(run_id, stage, item):
            manifests.install(run_id, item, f"{stage}.json", data, owner)
        return True

    def _latest_failed(self, run_id: str, stage: str, item: str | None
                       ) -> tuple[str, bytes] | None:
        """The latest of a stage's failed manifests on the remote: (key, bytes), or None."""
        best = None
        for info in pages_flat(self.storage.list(scope_key(run_id, item))):
            kind = parse_run_key(run_id, info.key)
            if kind is None or not kind.failed or kind.stage != stage or kind.item != item:
                continue
            data = self.storage.read(info.key)
            manifest = decode_manifest(data, run_id, stage, item, self.storage.where(info.key))
            if best is None or manifest.finished_at > best[0]:
                best = (manifest.finished_at, info.key, data)
        return None if best is None else (best[1], best[2])

    def fetch_inputs(self, inputs: dict[str, dict[str, ArtifactRef]], owner: str) -> None:
        """The objects of an item's input snapshots (a record's `inputs`), into the store."""
        tally = Tally()
        batch = SyncBatch()
        failed, _ = self._move_refs(
            *record_refs(inputs), lambda digests: self.fetch_objects(digests, owner, batch, tally),
            tally)
        batch.flush()
        if failed:
            raise RemoteError("cannot pull an item's input snapshots: " + "; ".join(
                tally.problems[:3]))

    def send_inputs(self, inputs: dict[str, dict[str, ArtifactRef]]) -> None:
        """The objects of an item's input snapshots, to the remote."""
        tally = Tally()
        failed, _ = self._move_refs(
            *record_refs(inputs), lambda digests: self.send_objects(digests, tally), tally)
        if failed:
            raise RemoteError("cannot push an item's input snapshots: " + "; ".join(
                tally.problems[:3]))

    def push_item(self, run_id: str, item: str) -> PushReport:
        """One item's manifests, then its record once it has ended."""
        manifests = self.store.manifests
        tally = Tally()
        report = new_push_report(self.name, [run_id])
        chosen = []
        for stage in manifests.stages(run_id, item):
            data = manifests.read_bytes(run_id, stage, item)
            chosen.append((decode_manifest(data, run_id, stage, item,
                                           manifests.location(run_id, stage, item)), data))
        self.push_manifests(chosen, tally, report)
        record = manifests.read_item_optional(run_id, item)
        if record is not None and record.status != "running" and not tally.problems \
                and not report.conflicts:
            data = manifests.read_item_bytes(run_id, item)
            self.storage.create(record_key(run_id, item, data), data)
        report.problems = tally.problems
        report.ok = not report.conflicts and not report.problems
        return report

    # --- the remote as a build cache (`run --remote`) ---

    def fetch_cached(self, input_hash: str, config_hash: str, owner: str) -> StageManifest | None:
        """A succeeded manifest with these keys on the remote, its output objects pulled into
        the local store; None on a miss.  Raises `RemoteError` when the remote cannot be
        asked (the caller treats that as a miss, and says so)."""
        try:
            entry: CacheEntry = decode_record(
                self.storage.read(cache_entry_key(cache_key(input_hash, config_hash))),
                CacheEntry, "remote cache entry")
            key = manifest_key(entry.run_id, entry.stage, entry.item)
            manifest = decode_manifest(self.storage.read(key), entry.run_id, entry.stage,
                                        entry.item, self.storage.where(key))
        except RemoteNotFound:
            return None
        except RemoteError:
            raise
        except StagestoreError:
            return None  # a damaged or newer entry or manifest: not ours to reuse
        if (manifest.status, manifest.input_hash, manifest.config_hash) != (
                "succeeded", input_hash, config_hash):
            return None
        tally = Tally()
        batch = SyncBatch()
        failed, _ = self._move_refs(
            *_ref_hashes(manifest.outputs.values()),
            lambda digests: self.fetch_objects(digests, owner, batch, tally), tally)
        batch.flush()
        return None if failed else manifest

    def runs(self) -> list[str]:
        """The run ids the remote holds (those with at least one key under `runs/<id>/`)."""
        found = set()
        for info in pages_flat(self.storage.list(RUNS)):
            parts = info.key.split("/")
            if len(parts) >= 3:
                found.add(parts[1])
        return sorted(found)


def _when(record: RunRecord):  # noqa: ANN202
    return (record.finished_at is not None, record.finished_at or record.started_at)


def _newer(record: ItemRecord, than: ItemRecord) -> bool:
    def key(r: ItemRecord):  # noqa: ANN202
        return (r.status != "running", r.finished_at or r.started_at)
    return key(record) > key(than)


def push(store: Store, run_ids: Iterable[str] = (), *, remote: str | None = None,
         jobs: int = JOBS) -> PushReport:
    """Push runs (all of the store's when none are named) to a remote (the only one when not
    named): the objects their manifests name that the remote lacks, then each manifest with a
    create-only write, then the run's records.  A manifest the remote holds with other content
    is a conflict in the report (`ok` false), never overwritten.  Raises `UsageError` for an
    unknown remote, `RunNotFoundError` for an unknown run."""
    from ..store.locking import store_lock
    from .remotes import open_remote

    from ..store import unsynced

    spec, storage = open_remote(store.layout, remote)
    with store_lock(store.layout, exclusive=False):  # gc waits: no object vanishes meanwhile
        unsynced.check(store.layout)  # never upload an object a power loss may have damaged
        return Transfer(store, spec.name, storage, jobs=jobs).push(list(run_ids))


def pull(store: Store, run_ids: Iterable[str], *, remote: str | None = None,
         jobs: int = JOBS) -> PullReport:
    """Pull runs from a remote (the only one when not named) into the store: their manifests
    and every object they name, each checked against its BLAKE3 name as it arrives.  Raises
    `UsageError` for an unknown remote, `RunNotFoundError` for a run the remote lacks."""
    from ..store.locking import store_lock
    from .remotes import open_remote

    spec, storage = open_remote(store.layout, remote)
    with store_lock(store.layout, exclusive=False):
        return Transfer(store, spec.name, storage, jobs=jobs).pull(list(run_ids))


def remote_runs(store: Store, remote: str | None = None) -> RemoteRuns:
    """The run ids a remote (the only one when not named) holds, sorted.  Raises `UsageError`
    when the store has no such remote (or, unnamed, not exactly one)."""
    from .remotes import open_remote

    spec, storage = open_remote(store.layout, remote)
    return RemoteRuns(remote=spec.name, runs=Transfer(store, spec.name, storage).runs())
