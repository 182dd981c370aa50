"""The exception tree, and the exit codes.

Every error a user can cause is a `StagestoreError` subclass.  Each class carries the exit code
the CLI uses and a hint (what to do), which a raise site may make more precise; the message
itself says what went wrong and where.  The CLI maps these to `error: ...` plus a `hint: ...`
line (with `--json`, one JSON object on stderr); anything else is an internal error and is
printed with its traceback.  docs/errors.md is generated from this module (`make docs`).
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Every exit code of `stagestore`; `meaning` says when each is used."""

    OK = 0
    FAILED = 1
    USAGE = 2
    SYSTEMIC = 3
    DEGRADED = 4
    INTERNAL = 70  # EX_SOFTWARE
    SIGHUP = 129  # 128 + the signal's number, as a shell reports it
    SIGINT = 130
    SIGTERM = 143

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]


_MEANINGS = {
    ExitCode.OK: "success",
    ExitCode.FAILED: "a stage or item failed; verify, doctor or a push found a problem; or the "
                     "store or a remote could not be used",
    ExitCode.USAGE: "a usage error: the command line, the pipeline file, a missing store, a "
                    "checkout target in the way, missing S3 credentials",
    ExitCode.SYSTEMIC: "`run`: a systemic failure aborted the run (sampling mode)",
    ExitCode.DEGRADED: "`run`: the run completed degraded (a fallback was used)",
    ExitCode.INTERNAL: "a bug in stagestore; the traceback is printed",
    ExitCode.SIGHUP: "stopped by SIGHUP; `stagestore recover` completes the run",
    ExitCode.SIGINT: "interrupted (Ctrl-C, SIGINT); `stagestore recover` completes the run",
    ExitCode.SIGTERM: "stopped by SIGTERM; `stagestore recover` completes the run",
}


# The names code used before the enum; they are the enum's members.
EXIT_OK = ExitCode.OK
EXIT_FAILED = ExitCode.FAILED
EXIT_USAGE = ExitCode.USAGE
EXIT_INTERNAL = ExitCode.INTERNAL


class StagestoreError(Exception):
    """Root of every error stagestore raises on purpose."""

    exit_code = ExitCode.FAILED
    hint: str | None = None  # the CLI says how to see the traceback (`cli.cli_hint`)

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class UsageError(StagestoreError):
    """The command line asks for something that does not exist or makes no sense."""

    exit_code = ExitCode.USAGE
    hint = None  # the CLI points at the command's --help


class ItemsNeededError(UsageError):
    """A stage of the run runs once per item, and the run was given no items."""

    hint = "give the run its list of items"


class PipelineError(StagestoreError):
    """The pipeline file is invalid: syntax, types, unknown keys, cycles, names or paths."""

    exit_code = ExitCode.USAGE
    hint = "fix the pipeline file; `stagestore check` validates it without running anything"

    def __init__(self, message: str, *, path: str | None = None, stage: str | None = None,
                 key: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = path
        self.stage = stage
        self.key = key


class InvalidNameError(StagestoreError, ValueError):
    """A name that would become a path is not a plain name (empty, `/`, `..`, NUL, ...)."""

    exit_code = ExitCode.USAGE
    hint = "use letters, digits, '.', '_' and '-', starting with a letter or digit"


class StoreError(StagestoreError):
    """The store cannot be used: unreadable, of an unknown format, or damaged."""

    hint = "`stagestore doctor` checks the store; `stagestore verify` finds damage"


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store exists where a command that reads one looked (nothing has run there yet)."""

    exit_code = ExitCode.USAGE
    hint = "run a pipeline first, or open the store by its folder (or set STAGESTORE_STORE)"


class StoreNeedsRecoverError(StoreError):
    """The machine stopped (a power loss, a crash, a reboot) while a run had writes that were
    not yet durable: the newest objects may be damaged, and only `recover`, which re-hashes
    every object, may use the store until it has checked them."""

    hint = "run `stagestore recover`: it re-hashes every object and removes the damaged ones"


class FormatVersionError(StoreError):
    """A record or store was written by a newer stagestore than this one."""

    hint = "upgrade stagestore"


class CorruptRecordError(StoreError):
    """A record in the store does not decode against its schema."""

    hint = "`stagestore verify` names what is damaged; `stagestore recover` repairs it"

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = path


class ObjectMissingError(StoreError, FileNotFoundError):
    """An object a record names is not in the store."""

    hint = "run `stagestore verify` to see what is damaged"

    def __init__(self, digest: str) -> None:
        super().__init__(f"object {digest} is missing from the store")
        self.digest = digest


class ObjectDamagedError(StoreError):
    """An object's bytes do not hash to its name (found while reading or receiving it)."""


class RemoteError(StoreError):
    """A remote store could not be reached, refused a request, or holds something unexpected."""

    hint = "`stagestore remote list` shows the remote's settings (docs/remote.md)"


class RemoteNotFound(RemoteError, FileNotFoundError):
    """A key the remote was asked for does not exist there."""


class CredentialsError(RemoteError):
    """No credentials for an S3 remote were found in the environment or a shared credentials
    file, and using the instance metadata service was not asked for."""

    exit_code = ExitCode.USAGE
    hint = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE to a profile of "
            "the shared credentials file; on a cloud instance, "
            "STAGESTORE_S3_INSTANCE_CREDENTIALS=1 uses its role (docs/remote.md)")


class RunNotFoundError(UsageError):
    """The named run does not exist in the store."""

    hint = "`stagestore runs` lists the runs in the store"


class StageNotFoundError(UsageError):
    """The named stage does not exist in the pipeline or run."""

    hint = "`stagestore contracts` lists the pipeline's stages"


class RunBusyError(StagestoreError):
    """Another live process holds the run (or the store) this command needs."""

    hint = "wait for the other stagestore process to finish, then try again"


class OutputError(StagestoreError):
    """A stage's output cannot be stored as it is (a symlink, a device, ...)."""

    hint = "make the stage write only regular files and folders"


class CheckoutError(StagestoreError):
    """A checkout target is unsafe or already exists."""

    exit_code = ExitCode.USAGE
    hint = "check out into an empty folder, or remove what is in the way"


class RunInterrupted(StagestoreError):
    """A signal stopped the run: the stages that were running were killed and are not
    recorded.  Exit code 128 + the signal's number, as a shell reports a process it killed."""

    hint = "`stagestore recover` completes an interrupted run"

    def __init__(self, message: str, *, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
