"""The storage interface's conformance tests: one class, passed by the folder storage and by
the S3 storage against a real SeaweedFS on 127.0.0.1 (tests/s3servers.py)."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from stagestore.remote.storage import (PART_SIZE, FileStorage, RemoteError, RemoteNotFound,
                                       S3Storage, open_storage, pages_flat)


@pytest.fixture
def shm_folder(tmp_path):  # noqa: ANN001, ANN201
    """A fresh folder under /dev/shm (a tmpfs): a filesystem other than the one of `tmp_path`,
    where the store and the files a remote is sent from live."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("/dev/shm does not exist: no second filesystem to put a remote on")
    if shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip(f"/dev/shm is on the same filesystem as {tmp_path}")
    folder = Path(tempfile.mkdtemp(prefix="stagestore-test-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["file", "file-other-filesystem", "s3"])
def storage(request, tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    if request.param == "file":
        return FileStorage(tmp_path / "remote")
    if request.param == "file-other-filesystem":
        return FileStorage(request.getfixturevalue("shm_folder") / "remote")
    bucket = request.getfixturevalue("s3_bucket")
    for key, value in bucket.env().items():
        monkeypatch.setenv(key, value)
    return S3Storage(f"s3://{bucket.bucket}/some/prefix", endpoint=bucket.endpoint)


def keys(storage, prefix: str = "") -> list[str]:  # noqa: ANN001
    return sorted(info.key for info in pages_flat(storage.list(prefix)))


class TestConformance:
    def test_write_then_read(self, storage):
        storage.write("a/b/c", b"hello")
        assert storage.read("a/b/c") == b"hello"
        assert b"".join(storage.read_chunks("a/b/c")) == b"hello"
        storage.write("a/b/c", b"replaced")  # write replaces
        assert storage.read("a/b/c") == b"replaced"

    def test_missing_key(self, storage):
        with pytest.raises(RemoteNotFound, match="does not exist"):
            storage.read("nope/x")
        with pytest.raises(RemoteNotFound):
            storage.read_chunks("nope/x")
        assert storage.stat("nope/x") is None
        storage.delete("nope/x")  # no error

    def test_create_only(self, storage):
        assert storage.create("m/one.json", b"first") is True
        assert storage.create("m/one.json", b"second") is False
        assert storage.read("m/one.json") == b"first"

    def test_create_race_has_one_winner(self, storage):
        """8 writers, one key, different content: exactly one creates it, and it holds the
        winner's bytes (SeaweedFS holds this; moto's check-then-store did not)."""
        results: dict[int, bool] = {}
        barrier = threading.Barrier(8)

        def writer(n: int) -> None:
            barrier.wait()
            results[n] = storage.create("race/key", f"writer {n}".encode())

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [n for n, won in results.items() if won]
        assert len(winners) == 1, results
        assert storage.read("race/key") == f"writer {winners[0]}".encode()

    def test_large_file_round_trip_in_parts(self, storage, tmp_path):
        data = bytes(range(256)) * ((PART_SIZE * 2 + 12345) // 256)
        path = tmp_path / "big"
        path.write_bytes(data)
        storage.write_file("objects/big", path, len(data))
        chunks = list(storage.read_chunks("objects/big"))
        assert b"".join(chunks) == data
        assert len(chunks) >= 2  # streamed, not read whole
        assert storage.stat("objects/big").size == len(data)

    def test_list_by_prefix_in_pages(self, storage):
        from concurrent.futures import ThreadPoolExecutor

        names = [f"objects/{i % 7:02x}/{i:060x}" for i in range(1030)]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda k: storage.write(k, b"x"), names))
        storage.write("objectsx/not-under-objects", b"y")
        pages = list(storage.list("objects/"))
        assert len(pages) >= 2 and all(len(p) <= 1000 for p in pages)
        assert keys(storage, "objects/") == sorted(names)
        assert keys(storage, "objects/03/") == sorted(n for n in names if n.startswith("objects/03/"))
        info = storage.stat(names[0])
        assert info.size == 1 and info.modified > 0

    def test_delete(self, storage):
        storage.write("d/x", b"1")
        storage.delete("d/x")
        assert storage.stat("d/x") is None
        assert keys(storage, "d/") == []

    def test_keys_are_checked(self, storage):
        for bad in ("../x", "a//b", "/abs", "a/../b", "sp ace"):
            with pytest.raises(ValueError, match="invalid remote key"):
                storage.write(bad, b"")


def test_file_storage_leaves_no_temps(tmp_path):
    storage = FileStorage(tmp_path / "r")
    storage.write("a", b"1")
    storage.create("a", b"2")
    storage.create("b", b"3")
    assert list((tmp_path / "r" / ".tmp").iterdir()) == []
    assert keys(storage) == ["a", "b"]  # the temp folder is not listed


@pytest.mark.parametrize("code", ["EXDEV", "ENOSYS", "EOPNOTSUPP", "EINVAL"])
def test_file_storage_copies_where_copy_file_range_cannot(tmp_path, monkeypatch, code):
    """`copy_file_range` refuses most copies across filesystems (EXDEV), some filesystems
    (EOPNOTSUPP, EINVAL) and old kernels (ENOSYS): the copy then falls back to reading and
    writing, after whatever part `copy_file_range` had copied is discarded."""
    data = os.urandom(3 << 20)
    source = tmp_path / "source"
    source.write_bytes(data)
    real, calls = os.copy_file_range, []

    def refuses(src, dst, count, *args):  # noqa: ANN001, ANN202
        calls.append(count)
        if len(calls) == 1:  # copies a part first, then gives up
            return real(src, dst, 1 << 20, *args)
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(os, "copy_file_range", refuses)
    storage = FileStorage(tmp_path / "r")
    storage.write_file("objects/x", source, len(data))
    assert len(calls) == 2
    assert storage.read("objects/x") == data
    assert list((tmp_path / "r" / ".tmp").iterdir()) == []


def test_s3_conflict_409_is_retried(monkeypatch):
    """A `409 ConditionalRequestConflict` (a concurrent conditional write in flight) is retried.
    obstore raises it as a generic error or, on a create, as AlreadyExistsError; the latter is
    told apart from a real "exists" by looking at the key."""
    import obstore.exceptions as oe

    import stagestore.remote.storage as storage_module

    calls, exists = [], {"m/x.json": False}

    def flaky(obstore, store, key, data):  # noqa: ANN001
        calls.append(key)
        if len(calls) == 1:
            raise oe.GenericError("Generic S3 error: 409 Conflict "
                                  "<Code>ConditionalRequestConflict</Code>")
        if len(calls) == 2:
            raise storage_module._AlreadyThere()  # a 409 seen as "exists": the key is not there
        exists[key] = True

    monkeypatch.setattr(storage_module, "_put_create", flaky)
    monkeypatch.setattr(storage_module.time, "sleep", lambda s: None)
    s3 = S3Storage.__new__(S3Storage)
    s3.url, s3.endpoint, s3._store = "s3://b/p", None, None
    monkeypatch.setattr(S3Storage, "stat", lambda self, key: object() if exists[key] else None)
    assert s3.create("m/x.json", b"{}") is True
    assert len(calls) == 3

    def always(obstore, store, key, data):  # noqa: ANN001
        raise storage_module._AlreadyThere()

    monkeypatch.setattr(storage_module, "_put_create", always)
    exists["m/y.json"] = False
    with pytest.raises(RemoteError, match="kept answering 409"):
        s3.create("m/y.json", b"{}")


def test_open_storage_refuses_bad_urls():
    for url in ("http://x/y", "s3://", "file://relative/path", "s3://b/p?q=1"):
        with pytest.raises(Exception) as info:
            open_storage(url)
        assert "invalid remote URL" in str(info.value)


def test_s3_errors_are_one_line_with_a_hint(s3_bucket, monkeypatch):
    for key, value in s3_bucket.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    storage = S3Storage(f"s3://{s3_bucket.bucket}/p", endpoint=s3_bucket.endpoint)
    with pytest.raises(RemoteError) as info:
        storage.write("k", b"1")
    assert "\n" not in info.value.message and info.value.hint
    assert "wrong-secret" not in info.value.message


def test_profile_credentials_are_read_when_the_environment_has_none(tmp_path, monkeypatch):
    from stagestore.remote.storage import _profile_credentials

    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = s1\n"
                     "[ci]\naws_access_key_id = AKIACI\naws_secret_access_key = s2\n"
                     "aws_session_token = tok\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    assert _profile_credentials() == {"access_key_id": "AKIADEFAULT", "secret_access_key": "s1"}
    monkeypatch.setenv("AWS_PROFILE", "ci")
    assert _profile_credentials() == {"access_key_id": "AKIACI", "secret_access_key": "s2",
                                      "session_token": "tok"}
    monkeypatch.setenv("AWS_PROFILE", "nope")
    with pytest.raises(RemoteError, match="profile 'nope'"):
        _profile_credentials()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENV")  # the environment wins
    assert _profile_credentials() == {}
    assert not Path(tmp_path / "written").exists()
