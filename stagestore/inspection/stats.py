"""`stats`: how each stage has been doing over the last runs, read from their manifests.

Counts run-level and per-item manifests alike.  A manifest reused from the cache counts as
succeeded but not as executed, so durations and retries describe real executions only.
Reads records only; takes no lock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime

from ..errors import StageNotFoundError, UsageError
from ..model.failures import signal_key
from ..model.records import StageManifest
from ..model.reports import LastFailure, StageStats, StatsReport
from ..store.store import Store

DEFAULT_LAST = 20


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def percentile(values: Sequence[float], p: float) -> float | None:
    """The nearest-rank `p`th percentile (0 < p <= 100) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _duration(manifest: StageManifest) -> float:
    return max((manifest.finished_at - manifest.started_at).total_seconds(), 0.0)


def stage_stats(store: Store, stage: str | None = None, last: int = DEFAULT_LAST) -> StatsReport:
    """Per stage over the last `last` runs: counts, success rate, durations, retries, and the
    most recent failure.  `stage` limits the report to one stage, which must have a manifest in
    those runs (`StageNotFoundError` otherwise)."""
    if last < 1:
        raise UsageError(f"stats need at least 1 run to look at, not last={last}")
    run_ids = store.manifests.runs()[-last:]
    by_stage: dict[str, list[StageManifest]] = {}
    unreadable: dict[str, int] = {}
    for _run, _item, name, manifest in store.manifests.iter_manifests(run_ids):
        if isinstance(manifest, Exception):
            unreadable[name] = unreadable.get(name, 0) + 1
        else:
            by_stage.setdefault(name, []).append(manifest)
    if stage is not None:
        if stage not in by_stage:
            bad = unreadable.get(stage, 0)
            raise StageNotFoundError(
                f"no manifest of stage {stage!r} in the last {len(run_ids)} runs"
                + (f" ({bad} unreadable; `stagestore verify` names them)" if bad else "")
                + "; stages: " + (", ".join(sorted(by_stage)) or "(none)"))
        by_stage = {stage: by_stage[stage]}
        unreadable = {stage: unreadable.get(stage, 0)}
    order = _run_order(run_ids, by_stage)
    return StatsReport(last=last, runs=run_ids,
                       stages=[_one(name, by_stage[name]) for name in order],
                       unreadable=sum(unreadable.values()))


def _run_order(run_ids: list[str], by_stage: dict[str, list[StageManifest]]) -> list[str]:
    """Stages in the order they started in the newest run that has them; ties by name."""
    first_start: dict[tuple[str, str], datetime] = {}
    for name, manifests in by_stage.items():
        for m in manifests:
            key = (m.run_id, name)
            if key not in first_start or m.started_at < first_start[key]:
                first_start[key] = m.started_at
    order: list[str] = []
    for run_id in reversed(run_ids):
        here = sorted((start, name) for (rid, name), start in first_start.items()
                      if rid == run_id and name not in order)
        order += [name for _start, name in here]
    return order


def _one(name: str, manifests: list[StageManifest]) -> StageStats:
    executed = [m for m in manifests if m.attempts > 0]
    durations = [_duration(m) for m in executed]
    succeeded = sum(m.status == "succeeded" for m in manifests)
    failed = sum(m.status == "failed" for m in manifests)
    degraded = sum(m.status == "degraded" for m in manifests)
    p50, p95 = percentile(durations, 50), percentile(durations, 95)
    latest: StageManifest | None = None
    for m in manifests:  # oldest run first, so of equal times the later run wins
        if m.status in ("failed", "degraded") and m.failure is not None and (
                latest is None or m.finished_at >= latest.finished_at):
            latest = m
    last_failure = None
    if latest is not None and latest.failure is not None:
        f = latest.failure
        last_failure = LastFailure(run_id=latest.run_id, item=latest.item, class_=f.class_,
                                   category=f.category, signal=signal_key(f.signal),
                                   at=_iso(latest.finished_at))
    return StageStats(
        stage=name, runs=len({m.run_id for m in manifests}), manifests=len(manifests),
        executed=len(executed), succeeded=succeeded, failed=failed, degraded=degraded,
        success_rate=round(100 * (succeeded + degraded) / len(manifests), 1),
        p50_s=None if p50 is None else round(p50, 3), p95_s=None if p95 is None else round(p95, 3),
        retries=sum(max(m.attempts - 1, 0) for m in manifests), last_failure=last_failure)
