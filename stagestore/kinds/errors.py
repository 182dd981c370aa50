"""The errors of the built-in stage kinds.

`KindError` is a `StagestoreError` and a `ValueError`: bad options, an unreadable or unsuitable
input, a bad key.  `ValidationFailureError` and its subclasses mean the input failed the check
the kind exists for (a checksum mismatch, a stream that does not decrypt); the child entry point
(`stagestore.execution.kindstage`) gives the two families different exit codes.
"""

from __future__ import annotations

from ..errors import StagestoreError


class KindError(StagestoreError, ValueError):
    """A built-in stage kind cannot run or failed: bad options, input, key or user function."""


class ValidationFailureError(KindError):
    """The input failed the check the kind exists for (a checksum or a decryption)."""


class ChecksumMismatchError(ValidationFailureError):
    """Computed sums differ from the `expect` sums file: files differ, are missing or extra."""

    def __init__(self, message: str, *, differ: list[str], missing: list[str],
                 extra: list[str]) -> None:
        super().__init__(message)
        self.differ = differ
        self.missing = missing
        self.extra = extra


class DecryptionError(ValidationFailureError):
    """An encrypted stream does not authenticate: wrong key, tampered, truncated or reordered."""

    def __init__(self, message: str, *, chunk: int | None = None) -> None:
        super().__init__(message)
        self.chunk = chunk
