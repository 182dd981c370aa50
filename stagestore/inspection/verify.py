"""`verify`: prove the store intact, or name exactly what is not.

Verify re-hashes objects (never trusts a mode bit or a size), decodes every manifest and run
record against its schema, checks that every object a record names exists and matches, and
that every stage's recorded upstream hashes equal the upstream manifests' output hashes, and
that every cache entry leads to a succeeded manifest with its key.  It collects typed findings
and repairs nothing: `recover` acts.
"""

from __future__ import annotations

import os
import stat
from collections import defaultdict
from collections.abc import Callable, Iterable

from ..errors import ObjectMissingError, RunNotFoundError, StagestoreError
from ..model.records import ArtifactRef, RunRecord, StageManifest, TreeListing
from ..model.reports import Finding, VerifyReport
from ..pipeline.model import item_stages
from ..store.hashing import EMPTY_DIGEST, hash_file
from ..store.layout import StoreLayout, run_owner
from ..store.locking import owner_is_live, store_lock
from ..store.manifests import Location, cache_key, indexed
from ..store.objects import OBJECT_MODE
from ..store.store import Store
from ..store.trees import read_tree

BytesProgress = Callable[[int, int], None]
"""`progress(bytes_done, bytes_total)` while objects are re-hashed."""


def _where(run_id: str, stage: str | None, item: str | None) -> str:
    return f"run {run_id}" + (f" item {item!r}" if item is not None else "") + (
        f" stage {stage}" if stage else "")


class _Refs:
    """Which objects the checked records name, and who names them."""

    def __init__(self) -> None:
        self.by_object: dict[str, list[tuple[str, str | None, str]]] = defaultdict(list)

    def add(self, digest: str, run_id: str, stage: str | None, what: str) -> None:
        self.by_object[digest].append((run_id, stage, what))


def verify(store: Store, run_ids: Iterable[str] = (), *,
           progress: BytesProgress | None = None) -> VerifyReport:
    """Check the whole store, or only the given runs and the objects they reference."""
    with store_lock(store.layout, exclusive=False):
        return Verifier(store, list(run_ids), progress).run()


