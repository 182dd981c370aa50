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
    "Store": "stagestore.store",
    "load_pipeline": "stagestore.pipeline",
    "Pipeline": "stagestore.pipeline",
    "run": "stagestore.runner",
    "verify": "stagestore.verification",
    "recover": "stagestore.recovery",
    "diff_runs": "stagestore.diff",
    "gc": "stagestore.reclaim",
    "forget": "stagestore.reclaim",
    "checkout": "stagestore.checkouts",
    "status": "stagestore.inspect",
    "contracts": "stagestore.inspect",
    "list_runs": "stagestore.inspect",
    "show_run": "stagestore.inspect",
    "show_stage": "stagestore.inspect",
    "stage_logs": "stagestore.inspect",
    "StagestoreError": "stagestore.errors",
    "doctor": "stagestore.health",
    "stage_stats": "stagestore.stats",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'stagestore' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
