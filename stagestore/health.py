"""`doctor`: a quick health check of a store and of the machine around it.

Each check says ok, warning (worth acting on, nothing is wrong yet) or problem (something is
wrong or about to go wrong), in one line that also says what to do.  Doctor is read-only: it
deletes, repairs and rewrites nothing.  It re-hashes nothing either; `verify` does that.

The checks that probe owner locks (`locks`, `temps`, `runs`) hold the store lock shared while
they do, like verify: a probe of a run lock whose run folder is gone must never race with `gc`
deleting that lock file (docs/format.md, Locking).
"""

from __future__ import annotations

import os
import re

import msgspec

from .errors import RunBusyError, RunNotFoundError, StagestoreError
from .layout import FORMAT_VERSION, StoreLayout, run_owner, validate_name
from .locking import owner_is_live, store_lock
from .records import STORE_FORMAT_DECODER
from .reports import CheckStatus, DoctorCheck, DoctorReport
from .resilience import PREFLIGHT_MARGIN, free_bytes, human_size
from .store import Store

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


def doctor(store: Store) -> DoctorReport:
    """Check the store's format, free disk, filesystem type, lock files, temps and runs."""
    checks = [_format(store), _free_disk(store), _filesystem(store)]
    try:
        with store_lock(store.layout, exclusive=False, timeout=LOCK_TIMEOUT):
            checks += [_locks(store), _temps(store), _runs(store)]
    except RunBusyError:
        message = ("not checked: a `stagestore gc` holds or is waiting for the store lock; run "
                   "`stagestore doctor` again when it has finished")
        checks += [DoctorCheck(name=name, status="warning", message=message)
                   for name in ("locks", "temps", "runs")]
    return DoctorReport(ok=all(c.status != "problem" for c in checks), checks=checks)


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
                      "keep the store on a local disk (--store DIR)")
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
    from .verification import orphaned_temps  # imported here: `run` imports this module

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
