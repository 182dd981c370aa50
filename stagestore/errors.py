"""The exception tree.

Every error a user can cause is a `StagestoreError` subclass.  Each class carries the exit code
the CLI uses and an optional hint (what to do); the message itself says what went wrong and
where.  The CLI maps these to `error: ...` plus a `hint: ...` line; anything else is an internal
error and is printed with its traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # a stage failed, or verify found a problem
EXIT_USAGE = 2  # a usage or pipeline error
EXIT_INTERNAL = 70  # a bug in stagestore (EX_SOFTWARE)


class StagestoreError(Exception):
    """Root of every error stagestore raises on purpose."""

    exit_code = EXIT_FAILED
    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class UsageError(StagestoreError):
    """The command line asks for something that does not exist or makes no sense."""

    exit_code = EXIT_USAGE


class PipelineError(StagestoreError):
    """The pipeline file is invalid: syntax, types, unknown keys, cycles, names or paths."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, *, path: str | None = None, stage: str | None = None,
                 key: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = path
        self.stage = stage
        self.key = key


class InvalidNameError(StagestoreError, ValueError):
    """A name that would become a path is not a plain name (empty, `/`, `..`, NUL, ...)."""

    exit_code = EXIT_USAGE


class StoreError(StagestoreError):
    """The store cannot be used: missing, unreadable, of an unknown format."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store exists where one was expected."""


class FormatVersionError(StoreError):
    """A record or store was written by a newer stagestore than this one."""


class CorruptRecordError(StoreError):
    """A record in the store does not decode against its schema."""

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = path


class ObjectMissingError(StoreError, FileNotFoundError):
    """An object a record names is not in the store."""

    def __init__(self, digest: str) -> None:
        super().__init__(f"object {digest} is missing from the store",
                         hint="run `stagestore verify` to see what is damaged")
        self.digest = digest


class ObjectDamagedError(StoreError):
    """An object's bytes do not hash to its name (found while reading or receiving it)."""


class RunNotFoundError(UsageError):
    """The named run does not exist in the store."""


class StageNotFoundError(UsageError):
    """The named stage does not exist in the pipeline or run."""


class RunBusyError(StagestoreError):
    """Another live process holds the run (or the store) this command needs."""


class OutputError(StagestoreError):
    """A stage's output cannot be stored as it is (a symlink, a device, ...)."""


class CheckoutError(StagestoreError):
    """A checkout target is unsafe or already exists."""


class RunInterrupted(StagestoreError):
    """A signal stopped the run: the stages that were running were killed and are not
    recorded.  Exit code 128 + the signal's number, as a shell reports a process it killed."""

    hint = "`stagestore recover` completes an interrupted run"

    def __init__(self, message: str, *, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
