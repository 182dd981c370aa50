"""What a built-in stage kind is asked to do: the kinds, their algorithms and params, and checks.

`validate` returns every problem with a kind's settings, one line each, so the pipeline loader
can report them all at once; `with_defaults` fills in the default algorithm and params, which is
what belongs in a stage's config hash.  docs/kinds.md lists the same tables for users.
"""

from __future__ import annotations

import os
import re
from typing import Any

import msgspec

from .errors import KindError

KINDS = ("checksum", "compress", "decompress", "encrypt", "decrypt", "transform", "passthrough")

KiB = 2 ** 10
MiB = 2 ** 20
DEFAULT_CHUNK_SIZE = 4 * MiB
MIN_CHUNK_SIZE = KiB
MAX_CHUNK_SIZE = 100 * MiB
MAX_WORKERS = 64
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)

CHECKSUM_ALGORITHMS = ("blake3", "sha256", "sha512")
COMPRESSION_ALGORITHMS = ("zstd", "gzip", "bz2", "xz")
ENCRYPTION_ALGORITHMS = ("aes-256-gcm", "chacha20-poly1305")

ALGORITHMS: dict[str, tuple[str, ...]] = {
    "checksum": CHECKSUM_ALGORITHMS,
    "compress": COMPRESSION_ALGORITHMS,
    "decompress": COMPRESSION_ALGORITHMS,
    "encrypt": ENCRYPTION_ALGORITHMS,
    "decrypt": ENCRYPTION_ALGORITHMS,
    "transform": (),
    "passthrough": (),
}
# decompress and decrypt have no default: they read the algorithm from the input itself.
DEFAULT_ALGORITHMS = {"checksum": "blake3", "compress": "zstd", "encrypt": "aes-256-gcm"}

# Params of each compression algorithm: name -> (lowest, highest, default).  No other kind or
# algorithm takes params.
COMPRESSION_PARAMS: dict[str, dict[str, tuple[int, int, int]]] = {
    "zstd": {"level": (1, 22, 3)},
    "gzip": {"level": (1, 9, 6)},
    "bz2": {"level": (1, 9, 9)},
    "xz": {"preset": (0, 9, 6)},
}

_CALL_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


class KindOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The settings of one built-in stage, as the pipeline file gives them (minus the key).

    `algorithm` None means the kind's default (or, for decompress and decrypt, whatever the
    input says).  `params` holds only the keys the algorithm knows.  `workers` is used only when
    `parallel` is true.  `call` is for transform, `expect` (a sums file, relative to the
    workdir) for checksum.
    """

    kind: str
    algorithm: str | None = None
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    chunk_size: int = DEFAULT_CHUNK_SIZE
    parallel: bool = True
    workers: int = DEFAULT_WORKERS
    call: str | None = None
    expect: str | None = None

    @property
    def threads(self) -> int:
        """How many threads the kind may use: `workers` when parallel, else 1."""
        return self.workers if self.parallel else 1


class KindStats(msgspec.Struct, frozen=True, kw_only=True):
    """What one run of a kind did: bytes read and written, wall time, the process's peak RSS.

    `bytes_in` and `bytes_out` count file contents (for a folder, the sum over its files), not
    tar framing.  `peak_rss_bytes` is the peak of the whole process, not of this call alone.
    """

    bytes_in: int
    bytes_out: int
    seconds: float
    peak_rss_bytes: int


def parse_chunk_size(value: int | str) -> int:
    """Bytes from `4194304`, `"4MiB"` or `"4MB"` (KiB/MiB: 1024-based, KB/MB: 1000-based).

    Raises `KindError` unless the result is from 1 KiB to 100 MiB inclusive.
    """
    from ..model.sizes import parse_size

    try:
        size = parse_size(value)
    except ValueError as exc:
        raise KindError(f"chunk_size: {exc}") from None
    if not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
        raise KindError(f"chunk_size must be from 1 KiB ({MIN_CHUNK_SIZE} bytes) to 100 MiB "
                        f"({MAX_CHUNK_SIZE} bytes); got {value!r} ({size} bytes)")
    return size


def validate(kind: str, algorithm: str | None = None, params: dict[str, Any] | None = None, *,
             chunk_size: int | str = DEFAULT_CHUNK_SIZE, workers: int = DEFAULT_WORKERS,
             call: str | None = None, expect: str | None = None, key_env: str | None = None,
             key_file: str | None = None) -> list[str]:
    """Every problem with a built-in stage's settings, one line each; empty when they are valid.

    Checks the kind, its algorithm, the algorithm's params and their ranges, the chunk size and
    worker count, and that `call`, `expect` and the key source are given where they are needed
    and nowhere else.  It reads no file and no environment variable.
    """
    if kind not in KINDS:
        return [f"unknown kind {kind!r} (known: {', '.join(KINDS)})"]
    problems = option_problems(kind, algorithm, params, chunk_size=chunk_size, workers=workers,
                               call=call, expect=expect)
    problems += _key_source_problems(kind, key_env, key_file)
    return problems


def option_problems(kind: str, algorithm: str | None, params: dict[str, Any] | None, *,
                    chunk_size: int | str, workers: int, call: str | None,
                    expect: str | None) -> list[str]:
    """`validate` without the key source: what `run_kind` checks before it starts."""
    problems = _algorithm_problems(kind, algorithm)
    if not problems:
        problems += _params_problems(kind, algorithm or DEFAULT_ALGORITHMS.get(kind), params)
    try:
        parse_chunk_size(chunk_size)
    except KindError as exc:
        problems.append(exc.message)
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        problems.append(f"workers must be an integer from 1 to {MAX_WORKERS}; got {workers!r}")
    problems += _only_for("call", call, "transform", kind)
    problems += _only_for("expect", expect, "checksum", kind)
    if kind == "transform":
        problems += _call_problems(call)
    return problems


def with_defaults(opts: KindOptions) -> KindOptions:
    """Valid `opts` as they run: the default algorithm and every default param filled in, and
    the chunk size in bytes.  This is what belongs in a stage's config hash."""
    algorithm = opts.algorithm or DEFAULT_ALGORITHMS.get(opts.kind)
    params = dict(opts.params)
    if opts.kind == "compress":
        for name, (_, _, default) in COMPRESSION_PARAMS[algorithm].items():
            params.setdefault(name, default)
    return msgspec.structs.replace(opts, algorithm=algorithm, params=params,
                                   chunk_size=parse_chunk_size(opts.chunk_size))


