"""What keeps a run going when it sensibly can, and stops it when it should not go on.

* `CircuitBreaker`: after N failures of one stage in a row across items, the remaining items fail
  fast at that stage, except one probe item at a time; the first probe that succeeds closes it.
* `SystemicDetector`: in sampling mode, once enough items are processed, a run where more than
  the threshold of them failed at the same infrastructure stage is aborted.
* `preflight`: free disk in the store against what a stage is about to write.
* `last_good`: the most recent succeeded result of a stage in an earlier run (`use_last_good`).

docs/failures.md describes each rule as users meet it.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from dataclasses import dataclass, field

from ..errors import CorruptRecordError, FormatVersionError
from ..model.failures import signal_key
from ..model.records import FirstFailure, StageManifest, SystemicFailure
from ..store.trees import artifact_present

PREFLIGHT_MARGIN = 1.20
SAMPLE_ITEMS = 5
DOMINANT_SIGNALS = 3


# --- circuit breaker ---------------------------------------------------------------------------


@dataclass
class _Circuit:
    consecutive: int = 0
    open: bool = False
    probing: bool = False
    fast_failed: int = 0  # since the circuit opened or the last probe was let through
    last_failure: str = ""


class CircuitBreaker:
    """Per stage: closed until `limit` failures in a row, then open.  While open, items fail
    fast; after every `limit` fast failures one probe item is let through (one at a time).  A
    probe that succeeds closes the circuit; one that fails keeps it open for `limit` more."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._circuits: dict[str, _Circuit] = {}

    def admit(self, stage: str) -> tuple[bool, bool, str]:
        """(may execute, is a probe, why not): asked right before a stage would execute."""
        if not self.limit:
            return True, False, ""
        with self._lock:
            state, _, why = self._gate(stage, count_fast=True)
        return state != "fail_fast", state == "probe", why

    def gate(self, stage: str) -> tuple[str, int, str]:
        """For an item about to be sent elsewhere (`distributed`): ("unknown" | "closed" |
        "fail_fast" | "probe", consecutive failures, why failing fast), by the rules of `admit`
        ("unknown": no execution of the stage recorded yet, so closed).  A probe is
        reserved now, as `admit` reserves it; a fast failure is counted only when the item
        reports it (`fast_failure`)."""
        with self._lock:
            return self._gate(stage, count_fast=False)

    def _gate(self, stage: str, *, count_fast: bool) -> tuple[str, int, str]:
        circuit = self._circuits.get(stage)
        if circuit is None:
            return "unknown", 0, ""  # never recorded: closed
        if not self.limit or not circuit.open:
            return "closed", circuit.consecutive, ""
        if circuit.probing or circuit.fast_failed < self.limit:
            if count_fast:
                circuit.fast_failed += 1
            return "fail_fast", circuit.consecutive, (
                f"circuit open: stage {stage!r} failed {circuit.consecutive} times in a row "
                f"(last: {circuit.last_failure}); failing fast until a probe item succeeds")
        circuit.probing, circuit.fast_failed = True, 0
        return "probe", circuit.consecutive, ""

    def fast_failure(self, stage: str) -> None:
        """An item failed fast at `stage` (its gate said so)."""
        with self._lock:
            circuit = self._circuits.get(stage)
            if circuit is not None and circuit.open:
                circuit.fast_failed += 1

    def release_probe(self, stage: str) -> None:
        """A probe reserved by `gate` that the item did not use: the next item probes."""
        with self._lock:
            circuit = self._circuits.get(stage)
            if circuit is not None and circuit.probing:
                circuit.probing, circuit.fast_failed = False, self.limit or 0

    def record(self, stage: str, ok: bool, probe: bool, failure_class: str = "") -> bool:
        """The result of an execution that `admit` let through; True when this opened the
        circuit."""
        if not self.limit:
            return False
        with self._lock:
            circuit = self._circuits.setdefault(stage, _Circuit())
            if probe:
                circuit.probing = False
            if ok:
                circuit.consecutive = 0
                circuit.open = False
                return False
            circuit.consecutive += 1
            circuit.last_failure = failure_class
            if not circuit.open and circuit.consecutive >= self.limit:
                circuit.open = True
                circuit.fast_failed = 0
                return True
            return False


