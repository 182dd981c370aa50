"""stagestore: a content-addressed, crash-safe artifact store for pipelines of stages.

The public API (imported lazily, so `import stagestore` and `stagestore --help` stay fast):

    Store               open or create a store folder
    load_pipeline       read and validate a stagestore.toml
    Pipeline            a pipeline; Pipeline("name").stage(...) builds one, to/from TOML
    run                 run a pipeline's stages, reusing identical work
    verify              re-hash and cross-check everything; report findings
    recover             remove orphaned temps, complete interrupted runs
    diff_runs           what changed between two runs, and why
    gc, forget          drop runs; reclaim unreferenced objects
    checkout            copy a stage's outputs out of the store
    status, contracts   what would execute now; each stage's contract
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "Store": "stagestore.store.store",
    "load_pipeline": "stagestore.pipeline.model",
    "Pipeline": "stagestore.pipeline.model",
    "run": "stagestore.execution.runner",
    "verify": "stagestore.inspection.verify",
    "recover": "stagestore.inspection.recover",
    "diff_runs": "stagestore.inspection.diff",
    "gc": "stagestore.inspection.gc",
    "forget": "stagestore.inspection.gc",
    "checkout": "stagestore.inspection.checkout",
    "status": "stagestore.inspection.status",
    "contracts": "stagestore.inspection.status",
    "list_runs": "stagestore.inspection.status",
    "show_run": "stagestore.inspection.status",
    "show_stage": "stagestore.inspection.status",
    "stage_logs": "stagestore.inspection.status",
    "StagestoreError": "stagestore.errors",
    "doctor": "stagestore.inspection.doctor",
    "stage_stats": "stagestore.inspection.stats",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'stagestore' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
