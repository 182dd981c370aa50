"""The small interface a remote store is kept behind, and its two implementations.

`Storage` is a flat key space of immutable-by-convention blobs with what push, pull, verify
and gc need: read (whole or in chunks), write (atomic, last writer wins; from bytes or a file),
create (atomic and create-only: the commit point of a manifest), list (by prefix, in pages),
stat and delete.

- `S3Storage`: an S3-compatible bucket and prefix, through obstore (docs/dependencies.md).
  Create-only writes are `PUT` with `If-None-Match: *`; whether a server honours that is
  checked by the capability probe (`remotes.probe`), since some silently overwrite.
- `FileStorage`: a folder (`file:///path`), for a remote on a shared or mounted filesystem and
  for tests that need no server.  Create-only is `link(2)` of a synced temp, which fails when
  the name exists.

Both pass the same conformance tests (`tests/test_storage.py`).  Keys are `/`-separated
relative names made of the characters stagestore's own names use; no key ever starts with `/`
or contains `..`.
"""

from __future__ import annotations

import abc
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec

# RemoteError and RemoteNotFound live in errors.py with every other error; they are imported
# here, where remote code has always found them.
from ..errors import CredentialsError, RemoteError, RemoteNotFound, UsageError

_T = TypeVar("_T")

# obstore uploads a `Path` or an iterator in parts of this size when it is larger; the same
# size is used for streamed reads.
PART_SIZE = 8 << 20
# Parts of a multipart upload: obstore's defaults (5 MiB, 12 in flight per object), which were
# faster against SeaweedFS than 8 MiB parts 4 at a time (benchmarks, scenario 13).
UPLOAD_PART_SIZE = 5 << 20
_KEY_RE = re.compile(r"[A-Za-z0-9._%~-]+(/[A-Za-z0-9._%~-]+)*")
# A `409 ConditionalRequestConflict` (another conditional write to the same key is in flight)
# is retried this many times, with backoff, before it is reported.
CONFLICT_RETRIES = 6


class BlobInfo(msgspec.Struct, frozen=True):
    """One listed key: its size and last-modified time (seconds since the epoch)."""

    key: str
    size: int
    modified: float


def check_key(key: str) -> str:
    if not _KEY_RE.fullmatch(key) or any(part in (".", "..") for part in key.split("/")):
        raise ValueError(f"invalid remote key {key!r}")
    return key


