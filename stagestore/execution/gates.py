"""Quality gates: a stage's `checks`, run on its outputs as they lie in the attempt's `out/`,
before anything is committed.

Built in: `nonempty` (a file with bytes, or a folder holding at least one non-empty file),
`max_bytes` (`limit`: the file's size, or the folder's total), `json` (the file, or every
`*.json` file of a folder, decodes as JSON).  Or a command (`cmd`, with the stage's placeholders
and environment) that must exit 0.  A failed check is a `ValidationFailure`, except a
non-critical one in sampling mode, which becomes a warning recorded in the manifest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from ..model.failures import VALIDATION
from ..model.records import Check, Failure, StageSpec
from ..model.sizes import parse_size
from ..pipeline.syntax import check_command
from ..store import durable
from .processes import StopToken, run_group


class CheckedAttempt(Protocol):
    """What the gates need from an attempt (`executor.Attempt`)."""

    spec: StageSpec
    sampling: bool
    folder: Path
    out_dir: Path
    workdir: Path
    stop: StopToken

    def argv(self, values: dict[str, str], template: list[str] | None = None) -> list[str]: ...

    def environment(self) -> dict[str, str]: ...


def run_checks(attempt: CheckedAttempt, values: dict[str, str],
               tail: callable) -> tuple[Failure | None, list[str]]:  # type: ignore[valid-type]
    """(the ValidationFailure of the first failed enforced check, warnings of the others)."""
    warnings: list[str] = []
    for index, check in enumerate(attempt.spec.checks):
        if check.cmd is not None:
            problem = _check_command(attempt, index, check, values, tail)
        else:
            problem = builtin_check(check, attempt.spec.outputs, attempt.out_dir)
        if problem is None:
            continue
        if attempt.sampling and not check.critical:
            warnings.append(problem)
        else:
            return Failure(class_=VALIDATION, signal=problem), warnings
    return None, warnings


def builtin_check(check: Check, outputs: list[str], out_dir: Path) -> str | None:
    """What is wrong with the outputs for one built-in check, or None."""
    for name in [check.output] if check.output else outputs:
        path = out_dir / name
        what = f"check {check.check!r} on output {name!r}"
        if not os.path.lexists(path):
            return None  # reported as OutputMissingFailure by the commit
        files = _files_under(path)
        if check.check == "nonempty" and not any(os.path.getsize(f) for f in files):
            return f"{what}: " + ("the file is empty" if path.is_file()
                                  else "the folder holds no non-empty file")
        if check.check == "max_bytes":
            limit = parse_size(check.limit or 0)
            total = sum(os.path.getsize(f) for f in files)
            if total > limit:
                return f"{what}: {total} bytes, over the limit of {limit}"
        if check.check == "json":
            import msgspec

            for file in files if path.is_file() else [f for f in files if f.suffix == ".json"]:
                try:
                    msgspec.json.decode(file.read_bytes())
                except msgspec.DecodeError as exc:
                    where = name if file == path else f"{name}/{file.relative_to(path)}"
                    return f"{what}: {where} is not valid JSON: {exc}"
    return None


def _check_command(attempt: CheckedAttempt, index: int, check: Check, values: dict[str, str],
                   tail) -> str | None:  # noqa: ANN001
    argv = attempt.argv(values, check_command(check))
    stderr_path = attempt.folder / f"check-{index}.stderr"
    # A temp of the attempt folder, created like the stage's own stdout and stderr: through the
    # seam (so a fault hook sees it), exclusively, never fsynced (gone with the attempt).
    with os.fdopen(durable.create_exclusive(stderr_path), "wb") as err:
        try:
            code = run_group(argv, cwd=attempt.workdir, env=attempt.environment(), stdout=err,
                             stderr=err, timeout=attempt.spec.timeout, stop=attempt.stop)
        except OSError as exc:
            return f"check {index} cannot start {argv[0]!r}: {exc.strerror}"
    if code == 0:
        return None
    text = tail(stderr_path)
    ended = "timed out" if code is None else f"exited with code {code}"
    return f"check command `{' '.join(argv)[:200]}` {ended}" + (f": {text}" if text else "")


def _files_under(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    return sorted(Path(root) / name for root, _, names in os.walk(path) for name in names)
