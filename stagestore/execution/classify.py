"""Classifying a failure: a stage's `classify` rules, and the runner's own classes.

The classes, categories and domains themselves are the failure model's vocabulary
(`model/failures.py`, docs/failures.md); this applies them to one failure of one stage.
"""

from __future__ import annotations

import re

import msgspec

from ..model.failures import (BUILD_FAILURE, INFRASTRUCTURE_CLASSES, INFRASTRUCTURE_GATE, KILLED,
                              RUNNER_CATEGORIES, Category, killed_from_outside)
from ..model.records import ClassifyRule, Failure, StageSpec


def default_class(spec: StageSpec) -> str:
    """The class of an unmatched command failure: the stage's domain decides."""
    return INFRASTRUCTURE_GATE if spec.domain == "infrastructure" else BUILD_FAILURE


def rule_matches(rule: ClassifyRule, exit_code: int | None, stderr: str) -> bool:
    if rule.exit_code is not None and rule.exit_code != exit_code:
        return False
    if rule.match is not None and re.search(rule.match, stderr, re.MULTILINE) is None:
        return False
    return True


def classify(spec: StageSpec, failure: Failure, stderr: str = "") -> Failure:
    """Give a raw failure (class and signal from the executor) its final class, category and
    domain.  A command that exited non-zero or was killed by a signal is matched against the
    stage's `classify` rules, first match winning; the runner's own failures keep their class."""
    class_ = failure.class_
    category: Category
    rule_index: int | None = None
    if class_ in (BUILD_FAILURE, KILLED):
        for index, rule in enumerate(spec.classify):
            if rule_matches(rule, failure.exit_code, stderr):
                class_, category, rule_index = rule.class_, rule.category, index
                break
        else:
            if class_ == KILLED:
                category = "retryable" if killed_from_outside(failure.exit_code) else "fatal"
            else:
                class_, category = default_class(spec), "fatal"
    else:
        category = RUNNER_CATEGORIES.get(class_, "fatal")
    domain = "infrastructure" if (spec.domain == "infrastructure"
                                  or class_ in INFRASTRUCTURE_CLASSES) else "build"
    return msgspec.structs.replace(failure, class_=class_, category=category, domain=domain,
                                   taxonomy_eligible=domain == "build", rule=rule_index)


def runner_failure(spec: StageSpec, class_: str, signal: str) -> Failure:
    """A failure the runner itself decides on (preflight, an open circuit, a missing upstream)."""
    return classify(spec, Failure(class_=class_, signal=signal))