class Storage(abc.ABC):
    """A flat namespace of blobs under one URL."""

    url: str

    def where(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{key}"

    @abc.abstractmethod
    def read(self, key: str) -> bytes:
        """The whole blob; `RemoteNotFound` when there is none."""

    @abc.abstractmethod
    def read_chunks(self, key: str) -> Iterator[bytes]:
        """The blob in chunks of about `PART_SIZE` (the request is made before the first
        chunk is returned); `RemoteNotFound` when there is none."""

    @abc.abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Store `data` under `key` atomically, replacing what is there."""

    @abc.abstractmethod
    def write_file(self, key: str, path: Path, size: int) -> None:
        """Store a local file's bytes under `key` atomically (in parts when it is large)."""

    @abc.abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Store `data` only if `key` does not exist: True if this call created it, False if
        the key was already there (its content is then left as it is)."""

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[list[BlobInfo]]:
        """Every key under `prefix` (a folder-like prefix ending in `/`, or "" for all), in
        pages (a page is one list request on S3)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; no error when it does not exist."""

    @abc.abstractmethod
    def stat(self, key: str) -> BlobInfo | None:
        """The key's size and last-modified time, or None when it does not exist."""


# --- a folder ---


class FileStorage(Storage):
    """Blobs as files under a folder; temps in `<root>/.tmp/`, renamed or linked into place,
    every change through `durable`, the store's own seam (docs/remote.md)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.url = "file://" + str(self.root)
        self._tmp = self.root / ".tmp"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _fail(self, action: str, key: str, exc: OSError) -> RemoteError:
        return RemoteError(f"cannot {action} {self.where(key)}: {exc.strerror or exc}")

    def read(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise RemoteNotFound(f"{self.where(key)} does not exist") from None
        except OSError as exc:
            raise self._fail("read", key, exc) from None

    def read_chunks(self, key: str) -> Iterator[bytes]:
        try:
            handle = open(self._path(key), "rb")  # noqa: SIM115 (closed by the generator)
        except FileNotFoundError:
            raise RemoteNotFound(f"{self.where(key)} does not exist") from None
        except OSError as exc:
            raise self._fail("read", key, exc) from None

        def chunks() -> Iterator[bytes]:
            with handle:
                while chunk := handle.read(PART_SIZE):
                    yield chunk
        return chunks()

    # The temps are in `.tmp/`, on the remote's filesystem whatever filesystem the files sent
    # are on, so that a rename or link(2) of one into place is atomic.

    def _target(self, key: str) -> tuple[Path, Path]:
        """The key's path, its folder made durable, and a fresh temp name beside it."""
        from ..store import durable

        target = self._path(key)
        durable.makedirs(self._tmp)
        durable.makedirs(target.parent)
        return target, self._tmp / f"{os.getpid()}-{os.urandom(8).hex()}"

    def write(self, key: str, data: bytes) -> None:
        from ..store import durable

        try:
            target, tmp = self._target(key)
            durable.write_file_atomic(target, data, tmp)
        except OSError as exc:
            raise self._fail("write", key, exc) from None

    def write_file(self, key: str, path: Path, size: int) -> None:
        from ..store import durable

        try:
            target, tmp = self._target(key)
            durable.copy_file_atomic(path, target, tmp)
        except OSError as exc:
            raise self._fail("write", key, exc) from None

    def create(self, key: str, data: bytes) -> bool:
        from ..store import durable

        try:
            target, tmp = self._target(key)
            return durable.write_file_create_only(target, data, tmp)
        except OSError as exc:
            raise self._fail("write", key, exc) from None

    def list(self, prefix: str) -> Iterator[list[BlobInfo]]:
        start = self.root / prefix.rstrip("/") if prefix else self.root
        page: list[BlobInfo] = []
        for folder, dirs, files in os.walk(start):
            if folder == str(self.root):
                dirs[:] = [d for d in dirs if d != ".tmp"]
            dirs.sort()
            rel = os.path.relpath(folder, self.root)
            for name in sorted(files):
                key = name if rel == "." else f"{rel}/{name}"
                try:
                    st = os.stat(os.path.join(folder, name))
                except FileNotFoundError:
                    continue
                page.append(BlobInfo(key=key, size=st.st_size, modified=st.st_mtime))
                if len(page) == 1000:
                    yield page
                    page = []
        if page:
            yield page

    def delete(self, key: str) -> None:
        from ..store import durable

        path = self._path(key)
        try:
            if durable.unlink(path):
                durable.fsync_dir(path.parent)
        except OSError as exc:
            raise self._fail("delete", key, exc) from None

    def stat(self, key: str) -> BlobInfo | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        return BlobInfo(key=key, size=st.st_size, modified=st.st_mtime)


# --- an S3-compatible bucket, through obstore ---


class S3Storage(Storage):
    """`s3://BUCKET/PREFIX`, with an optional endpoint (any S3-compatible server) and region.

    Credentials are never passed in or stored: obstore reads the standard `AWS_*` environment
    variables; when `AWS_ACCESS_KEY_ID` is not set, the profile named by `AWS_PROFILE` (or
    `default`) is read from the shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`, or
    `~/.aws/credentials`) into memory.  When neither has keys, and no other source obstore
    knows is configured, `CredentialsError` is raised here: obstore would otherwise ask the
    instance metadata service (169.254.169.254), which off a cloud instance fails later with a
    message about that service.  `STAGESTORE_S3_INSTANCE_CREDENTIALS=1` lets it.
    """

    def __init__(self, url: str, *, endpoint: str | None = None, region: str | None = None,
                 concurrency: int = 8) -> None:
        from obstore.store import S3Store

        bucket, prefix = parse_s3_url(url)
        self.url = url
        self.endpoint = endpoint
        self.concurrency = concurrency
        config: dict[str, Any] = {}
        if endpoint:
            config["endpoint"] = endpoint
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        config["region"] = region or "us-east-1"
        config.update(_credentials(url))
        client: dict[str, Any] = {"connect_timeout": "10s", "timeout": "300s"}
        if endpoint and endpoint.startswith("http://"):
            client["allow_http"] = True
        try:
            self._store = S3Store(bucket, prefix=prefix or None, config=config,
                                  client_options=client)
        except Exception as exc:  # obstore's configuration errors
            raise RemoteError(f"cannot configure {url}: {_reason(exc)}") from None

    def _call(self, action: str, key: str, fn: Callable[[], _T]) -> _T:
        import obstore.exceptions as oe

        try:
            return fn()
        except (oe.NotFoundError, FileNotFoundError):  # obstore raises either
            raise RemoteNotFound(f"{self.where(key)} does not exist") from None
        except (oe.UnauthenticatedError, oe.PermissionDeniedError, PermissionError) as exc:
            raise RemoteError(
                f"cannot {action} {self.where(key)}: access denied ({_reason(exc)})",
                hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) to "
                     "credentials that may read and write this bucket") from None
        except (oe.BaseError, OSError) as exc:
            raise RemoteError(f"cannot {action} {self.where(key)}: {_reason(exc)}",
                              hint=self._hint(exc)) from None

    def _hint(self, exc: BaseException) -> str | None:
        text = str(exc)
        if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
            return "create the bucket first, or fix the remote's URL (`stagestore remote list`)"
        if "connect" in text.lower() or "dns" in text.lower():
            return (f"check that the endpoint {self.endpoint or '(AWS default)'} is reachable "
                    "(`stagestore remote list` shows it)")
        return None

    def read(self, key: str) -> bytes:
        import obstore

        return self._call("read", key, lambda: bytes(obstore.get(self._store, key).bytes()))

    def read_chunks(self, key: str) -> Iterator[bytes]:
        import obstore

        result = self._call("read", key, lambda: obstore.get(self._store, key))
        stream = result.stream(min_chunk_size=PART_SIZE)

        def chunks() -> Iterator[bytes]:
            iterator = iter(stream)
            while True:
                chunk = self._call("read", key, lambda: next(iterator, None))
                if chunk is None:
                    return
                yield chunk  # type: ignore[misc]
        return chunks()

    def write(self, key: str, data: bytes) -> None:
        import obstore

        self._call("write", key, lambda: obstore.put(self._store, check_key(key), data,
                                                     use_multipart=False))

    def write_file(self, key: str, path: Path, size: int) -> None:
        import obstore

        self._call("write", key, lambda: obstore.put(
            self._store, check_key(key), path, use_multipart=size > PART_SIZE,
            chunk_size=UPLOAD_PART_SIZE, max_concurrency=12))

    def create(self, key: str, data: bytes) -> bool:
        import obstore

        check_key(key)
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                self._call("create", key, lambda: _put_create(obstore, self._store, key, data))
                return True
            except _AlreadyThere:
                # obstore reports a `409 ConditionalRequestConflict` (another conditional write
                # to the key is in flight) as AlreadyExistsError too: only a key that is really
                # there means "already exists".
                if self.stat(key) is not None:
                    return False
            except RemoteError as exc:
                if not _is_conflict(exc.message):
                    raise
            if attempt < CONFLICT_RETRIES:
                time.sleep(0.05 * 2 ** attempt)
        raise RemoteError(f"cannot create {self.where(key)}: the server kept answering 409 "
                          f"ConditionalRequestConflict ({CONFLICT_RETRIES + 1} tries)",
                          hint="another writer of the same key is stuck; try again later")

    def list(self, prefix: str) -> Iterator[list[BlobInfo]]:
        import obstore

        stream = self._call("list", prefix or "/", lambda: obstore.list(
            self._store, prefix=prefix.rstrip("/") or None, chunk_size=1000))
        iterator = iter(stream)
        while True:
            page = self._call("list", prefix or "/", lambda: next(iterator, None))
            if page is None:
                return
            yield [BlobInfo(key=meta["path"], size=meta["size"],
                            modified=meta["last_modified"].timestamp()) for meta in page]

    def delete(self, key: str) -> None:
        import obstore

        try:
            self._call("delete", key, lambda: obstore.delete(self._store, check_key(key)))
        except RemoteNotFound:
            pass

    def stat(self, key: str) -> BlobInfo | None:
        import obstore

        try:
            meta = self._call("read", key, lambda: obstore.head(self._store, check_key(key)))
        except RemoteNotFound:
            return None
        return BlobInfo(key=key, size=meta["size"], modified=meta["last_modified"].timestamp())


