"""stagestore: a content-addressed, crash-safe artifact store for pipelines of stages.

The public API (imported lazily, so `import stagestore` and `stagestore --help` stay fast).
Every `stagestore` command is one of these calls; each returns a report (a msgspec Struct, what
the command's `--json` prints), never prints or exits, and raises a `StagestoreError`
subclass (stagestore.errors, docs/errors.md) for anything a caller can get wrong.  docs/api.md
has each one's signature and docstring.

    Store                   open or create a store folder
    load_pipeline           read and validate a stagestore.toml
    Pipeline                a pipeline; Pipeline("name").stage(...) builds one, to/from TOML
    check                   validate a pipeline as a run would; its compatibility warnings
    compatibility_warnings  the built-in kinds' warnings; strict=True refuses them
    plan                    what a run would do per stage, and what it would cost
    status, contracts       what would execute now; each stage's contract
    run                     run a pipeline's stages, reusing identical work
    LocalScheduler, DaskScheduler, PoolScheduler
                            where an item run's items run: threads here (the default), a
                            Dask cluster, or any concurrent.futures executor
    ItemScheduler, ItemHost the interface a scheduler implements, and what it is given
    list_runs, show_run     the runs in a store; one run's stages
    show_stage, stage_logs  one stage's manifest; its attempts' stdout and stderr
    failure_report          a run's failure tables
    stage_stats             per stage over the last runs: success rate, durations, retries
    diff_runs               what changed between two runs, and why
    checkout                copy a stage's outputs out of the store
    verify                  re-hash and cross-check everything; report findings
    recover                 remove orphaned temps, complete interrupted runs
    doctor                  the store's health: format, disk, filesystem, locks, temps, records
    gc, forget              drop runs; reclaim unreferenced objects
    add_remote, list_remotes, remove_remote
                            the store's remotes (S3-compatible buckets, or folders)
    push, pull              send runs to a remote; fetch them from one
    remote_runs             the runs a remote holds
    verify_remote           check a remote's manifests, records and objects
    gc_remote               reclaim a remote's unreferenced objects
    schemas, write_schemas  the JSON Schema of every stored record
    StagestoreError         the root of every error stagestore raises on purpose
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "Store": "stagestore.store.store",
    "load_pipeline": "stagestore.pipeline.model",
    "Pipeline": "stagestore.pipeline.model",
    "check": "stagestore.inspection.plan",
    "compatibility_warnings": "stagestore.inspection.plan",
    "plan": "stagestore.inspection.plan",
    "status": "stagestore.inspection.status",
    "contracts": "stagestore.inspection.status",
    "run": "stagestore.execution.runner",
    "ItemScheduler": "stagestore.execution.scheduler",
    "ItemHost": "stagestore.execution.scheduler",
    "LocalScheduler": "stagestore.execution.scheduler",
    "DaskScheduler": "stagestore.execution.dask",
    "PoolScheduler": "stagestore.execution.dask",
    "list_runs": "stagestore.inspection.status",
    "show_run": "stagestore.inspection.status",
    "show_stage": "stagestore.inspection.status",
    "stage_logs": "stagestore.inspection.status",
    "failure_report": "stagestore.inspection.report",
    "stage_stats": "stagestore.inspection.stats",
    "diff_runs": "stagestore.inspection.diff",
    "checkout": "stagestore.inspection.checkout",
    "verify": "stagestore.inspection.verify",
    "recover": "stagestore.inspection.recover",
    "doctor": "stagestore.inspection.doctor",
    "gc": "stagestore.inspection.gc",
    "forget": "stagestore.inspection.gc",
    "add_remote": "stagestore.remote.remotes",
    "list_remotes": "stagestore.remote.remotes",
    "remove_remote": "stagestore.remote.remotes",
    "push": "stagestore.remote.transfer",
    "pull": "stagestore.remote.transfer",
    "remote_runs": "stagestore.remote.transfer",
    "verify_remote": "stagestore.remote.audit",
    "gc_remote": "stagestore.remote.audit",
    "schemas": "stagestore.store.schema",
    "write_schemas": "stagestore.store.schema",
    "StagestoreError": "stagestore.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'stagestore' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