# --- systemic failure detection -----------------------------------------------------------------


@dataclass
class SystemicDetector:
    """Counts processed items and, per infrastructure stage (`domain = "infrastructure"`), the
    failed items whose first failure happened there; `check` after every processed item."""

    min_items: int
    threshold: float
    infrastructure_stages: set[str]
    processed: int = 0
    failures: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def add(self, item: str, first_failure: FirstFailure | None) -> None:
        self.processed += 1
        if first_failure is not None and first_failure.stage in self.infrastructure_stages:
            self.failures.setdefault(first_failure.stage, []).append(
                (item, signal_key(first_failure.failure.signal)))

    def check(self) -> SystemicFailure | None:
        """The abort, if more than `threshold` of at least `min_items` processed items failed at
        one infrastructure stage (strictly more: at exactly the threshold the run goes on)."""
        if self.processed < self.min_items or self.processed == 0:
            return None
        worst = max(self.failures.items(), key=lambda kv: len(kv[1]), default=None)
        if worst is None:
            return None
        stage, failed = worst
        ratio = len(failed) / self.processed
        if not ratio > self.threshold:
            return None
        signals = Counter(sig for _, sig in failed if sig)
        return SystemicFailure(
            trigger_stage=stage, processed_items=self.processed, stage_failures=len(failed),
            failure_ratio=round(ratio, 4), threshold_ratio=self.threshold,
            item_samples=[item for item, _ in failed[:SAMPLE_ITEMS]],
            dominant_failure_signals=[sig for sig, _ in signals.most_common(DOMINANT_SIGNALS)])


# --- resource preflight -----------------------------------------------------------------------


def free_bytes(path: os.PathLike[str] | str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def preflight(store_root: os.PathLike[str] | str, need: int, why: str) -> str | None:
    """None when the store's filesystem has `need` bytes plus the margin free, else the refusal."""
    wanted = int(need * PREFLIGHT_MARGIN)
    free = free_bytes(store_root)
    if free >= wanted:
        return None
    return (f"preflight: needs {human_size(wanted)} free in {store_root} ({why}, plus a 20% "
            f"margin) but only {human_size(free)} is free; free some space (`stagestore gc` "
            "reclaims unreferenced objects) or lower the stage's `disk`")


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# --- the last good result ---------------------------------------------------------------------

# What reading another run's manifest raises when the manifest is there but cannot be used (a
# missing one is `read_optional`'s None); anything else is a bug and propagates.
_UNUSABLE = (OSError, CorruptRecordError, FormatVersionError)


def last_good(store, stage: str, item: str | None, outputs: list[str],  # noqa: ANN001
              exclude_run: str) -> StageManifest | None:
    """The most recently finished succeeded manifest of `stage` (and `item`) in another run,
    with the same declared outputs and every object it names present."""
    best: StageManifest | None = None
    for run_id in store.manifests.runs():
        if run_id == exclude_run:
            continue
        try:
            manifest = store.manifests.read_optional(run_id, stage, item)
        except _UNUSABLE:  # damaged, unreadable or newer: not a result to fall back to
            continue
        if manifest is None or manifest.status != "succeeded":
            continue
        if sorted(manifest.outputs) != sorted(outputs):
            continue
        if best is not None and manifest.finished_at <= best.finished_at:
            continue
        if all(artifact_present(store.objects, ref) for ref in manifest.outputs.values()):
            best = manifest
    return best


def last_output_size(store, stage: str, exclude_run: str) -> int | None:  # noqa: ANN001
    """The total output size of the stage's most recent succeeded manifest, as a disk estimate:
    the run-level manifest, or the first item manifest found, of the newest run that has one."""
    for run_id in reversed(store.manifests.runs()):
        if run_id == exclude_run:
            continue
        for item in [None, *store.manifests.items(run_id)[:SAMPLE_ITEMS]]:
            try:
                manifest = store.manifests.read_optional(run_id, stage, item)
            except _UNUSABLE:  # damaged, unreadable or newer: look further back
                continue
            if manifest is not None and manifest.status == "succeeded":
                return sum(ref.size for ref in manifest.outputs.values())
    return None