class _AlreadyThere(Exception):
    pass


def _put_create(obstore: Any, store: Any, key: str, data: bytes) -> None:
    import obstore.exceptions as oe

    try:
        obstore.put(store, key, data, mode="create", use_multipart=False)
    except (oe.AlreadyExistsError, oe.PreconditionError):
        raise _AlreadyThere() from None


def _is_conflict(message: str) -> bool:
    return "ConditionalRequestConflict" in message or "409" in message


def _reason(exc: BaseException) -> str:
    """The first line of an obstore error, which is otherwise several lines of context."""
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:  # the server's own words are the most useful part
        if "<Message>" in line or "<Code>" in line:
            return " ".join(lines[:1] + [line])[:400]
    return lines[0][:400] if lines else type(exc).__name__


INSTANCE_CREDENTIALS_ENV = "STAGESTORE_S3_INSTANCE_CREDENTIALS"
# Sources of credentials obstore uses before the instance metadata service, configured only
# by these variables (a web identity token, as on EKS; a container's, as on ECS).
_PROVIDER_ENV = ("AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _credentials(url: str) -> dict[str, str]:
    """Keys for obstore's config from an AWS profile, or nothing when obstore finds credentials
    itself; `CredentialsError`, naming where it looked, when there are none anywhere."""
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        if not os.environ.get("AWS_SECRET_ACCESS_KEY"):
            raise CredentialsError(f"incomplete AWS credentials for {url}: AWS_ACCESS_KEY_ID is "
                                   "set, but AWS_SECRET_ACCESS_KEY is not")
        return {}
    if _truthy(os.environ.get("AWS_SKIP_SIGNATURE")) or any(os.environ.get(n)
                                                            for n in _PROVIDER_ENV):
        return {}
    found = _profile_credentials()
    if "access_key_id" in found and "secret_access_key" in found:
        return found
    if _truthy(os.environ.get(INSTANCE_CREDENTIALS_ENV)):
        return {}
    profile, path = _profile_location()
    if not path.is_file():
        where = f"{path} does not exist"
    elif not _has_section(path, profile):
        where = f"{path} has no profile {profile!r}"
    else:
        where = (f"profile {profile!r} of {path} lacks aws_access_key_id or "
                 "aws_secret_access_key")
    raise CredentialsError(f"no AWS credentials found for {url}: AWS_ACCESS_KEY_ID is not set, "
                           f"and {where}")


def _profile_location() -> tuple[str, Path]:
    """The profile name and the shared credentials file that `_profile_credentials` reads."""
    return (os.environ.get("AWS_PROFILE") or "default",
            Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE")
                 or Path.home() / ".aws" / "credentials"))


