"""The failure model: every failure gets a class, a category and a domain.

Classes name what went wrong; the blueprint's own (`InfrastructureGateFailure`,
`RecipeParseFailure`, `AdapterConstraintFailure`, `DependencyResolutionFailure`,
`SpecSynthesisFailure`, `BuildFailure`, `ValidationFailure`) and the runner's (a timeout, a
signal, a missing output, ...).  Categories say what to do about it:

* `retryable`: transient; retried with capped exponential backoff while `retries` allow;
* `recoverable`: a fallback (`on_failure`) may help;
* `fatal`: the stage, or the item, stops here (an unknown failure is fatal);
* `validation`: the item's data is bad; the item is skipped and the run goes on; never covered
  by a fallback.

The domain says whose failure it is: `infrastructure` (the pipeline's own machinery) or `build`
(the work being studied).  Only `build` failures are taxonomy-eligible.  docs/failures.md has
the tables and a worked example.
"""

from __future__ import annotations

import re
import signal as _signal
from typing import Any, Literal

Category = Literal["retryable", "recoverable", "fatal", "validation"]
Domain = Literal["infrastructure", "build"]


# The blueprint's classes.
INFRASTRUCTURE_GATE = "InfrastructureGateFailure"
RECIPE_PARSE = "RecipeParseFailure"
ADAPTER_CONSTRAINT = "AdapterConstraintFailure"
DEPENDENCY_RESOLUTION = "DependencyResolutionFailure"
SPEC_SYNTHESIS = "SpecSynthesisFailure"
BUILD_FAILURE = "BuildFailure"
VALIDATION = "ValidationFailure"

# The runner's own classes.
TIMEOUT = "TimeoutFailure"
KILLED = "SignalFailure"
OUTPUT_MISSING = "OutputMissingFailure"
OUTPUT_INVALID = "OutputInvalidFailure"
INPUT_EMPTY = "InputEmptyFailure"
INPUT_MODIFIED = "InputModifiedFailure"
INPUT_MISSING = "InputMissingFailure"
UPSTREAM_MISSING = "UpstreamMissingFailure"
DISK_FULL = "DiskFullFailure"
LAUNCH = "LaunchFailure"
CIRCUIT_OPEN = "CircuitOpenFailure"

# Classes that are the pipeline's machinery whatever stage they happen in: never taxonomy-eligible.
INFRASTRUCTURE_CLASSES = frozenset({
    INFRASTRUCTURE_GATE, RECIPE_PARSE, ADAPTER_CONSTRAINT, DEPENDENCY_RESOLUTION, SPEC_SYNTHESIS,
    INPUT_MISSING, UPSTREAM_MISSING, DISK_FULL, LAUNCH, CIRCUIT_OPEN,
})

# The category each runner class has (a command's own failure is classified by the rules).
RUNNER_CATEGORIES: dict[str, Category] = {
    TIMEOUT: "retryable",
    DISK_FULL: "retryable",
    OUTPUT_MISSING: "fatal",
    OUTPUT_INVALID: "fatal",
    INPUT_EMPTY: "validation",
    INPUT_MODIFIED: "fatal",
    INPUT_MISSING: "fatal",
    UPSTREAM_MISSING: "fatal",
    LAUNCH: "fatal",
    CIRCUIT_OPEN: "fatal",
    VALIDATION: "validation",
}

# A process killed from outside (the OOM killer, an operator, a lost session) may well succeed
# next time; one that crashed on its own (SIGSEGV, SIGABRT, ...) will crash again.
_TRANSIENT_SIGNALS = frozenset({_signal.SIGKILL, _signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP})

CLASS_NAME_RE = re.compile(r"^[A-Z][A-Za-z0-9]*Failure$")

KNOWN_CLASSES = frozenset({
    INFRASTRUCTURE_GATE, RECIPE_PARSE, ADAPTER_CONSTRAINT, DEPENDENCY_RESOLUTION, SPEC_SYNTHESIS,
    BUILD_FAILURE, VALIDATION, *RUNNER_CATEGORIES, KILLED,
})


def killed_from_outside(exit_code: int | None) -> bool:
    return exit_code is not None and exit_code < 0 and -exit_code in _TRANSIENT_SIGNALS


def signal_key(signal: str) -> str:
    """The line that stands for a failure signal when signals are counted: the last non-blank
    line (where most tools print their error), digits of addresses and counters kept."""
    lines = [line.strip() for line in signal.splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:200]


def upgrade_failure(raw: dict[str, Any]) -> dict[str, Any]:
    """A version-1 manifest's failure, given the category and domain its class has now."""
    class_ = raw.get("class", BUILD_FAILURE)
    if class_ == BUILD_FAILURE:
        category = "fatal"
    elif class_ == KILLED:
        category = "retryable" if killed_from_outside(raw.get("exit_code")) else "fatal"
    else:
        category = RUNNER_CATEGORIES.get(class_, "fatal")
    domain = "infrastructure" if class_ in INFRASTRUCTURE_CLASSES else "build"
    return dict(raw, category=category, domain=domain, taxonomy_eligible=domain == "build")