class Verifier:
    def __init__(self, store: Store, run_ids: list[str], progress: BytesProgress | None, *,
                 cache_index: bool = True) -> None:
        self.store = store
        self.cache_index = cache_index  # recover rebuilds the index itself, and needs no report
        self.layout: StoreLayout = store.layout
        self.run_ids = run_ids
        self.progress = progress
        self.findings: list[Finding] = []
        self.refs = _Refs()
        self.manifests_checked = 0
        self.trees_seen: dict[str, TreeListing | None] = {}
        # (run, item, stage) -> cache key of each manifest read (None: not succeeded), so the
        # cache index is checked without reading every manifest twice.
        self.keys: dict[Location, str | None] = {}
        # cache key -> where a manifest the index should hold it for is (the first met)
        self.indexed: dict[str, Location] = {}

    def find(self, kind: str, severity: str, message: str, **where: str | None) -> None:
        self.findings.append(Finding(kind=kind, severity=severity, message=message, **where))  # type: ignore[arg-type]

    def run(self) -> VerifyReport:
        runs = self.run_ids or self.store.manifests.runs()
        for run_id in self.run_ids:
            if not self.store.manifests.has_run(run_id):
                raise RunNotFoundError(f"run {run_id!r} not found in {self.store.root}",
                                       hint="`stagestore runs` lists the runs in this store")
        for run_id in runs:
            self.check_run(run_id)
        objects, nbytes = self.check_objects(whole_store=not self.run_ids)
        self.check_temps()
        if not self.run_ids:
            self.check_views()
        if not self.run_ids and self.cache_index:
            self.check_cache_index()
        problems = [f for f in self.findings if f.severity == "problem"]
        warnings = [f for f in self.findings if f.severity == "warning"]
        return VerifyReport(ok=not problems, objects_checked=objects, bytes_checked=nbytes,
                            manifests_checked=self.manifests_checked, runs_checked=len(runs),
                            problems=problems, warnings=warnings)

    # --- records ---

    def check_run(self, run_id: str) -> None:
        manifests = self.store.manifests
        record: RunRecord | None = None
        record_path = str(self.layout.run_record_path(run_id))
        try:
            record = manifests.read_run(run_id)
        except RunNotFoundError:
            if manifests.stages(run_id) or manifests.items(run_id):
                self.find("run_record_missing", "problem",
                          f"run {run_id}: manifests exist but the run record _run.json is missing",
                          run_id=run_id, path=record_path)
        except StagestoreError as exc:
            self.find("run_record_invalid", "problem", exc.message, run_id=run_id, path=record_path)
        self.check_item_log(run_id)
        for stray in manifests.item_strays(run_id):
            self.find("stray_file", "warning",
                      f"run {run_id}: items/{stray} is not an item folder", run_id=run_id,
                      path=str(self.layout.items_dir(run_id) / stray))
        shared = self.check_scope(run_id, None, {})
        for item in manifests.items(run_id):
            self.check_item(run_id, item, shared)
        if record is not None:
            for stage, refs in record.inputs.items():
                for name, ref in refs.items():
                    self.note_ref(ref, run_id, None, f"input snapshot {stage}.{name}")
            self.check_completeness(record, shared)

    def check_scope(self, run_id: str, item: str | None,
                    shared: dict[str, StageManifest]) -> dict[str, StageManifest]:
        """The manifests of the run (item None) or of one item; `shared` holds the run-level
        ones an item's stages may name as upstream."""
        manifests = self.store.manifests
        for stray in manifests.strays(run_id, item):
            self.find("stray_file", "warning",
                      f"{_where(run_id, None, item)}: {stray} is neither a stage manifest nor "
                      "its record", run_id=run_id, item=item,
                      path=str(self.layout.scope_dir(run_id, item) / stray))
        loaded: dict[str, StageManifest] = {}
        for stage in manifests.stages(run_id, item):
            path = manifests.location(run_id, stage, item)
            self.manifests_checked += 1
            try:
                loaded[stage] = manifests.read(run_id, stage, item)
            except StagestoreError as exc:
                message = exc.message if item is None else f"{_where(run_id, stage, item)}: {exc.message}"
                self.find("manifest_invalid", "problem", message, run_id=run_id, stage=stage,
                          item=item, path=path)
        for stage, manifest in loaded.items():
            self.keys[(run_id, item, stage)] = cache_key(manifest.input_hash, manifest.config_hash) \
                if manifest.status == "succeeded" else None
            if indexed(manifest):
                self.indexed.setdefault(cache_key(manifest.input_hash, manifest.config_hash),
                                        (run_id, item, stage))
            self.note_manifest(manifest)
            self.check_upstream(run_id, stage, manifest, loaded, shared, item)
        return loaded

    def check_item_log(self, run_id: str) -> None:
        """The run's item log: segments that are not one, damage, torn tails."""
        manifests = self.store.manifests
        for path, exc in manifests.item_log_invalid(run_id):
            self.find("item_log_invalid", "problem", f"run {run_id}: {exc.message}; its records "
                      "cannot be read", run_id=run_id, path=str(path))
        for path, offset, length in manifests.item_log_damage(run_id):
            self.find("item_log_damaged", "problem",
                      f"run {run_id}: {length} bytes at offset {offset} of {path.name} are not "
                      "a record that passes its check, and good records follow them: the item "
                      "records written there are lost (readers skip them)",
                      run_id=run_id, path=str(path))
        if owner_is_live(self.layout, run_owner(run_id)):
            return  # a live run may be in the middle of an append
        for path, offset, length in manifests.item_log_tails(run_id):
            self.find("item_log_torn", "warning",
                      f"run {run_id}: {path.name} ends with {length} bytes that are not a "
                      f"complete record (an append cut short by a crash, from offset {offset}); "
                      "readers ignore them; `stagestore recover` removes them and completes "
                      "the run", run_id=run_id, path=str(path))

    def check_item(self, run_id: str, item: str, shared: dict[str, StageManifest]) -> None:
        path = self.store.manifests.item_location(run_id, item)
        try:
            record = self.store.manifests.read_item_optional(run_id, item)
        except StagestoreError as exc:
            self.find("item_record_invalid", "problem", exc.message, run_id=run_id, item=item,
                      path=path)
            record = None
        loaded = self.check_scope(run_id, item, shared)
        if record is None:
            if loaded:
                self.find("item_record_missing", "problem",
                          f"run {run_id} item {item!r}: manifests exist but the item record "
                          "_item.json is missing", run_id=run_id, item=item, path=path)
            return
        for stage, refs in record.inputs.items():
            for name, ref in refs.items():
                self.note_ref(ref, run_id, stage, f"item {item!r} input snapshot {name!r}")

    def note_manifest(self, manifest: StageManifest) -> None:
        run_id, stage = manifest.run_id, manifest.stage
        label = stage if manifest.item is None else f"{stage} (item {manifest.item})"
        for name, ref in manifest.outputs.items():
            self.note_ref(ref, run_id, label, f"output {name!r}")
        for name, ref in manifest.inputs.items():
            self.note_ref(ref, run_id, label, f"input {name!r}")
        for log in manifest.logs:
            self.refs.add(log.stdout, run_id, label, f"attempt {log.attempt} stdout")
            self.refs.add(log.stderr, run_id, label, f"attempt {log.attempt} stderr")

    def note_ref(self, ref: ArtifactRef, run_id: str, stage: str | None, what: str) -> None:
        self.refs.add(ref.hash, run_id, stage, what)
        if ref.kind != "tree":
            return
        if ref.hash in self.trees_seen:
            listing = self.trees_seen[ref.hash]
        else:
            try:
                listing = read_tree(self.store.objects, ref.hash)
            except ObjectMissingError:
                listing = None  # reported as object_missing with everyone who names it
            except StagestoreError as exc:
                listing = None
                self.find("tree_invalid", "problem",
                          f"run {run_id}{' stage ' + stage if stage else ''}: {what} is tree "
                          f"{ref.hash}, which is not a valid tree: {exc.message}",
                          run_id=run_id, stage=stage, object=ref.hash)
            self.trees_seen[ref.hash] = listing
        if listing is None:
            return
        for entry in listing.entries:
            if entry.hash is not None:
                self.refs.add(entry.hash, run_id, stage, f"{what} file {entry.path!r}")

    def check_upstream(self, run_id: str, stage: str, manifest: StageManifest,
                       loaded: dict[str, StageManifest], shared: dict[str, StageManifest],
                       item: str | None) -> None:
        where = _where(run_id, stage, item)
        for up, expected in manifest.upstream.items():
            upstream = loaded.get(up) or shared.get(up)
            if upstream is None:
                if not (self.store.manifests.exists(run_id, up, item)
                        or self.store.manifests.exists(run_id, up)):
                    self.find("manifest_missing", "problem",
                              f"{where} used upstream {up}, whose manifest is missing",
                              run_id=run_id, stage=up, item=item)
                continue
            if upstream.output_hash != expected:
                self.find("upstream_mismatch", "problem",
                          f"{where} recorded upstream {up} output_hash "
                          f"{expected}, but {up}'s manifest has {upstream.output_hash}",
                          run_id=run_id, stage=stage, item=item)
            for name, ref in upstream.outputs.items():
                mine = manifest.inputs.get(f"upstream.{up}.{name}")
                if mine is not None and mine.hash != ref.hash:
                    self.find("upstream_mismatch", "problem",
                              f"{where} read {up}.{name} as {mine.hash}, but "
                              f"{up}'s manifest records {ref.hash}", run_id=run_id, stage=stage,
                              item=item)

    def check_completeness(self, record: RunRecord, loaded: dict[str, StageManifest]) -> None:
        run_id = record.run_id
        if owner_is_live(self.layout, run_owner(run_id)):
            return
        per_item = item_stages(record.definition.stages)
        if record.finished_at is None:
            missing = [s for s in record.selected if s not in loaded and s not in per_item]
            unended = self._unended_items(record) if per_item & set(record.selected) else []
            if missing or unended:
                what = []
                if missing:
                    what.append(f"no manifest yet for {', '.join(missing)}")
                if unended:
                    what.append(f"{len(unended)} item(s) not ended ({', '.join(unended[:5])}"
                                + (", ..." if len(unended) > 5 else "") + ")")
                self.find("run_incomplete", "warning",
                          f"run {run_id} was interrupted: {'; '.join(what)}; "
                          f"`stagestore recover` completes it", run_id=run_id)
            return
        for stage, outcome in record.outcomes.items():
            if outcome != "skipped" and stage not in loaded and \
                    not self.layout.manifest_path(run_id, stage).exists():
                self.find("manifest_missing", "problem",
                          f"run {run_id}: stage {stage} finished as {outcome} but its manifest is "
                          f"missing; `stagestore recover` restores it", run_id=run_id, stage=stage,
                          path=str(self.layout.manifest_path(run_id, stage)))

    def _unended_items(self, record: RunRecord) -> list[str]:
        unended = []
        for item in record.items:
            try:
                item_record = self.store.manifests.read_item_optional(record.run_id, item)
            except StagestoreError:
                continue  # reported as item_record_invalid
            if item_record is None or item_record.status == "running":
                unended.append(item)
        return unended

    # --- objects ---

    def check_objects(self, whole_store: bool) -> tuple[int, int]:
        objects = self.store.objects
        if whole_store:
            entries = list(objects.scan())
            present = {digest for digest, _ in entries if digest is not None}
            for digest, path in entries:
                if digest is None:
                    self.find("stray_file", "warning",
                              f"{path} is not a well-formed object name", path=str(path))
            todo = [(d, p) for d, p in entries if d is not None]
        else:
            present = set()
            todo = []
            for digest in sorted(self.refs.by_object):
                path = objects.path(digest)
                if path.exists():
                    present.add(digest)
                    todo.append((digest, path))
        for digest, users in sorted(self.refs.by_object.items()):
            if digest not in present and not objects.path(digest).exists():
                for run_id, stage, what in users:
                    self.find("object_missing", "problem",
                              f"run {run_id}{' stage ' + stage if stage else ''}: {what} names "
                              f"object {digest}, which is missing", run_id=run_id, stage=stage,
                              object=digest)
        total = 0
        sizes = []
        for digest, path in todo:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            sizes.append((digest, path, st))
            total += st.st_size
        done = 0
        for digest, path, st in sizes:
            if not stat.S_ISREG(st.st_mode):
                self.find("object_corrupt", "problem", f"object {digest} is not a regular file",
                          object=digest, path=str(path))
                continue
            try:
                actual = hash_file(path, st.st_size)
            except OSError as exc:
                self.find("object_unreadable", "problem", f"object {digest} cannot be read: "
                          f"{exc.strerror}", object=digest, path=str(path))
                continue
            done += st.st_size
            if self.progress:
                self.progress(done, total)
            if actual != digest:
                users = self.refs.by_object.get(digest, [])
                named = "; ".join(f"run {r}{' stage ' + s if s else ''} ({w})" for r, s, w in users[:5])
                zero = " (it is empty)" if st.st_size == 0 and digest != EMPTY_DIGEST else ""
                self.find("object_corrupt", "problem",
                          f"object {digest} does not match its name{zero}: its bytes hash to "
                          f"{actual}" + (f"; named by {named}" if named else ""),
                          object=digest, path=str(path),
                          run_id=users[0][0] if users else None, stage=users[0][1] if users else None)
            elif stat.S_IMODE(st.st_mode) != OBJECT_MODE:
                self.find("object_mode", "warning",
                          f"object {digest} has mode {stat.S_IMODE(st.st_mode):o}, not 444",
                          object=digest, path=str(path))
        return len(sizes), done

    def check_cache_index(self) -> None:
        stale = self.store.cache.stale(self.keys)
        results = self.store.cache.results() if stale else {}
        for wrong in stale:
            holder = results.get(wrong.key) if wrong.key is not None else None
            fix = (f"run {holder.run_id} holds the same result: `stagestore recover` or "
                   "`stagestore gc` points the entry there") if holder is not None else (
                "no run holds that result: `stagestore recover` or `stagestore gc` removes it")
            entry = wrong.entry
            where = {"run_id": entry.run_id, "item": entry.item, "stage": entry.stage} \
                if entry is not None else {}
            # A stale entry costs a re-execution, never a wrong result: a warning.
            if wrong.kind == "cache_entry_invalid":
                self.find("cache_entry_invalid", "warning", f"{wrong.problem}; {fix}",
                          path=str(wrong.path), **where)
            else:
                self.find("cache_entry_stale", "warning", f"{wrong.problem}; {fix}",
                          path=str(wrong.path), **where)
        for key in self.store.cache.missing(self.indexed):
            run_id, item, stage = self.indexed[key]
            path = self.store.layout.cache_entry_path(key)
            self.find("cache_entry_missing", "warning", (
                f"run {run_id}" + (f" item {item!r}" if item is not None else "") + f" stage "
                f"{stage} has a succeeded result with no cache entry (entries are not fsynced: a "
                "power loss can lose one), so the stage would execute again; `stagestore recover` "
                "or `stagestore gc` writes it"), path=str(path), run_id=run_id, item=item,
                stage=stage)

    def check_views(self) -> None:
        """Views are derived state: one that differs from its tree is a warning (the next
        attempt that needs it rebuilds it, and `recover` removes it); the objects are checked
        on their own above."""
        from ..store.views import ViewStore

        views = ViewStore(self.store.objects)
        for name in views.names():
            wrong = views.check(name)
            if wrong:
                shown = ", ".join(p or "." for p in wrong[:3]) + (" ..." if len(wrong) > 3 else "")
                self.find("view_damaged", "warning",
                          f"view views/{name} differs from its tree ({shown}); it is rebuilt "
                          "when next used, and `stagestore recover` removes it",
                          object="blake3:" + name, path=str(self.layout.views / name))

    def check_temps(self) -> None:
        for entry, owner in orphaned_temps(self.layout):
            self.find("orphan_temp", "warning",
                      f"orphaned temp {entry.name} (owner {owner or 'unknown'} is gone); "
                      "`stagestore recover` removes it", path=entry.path)


def orphaned_temps(layout: StoreLayout) -> list[tuple[os.DirEntry, str | None]]:
    """Entries of `tmp/` whose owner holds no lock: no live process will ever finish them."""
    if not layout.tmp.is_dir():
        return []
    found = []
    live: dict[str, bool] = {}
    for entry in sorted(os.scandir(layout.tmp), key=lambda e: e.name):
        owner = StoreLayout.tmp_owner(entry.name)
        if owner is not None:
            if owner not in live:
                live[owner] = owner_is_live(layout, owner)
            if live[owner]:
                continue
        found.append((entry, owner))
    return found