def _algorithm_problems(kind: str, algorithm: str | None) -> list[str]:
    known = ALGORITHMS[kind]
    if algorithm is None or algorithm in known:
        return []
    if not known:
        return [f"{kind} takes no algorithm; got {algorithm!r}"]
    return [f"unknown algorithm {algorithm!r} for {kind} (known: {', '.join(known)})"]


def _params_problems(kind: str, algorithm: str | None, params: dict[str, Any] | None) -> list[str]:
    if params is None:
        return []
    if not isinstance(params, dict):
        return [f"params must be a table; got {params!r}"]
    valid = COMPRESSION_PARAMS.get(algorithm, {}) if kind == "compress" else {}
    if not valid:
        what = f"{kind} with {algorithm}" if algorithm else kind
        return [f"{what} takes no params; got {', '.join(sorted(params))}"] if params else []
    problems = []
    for name, value in sorted(params.items()):
        if name not in valid:
            problems.append(f"unknown param {name!r} for {algorithm} (valid: {', '.join(valid)})")
            continue
        low, high, _ = valid[name]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            problems.append(f"{algorithm} {name} must be an integer from {low} to {high}; "
                            f"got {value!r}")
    return problems


def _only_for(key: str, value: object, owner: str, kind: str) -> list[str]:
    if kind != owner and value is not None:
        return [f"{key} is only for {owner} stages, not {kind}"]
    return []


def _call_problems(call: object) -> list[str]:
    if call is None:
        return ['transform needs call = "module:function"']
    if not isinstance(call, str) or not _CALL_RE.fullmatch(call):
        return [f'call must be "module:function"; got {call!r}']
    return []


def _key_source_problems(kind: str, key_env: str | None, key_file: str | None) -> list[str]:
    needs_key = kind in ("encrypt", "decrypt")
    given = [name for name, value in (("key_env", key_env), ("key_file", key_file))
             if value is not None]
    if not needs_key:
        return [f"{name} is only for encrypt and decrypt stages, not {kind}" for name in given]
    if not given:
        return [f"{kind} needs a key: set key_env (an environment variable) or key_file"]
    if len(given) == 2:
        return [f"{kind} takes one key source: set key_env or key_file, not both"]
    return []