def _has_section(path: Path, profile: str) -> bool:
    import configparser

    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except (OSError, configparser.Error):
        return False
    return parser.has_section(profile)


def _profile_credentials() -> dict[str, str]:
    """Keys for obstore's config from an AWS profile, when the environment names none."""
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return {}
    import configparser

    profile, path = _profile_location()
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except (OSError, configparser.Error) as exc:
        raise RemoteError(f"cannot read the AWS credentials file {path}: {exc}") from None
    if not parser.has_section(profile):
        if os.environ.get("AWS_PROFILE"):
            raise CredentialsError(f"AWS profile {profile!r} is not in {path}",
                              hint="set AWS_PROFILE to a profile of that file, or set "
                                   "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        return {}
    section = parser[profile]
    keys = {"aws_access_key_id": "access_key_id", "aws_secret_access_key": "secret_access_key",
            "aws_session_token": "session_token"}
    return {ours: section[theirs] for theirs, ours in keys.items() if section.get(theirs)}


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://BUCKET/PREFIX` -> (bucket, prefix without slashes at either end)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise UsageError(f"invalid remote URL {url!r}: expected s3://BUCKET/PREFIX")
    prefix = parts.path.strip("/")
    if prefix and not _KEY_RE.fullmatch(prefix):
        raise UsageError(f"invalid remote URL {url!r}: the prefix may use letters, digits and "
                         "'.', '_', '-', '/'")
    return parts.netloc, prefix


def open_storage(url: str, *, endpoint: str | None = None, region: str | None = None) -> Storage:
    """The storage a remote URL names: `s3://BUCKET/PREFIX` or `file:///ABSOLUTE/PATH`."""
    if url.startswith("s3://"):
        return S3Storage(url, endpoint=endpoint, region=region)
    if url.startswith("file://"):
        path = url[len("file://"):]
        if not path.startswith("/"):
            raise UsageError(f"invalid remote URL {url!r}: a file:// URL needs an absolute path")
        if endpoint or region:
            raise UsageError("an endpoint and a region apply to s3:// remotes only")
        return FileStorage(path)
    raise UsageError(f"invalid remote URL {url!r}: expected s3://BUCKET/PREFIX "
                     "(or file:///PATH for a folder)")


def pages_flat(pages: Iterable[list[BlobInfo]]) -> Iterator[BlobInfo]:
    for page in pages:
        yield from page
