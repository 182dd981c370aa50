"""`doctor`: a quick health check of a store and of the machine around it.

Each check says ok, warning (worth acting on, nothing is wrong yet) or problem (something is
wrong or about to go wrong), in one line that also says what to do.  Doctor is read-only: it
creates, deletes, repairs and rewrites nothing (open the store with `Store.open(root,
readonly=True)`; lock probes never create lock files).  It decodes every manifest and record,
but re-hashes no object: the `records` line and the report's `deep_check` say so and name
`verify`, which does.

The checks that probe owner locks (`locks`, `temps`, `runs`) hold the store lock shared while
they do, like verify, for a view that `gc` does not change under them (docs/format.md,
Locking).  The lock is taken only where its files exist (a store nobody has locked yet has
no holder) and is never upgraded from format 1: either would be a write.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import msgspec

from ..errors import FormatVersionError, RunBusyError, RunNotFoundError, StagestoreError
from ..execution.resilience import PREFLIGHT_MARGIN, free_bytes, human_size
from ..model.records import STORE_FORMAT_DECODER
from ..model.reports import CheckStatus, DoctorCheck, DoctorReport
from ..store.layout import FORMAT_VERSION, StoreLayout, run_owner, validate_name
from ..store.locking import owner_is_live, store_lock
from ..store.store import Store

# Where the mount table is read from; tests point this at a file of their own.
MOUNTS_FILE = "/proc/self/mounts"

# Filesystems whose locks, renames and fsyncs are weaker than a local disk's; docs/format.md,
# "What is not protected against".  Any type starting with "fuse" counts too.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "sshfs", "fuse.sshfs", "9p", "afs", "ceph",
    "glusterfs", "lustre", "gpfs", "beegfs"})

RECENT_RUNS = 10  # free_disk estimates what a run needs from this many most recent runs
LOW_DISK = 1024 ** 3  # below this much free space is a warning whatever runs need
LOCK_TIMEOUT = 5.0  # seconds to wait for the shared store lock (held off only by gc)
LIST_AT_MOST = 5  # run ids named in one message


DEEP_CHECK = "stagestore verify"


def doctor(store: Store) -> DoctorReport:
    """Check the store's format, free disk, filesystem type, lock files, temps, runs, and that
    every manifest and record decodes.  Writes nothing: open the store with `readonly=True`."""
    checks = [_format(store), _free_disk(store), _filesystem(store)]
    try:
        with _store_lock_shared(store):
            checks += [_locks(store), _temps(store), _runs(store)]
    except RunBusyError:
        message = ("not checked: a `stagestore gc` holds or is waiting for the store lock; run "
                   "`stagestore doctor` again when it has finished")
        checks += [DoctorCheck(name=name, status="warning", message=message)
                   for name in ("locks", "temps", "runs")]
    # Outside the store lock: gc removes no manifest or record, and forget (which does) holds
    # the lock shared, so the lock would not keep them still anyway; see `_records`.
    checks.append(_records(store))
    return DoctorReport(ok=all(c.status != "problem" for c in checks), checks=checks,
                        objects_checked=False, deep_check=DEEP_CHECK)


@contextmanager
def _store_lock_shared(store: Store) -> Iterator[None]:
    """The store lock held shared, without writing: taking it would create its lock files
    where they do not exist yet (then nobody holds it) and upgrade a format-1 store."""
    layout = store.layout
    with ExitStack() as stack:
        if layout.format_version >= 2 and layout.store_gate.exists() and \
                layout.store_lock.exists():
            try:
                stack.enter_context(store_lock(layout, exclusive=False, timeout=LOCK_TIMEOUT))
            except PermissionError:
                pass  # a store this user may only read: nothing to keep still for us
        yield


def _check(name: str, status: CheckStatus, message: str) -> DoctorCheck:
    return DoctorCheck(name=name, status=status, message=" ".join(message.split()))


def _format(store: Store) -> DoctorCheck:
    # Store.open has already refused a missing, foreign, invalid or newer format file.
    try:
        version = STORE_FORMAT_DECODER.decode(store.layout.format_file.read_bytes()).version
    except (OSError, msgspec.MsgspecError) as exc:
        return _check("format", "problem", f"cannot read {store.layout.format_file}: {exc}; "
                      "run `stagestore verify`")
    return _check("format", "ok", f"store format version {version}"
                  + ("" if version == FORMAT_VERSION else f" (this stagestore writes {FORMAT_VERSION})"))


# --- free disk ---


def recent_output_need(store: Store, runs: int = RECENT_RUNS) -> int:
    """The largest total output size of any succeeded manifest in the last `runs` runs."""
    largest = 0
    for _run, _item, _stage, manifest in store.manifests.iter_manifests(store.manifests.runs()[-runs:]):
        if isinstance(manifest, Exception) or manifest.status != "succeeded":
            continue
        largest = max(largest, sum(ref.size for ref in manifest.outputs.values()))
    return largest


def _free_disk(store: Store) -> DoctorCheck:
    try:
        free = free_bytes(store.root)
    except OSError as exc:
        return _check("free_disk", "warning",
                      f"cannot read the free space of {store.root}: {exc.strerror}")
    largest = recent_output_need(store)
    need = int(largest * PREFLIGHT_MARGIN)
    have = f"{human_size(free)} free"
    why = (f"(the largest stage output of the last {RECENT_RUNS} runs, {human_size(largest)}, "
           "plus 20%)")
    advice = "free some space or move the store; `stagestore gc` reclaims unreferenced objects"
    if free < need:
        return _check("free_disk", "problem",
                      f"{have}, less than the {human_size(need)} a run may need {why}; {advice}")
    if free < 2 * need:
        return _check("free_disk", "warning", f"{have}, less than twice the {human_size(need)} "
                      f"a run may need {why}; {advice}")
    needs = (f"a run may need {human_size(need)} {why}" if largest else
             f"no succeeded stage output in the last {RECENT_RUNS} runs to size a need from")
    if free < LOW_DISK:
        return _check("free_disk", "warning",
                      f"{have}, less than {human_size(LOW_DISK)}; {needs}; {advice}")
    return _check("free_disk", "ok", f"{have}; {needs}")


# --- filesystem type ---


def _unescape(field: bytes) -> str:
    r"""A mount table field: `\040` (space), `\011`, `\012` and `\134` decoded, as a path."""
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8) & 0xFF]), field))


def mount_of(path: str | os.PathLike[str]) -> tuple[str, str] | None:
    """(filesystem type, mount point) of the mount holding `path`, from `MOUNTS_FILE`;
    None when there is no mount table (not Linux) or no entry covers the path."""
    try:
        with open(MOUNTS_FILE, "rb") as f:
            table = f.read()
    except OSError:
        return None
    target = os.path.realpath(path)
    best: tuple[str, str] | None = None
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point, fstype = _unescape(fields[1]), _unescape(fields[2])
        prefix = mount_point.rstrip("/") + "/"
        if target != mount_point and not (target + "/").startswith(prefix):
            continue
        # The longest mount point wins; of equal ones the later line (mounted over the other).
        if best is None or len(mount_point) >= len(best[1]):
            best = (fstype, mount_point)
    return best


def is_network_filesystem(fstype: str) -> bool:
    return fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse")


def network_filesystem_warning(store: Store) -> str | None:
    """A warning when the store is on a network or FUSE filesystem (docs/reliability.md:
    their locks, renames and fsync are weaker than the store's guarantees assume); None on a
    local disk or when the mount table cannot tell."""
    found = mount_of(store.root)
    if found is None or not is_network_filesystem(found[0]):
        return None
    return (f"the store {store.root} is on a {found[0]} filesystem (mounted at {found[1]}); "
            "its locks, renames and fsync may not give the guarantees in docs/reliability.md; "
            "prefer a local disk")


def _filesystem(store: Store) -> DoctorCheck:
    found = mount_of(store.root)
    if found is None:
        return _check("filesystem", "ok", "filesystem type unknown (no mount table at "
                      f"{MOUNTS_FILE}; not Linux?)")
    fstype, mount_point = found
    where = f"the store is on {fstype} (mounted at {mount_point})"
    if is_network_filesystem(fstype):
        return _check("filesystem", "warning",
                      f"{where}, a network or FUSE filesystem: its locks and renames are weaker "
                      "than a local disk's, so concurrent runs and crashes can damage the store; "
                      "keep the store on a local disk")
    return _check("filesystem", "ok", where)


# --- lock files, temps, runs (under the shared store lock) ---


def stale_lock_files(layout: StoreLayout) -> list[str]:
    """The lock files `gc` would remove: `run-<id>.lock` of a run that has no folder and no
    live owner, and every `work-*.lock` nobody holds."""
    try:
        entries = sorted(os.scandir(layout.locks), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    stale = []
    for entry in entries:
        name = entry.name
        if not name.endswith(".lock"):
            continue
        owner = name[:-len(".lock")]
        if owner.startswith("work-"):
            if not owner_is_live(layout, owner):
                stale.append(name)
        elif owner.startswith("run-"):
            try:
                run_id = validate_name(owner[len("run-"):], "run id")
            except StagestoreError:
                continue  # gc leaves it alone too
            if not layout.run_dir(run_id).is_dir() and not owner_is_live(layout, owner):
                stale.append(name)
    return stale


def _locks(store: Store) -> DoctorCheck:
    stale = stale_lock_files(store.layout)
    # An idle work lock is expected after any run that executed a stage (it is reused by the
    # next identical execution): counted, never a warning.  A run lock whose run is gone is.
    idle = sum(name.startswith("work-") for name in stale)
    runs = len(stale) - idle
    note = f"; {idle} idle work lock{'s' if idle != 1 else ''}" if idle else ""
    if runs:
        return _check("locks", "warning", f"{runs} stale run lock file{'s' if runs != 1 else ''} "
                      f"in {store.layout.locks} (no process holds them, and their runs are gone)"
                      f"{note}; `stagestore gc` removes them")
    return _check("locks", "ok", "no stale run locks" + (
        f"{note} (`stagestore gc` removes them)" if idle else ""))


def _tree_size(path: str) -> int:
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if not os.path.isdir(path) or os.path.islink(path):
        return st.st_size
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                continue
    return total


def _temps(store: Store) -> DoctorCheck:
    from .verify import orphaned_temps  # imported here: `run` imports this module

    orphans = orphaned_temps(store.layout)
    if not orphans:
        return _check("temps", "ok", "no orphaned temps")
    n = len(orphans)
    size = sum(_tree_size(entry.path) for entry, _owner in orphans)
    return _check("temps", "warning", f"{n} orphaned temp{'s' if n != 1 else ''} "
                  f"({human_size(size)}) in {store.layout.tmp}; `stagestore recover` removes "
                  + ("them" if n != 1 else "it"))


def _listed(ids: list[str]) -> str:
    shown = ", ".join(ids[:LIST_AT_MOST])
    return shown + (f" and {len(ids) - LIST_AT_MOST} more" if len(ids) > LIST_AT_MOST else "")


def _runs(store: Store) -> DoctorCheck:
    manifests = store.manifests
    run_ids = manifests.runs()
    unreadable: list[str] = []
    incomplete: list[str] = []
    running = 0
    for run_id in run_ids:
        owner = run_owner(run_id)
        try:
            record = manifests.read_run(run_id)
        except RunNotFoundError:
            # A folder without its record: a run just starting, or one whose record is lost.
            if manifests.stages(run_id) and not owner_is_live(store.layout, owner):
                unreadable.append(run_id)
            continue
        except (StagestoreError, OSError):
            unreadable.append(run_id)
            continue
        if record.finished_at is not None:
            continue
        if owner_is_live(store.layout, owner):
            running += 1
            continue
        try:  # it may have finished between the read and the probe
            if manifests.read_run(run_id).finished_at is not None:
                continue
        except (StagestoreError, OSError):
            pass
        incomplete.append(run_id)
    parts = []
    if unreadable:
        n = len(unreadable)
        parts.append(f"the run record of {n} run{'s' if n != 1 else ''} cannot be read "
                     f"({_listed(unreadable)}); run `stagestore verify`")
    if incomplete:
        n = len(incomplete)
        parts.append(f"{n} incomplete run{'s' if n != 1 else ''} ({_listed(incomplete)}); "
                     f"`stagestore recover` completes {'them' if n != 1 else 'it'}")
    if parts:
        return _check("runs", "problem" if unreadable else "warning", "; ".join(parts))
    n = len(run_ids)
    return _check("runs", "ok", f"{n} run{'s' if n != 1 else ''}, none incomplete"
                  + (f" ({running} running)" if running else ""))


# --- manifests and records (no lock: see `doctor`) ---

REPAIR = {
    "manifest": "`stagestore recover` does the stages of damaged or missing manifests again",
    "item record": "a damaged item record: restore it from a backup, or `stagestore forget` "
                   "the run",
}


def _records(store: Store) -> DoctorCheck:
    """Every manifest (run-level and per item) and item record decodes and passes the checks a
    reader makes, and every manifest a finished run's record names exists.  Cheap: no object is
    read, so the message always says that object contents were not checked."""
    problems: list[str] = []
    advice: dict[str, None] = {}  # ordered, without repeats
    counts = {"manifest": 0, "item record": 0, "run record": 0}

    def unreadable(exc: Exception, path: object, kind: str) -> None:
        if isinstance(exc, FormatVersionError):
            problems.append(exc.message)  # names the path and both versions
            advice["a newer stagestore wrote some of them: upgrade stagestore"] = None
            return
        why = exc.message if isinstance(exc, StagestoreError) else str(exc)
        problems.append(f"{path} is damaged ({why.removeprefix(f'{path}: ')})")
        advice[REPAIR[kind]] = None

    for run_id in store.manifests.runs():
        try:
            _run_records(store, run_id, counts, problems, advice, unreadable)
        except FileNotFoundError:
            continue  # the run folder went away while it was read: forgotten
    not_checked = (f"object contents were not checked (doctor re-hashes nothing): "
                   f"`{DEEP_CHECK}` re-hashes every object")
    if problems:
        n = len(problems)
        shown = "; ".join(problems[:LIST_AT_MOST])
        more = (f"; and {n - LIST_AT_MOST} more (`{DEEP_CHECK}` lists them all)"
                if n > LIST_AT_MOST else "")
        return _check("records", "problem", f"{n} damaged or missing record{'s' if n != 1 else ''}: "
                      f"{shown}{more}; {'; '.join(advice)}; {not_checked}")
    parts = [f"{n} {kind}{'s' if n != 1 else ''}" for kind, n in counts.items()]
    decoded = ", ".join(parts[:-1]) + " and " + parts[-1]
    return _check("records", "ok", f"{decoded} decode, and every manifest a finished run "
                  f"names exists; {not_checked}")


def _run_records(store: Store, run_id: str, counts: dict[str, int], problems: list[str],
                 advice: dict[str, None], unreadable) -> None:  # noqa: ANN001
    """`_records` for one run: its manifests and item records, and its record's outcomes."""
    manifests, layout = store.manifests, store.layout
    for item in manifests.scopes(run_id):
        for stage in manifests.stages(run_id, item):
            try:
                manifests.read(run_id, stage, item)
                counts["manifest"] += 1
            except FileNotFoundError:
                continue  # removed since it was listed: a stage skipped, a run forgotten
            except (StagestoreError, OSError) as exc:  # corrupt, newer format, unreadable
                unreadable(exc, manifests.location(run_id, stage, item), "manifest")
        if item is not None:
            try:
                if manifests.read_item_optional(run_id, item) is not None:
                    counts["item record"] += 1
            except (StagestoreError, OSError) as exc:
                unreadable(exc, manifests.item_location(run_id, item), "item record")
    try:
        record = manifests.read_run(run_id)
    except (StagestoreError, OSError):
        return  # the `runs` check reports it
    counts["run record"] += 1
    if record.finished_at is None:
        return  # running or interrupted: the `runs` check
    missing = [(stage, outcome) for stage, outcome in record.outcomes.items()
               if outcome != "skipped" and not layout.manifest_path(run_id, stage).exists()]
    if missing and not owner_is_live(layout, run_owner(run_id)) and \
            layout.run_record_path(run_id).exists():  # not being redone, nor forgotten
        for stage, outcome in missing:
            problems.append(f"{layout.manifest_path(run_id, stage)} is missing, although run "
                            f"{run_id} finished with stage {stage} {outcome}")
        advice[REPAIR["manifest"]] = None
