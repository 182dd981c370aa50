"""`report`: the failure taxonomy of one run, from its item records or its manifests.

For each processed item (or, in a run without items, the run as a single item) only the first
failure counts, and only when the item failed (a degraded item, whose failure a fallback
covered, is counted apart).  Build failures (taxonomy-eligible) and infrastructure failures are
tallied apart: the build failure distribution's denominator is taxonomy-eligible failures only.
"""

from __future__ import annotations

from collections import Counter

from ..execution.classify import runner_failure
from ..model.failures import UPSTREAM_MISSING, signal_key
from ..model.records import Failure, RunRecord
from ..model.reports import (BuildFailureRow, FailureReport, FirstFailureRow, InfrastructureRow,
                             StageFailureRow)
from ..store.store import Store

DOMINANT_SIGNALS = 3


def failure_report(store: Store, run_id: str) -> FailureReport:
    """A run's failure tables: failures by stage, build failures by class, infrastructure
    failures, and each failed item's first failure (counted once).  Build percentages are over
    taxonomy-eligible failures only.  Raises `RunNotFoundError` for an unknown run."""
    record = store.manifests.read_run(run_id)
    outcomes: list[tuple[str | None, str, tuple[str, Failure] | None]] = (
        _item_outcomes(store, record) if record.items else [_run_outcome(store, record)])
    processed = len(outcomes)
    failed = [(item, first) for item, status, first in outcomes if status == "failed" and first]
    by_stage = Counter(stage for _, (stage, _) in failed)
    eligible = [f for _, (_, f) in failed if f.taxonomy_eligible]
    by_class = Counter(f.class_ for f in eligible)
    infra: dict[str, list[Failure]] = {}
    for _, (stage, failure) in failed:
        if not failure.taxonomy_eligible:
            infra.setdefault(stage, []).append(failure)

    def pct(count: int, total: int) -> float:
        return round(100.0 * count / total, 2) if total else 0.0

    complete = record.finished_at is not None and record.systemic is None
    return FailureReport(
        run_id=run_id, processed=processed,
        succeeded=sum(status == "succeeded" for _, status, _ in outcomes),
        degraded=sum(status == "degraded" for _, status, _ in outcomes),
        failed=len(failed),
        stage_failures=[StageFailureRow(stage=s, count=n, percent_of_processed=pct(n, processed))
                        for s, n in _ranked(by_stage)],
        build_failures=[BuildFailureRow(taxonomy_category=c, count=n,
                                        percent_of_build_failures=pct(n, len(eligible)))
                        for c, n in _ranked(by_class)],
        infrastructure=[InfrastructureRow(
            stage=s, count=len(fs), percent_of_processed=pct(len(fs), processed),
            dominant_signals=[sig for sig, _ in Counter(
                signal_key(f.signal) for f in fs).most_common(DOMINANT_SIGNALS)])
            for s, fs in sorted(infra.items(), key=lambda kv: (-len(kv[1]), kv[0]))],
        first_failures=[FirstFailureRow(
            item=item, first_failure_stage=stage, stage_failure=f.class_,
            failure_category=f.category, failure_signal=signal_key(f.signal),
            taxonomy_eligible=f.taxonomy_eligible) for item, (stage, f) in failed],
        systemic=record.systemic, valid_for_trends=complete, complete=complete)


def _ranked(counter: Counter) -> list[tuple[str, int]]:
    return sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))


def _item_outcomes(store: Store, record: RunRecord):  # noqa: ANN202
    """(item, status, (stage, failure) of its first failure) per processed item, in list order."""
    found = []
    for item in record.items:
        item_record = store.manifests.read_item_optional(record.run_id, item)
        if item_record is None or item_record.status == "running":
            continue  # not processed (yet)
        first = item_record.first_failure
        found.append((item, item_record.status,
                      (first.stage, first.failure) if first is not None else None))
    return found


def _run_outcome(store: Store, record: RunRecord):  # noqa: ANN202
    """The run as one item: its first failed stage in dependency order."""
    status = "succeeded"
    for stage in record.selected:
        manifest = store.manifests.read_optional(record.run_id, stage)
        if manifest is None:
            if record.outcomes.get(stage) == "failed":  # failed before it could have a manifest
                spec = record.definition.stages[stage]
                return None, "failed", (stage, runner_failure(
                    spec, UPSTREAM_MISSING, "failed before its manifest could be written "
                    "(an upstream manifest was missing or unreadable)"))
            continue
        if manifest.failure is not None:
            skipped = any(event.kind == "skip" for event in manifest.events)
            if manifest.status == "failed" and not skipped:
                return None, "failed", (stage, manifest.failure)
            status = "degraded"  # use_last_good, or on_failure = "skip"
    return None, status, None
