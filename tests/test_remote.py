"""Remotes through the real CLI: `remote add|list|remove`, `push`, `pull`, `run --remote`,
`verify --remote` and `gc --remote`, against a folder remote and a real SeaweedFS."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Workspace
from test_cli import as_json, no_traceback, ok, usage_error


class Remote:
    """Where a test's remote is, and what a CLI call needs to reach it."""

    def __init__(self, url: str, endpoint: str | None, env: dict[str, str]) -> None:
        self.url = url
        self.endpoint = endpoint
        self.env = env

    def add_args(self, name: str = "origin") -> list[str]:
        return ["remote", "add", name, self.url] + (
            ["--endpoint", self.endpoint] if self.endpoint else [])

    def storage(self):  # noqa: ANN201
        from stagestore.remote.storage import open_storage

        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            return open_storage(self.url, endpoint=self.endpoint)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _s3_env(bucket) -> dict[str, str]:  # noqa: ANN001
    # Only the credentials and region: the endpoint must come from the remote's own settings.
    return {"AWS_ACCESS_KEY_ID": bucket.access_key, "AWS_SECRET_ACCESS_KEY": bucket.secret_key,
            "AWS_REGION": bucket.region}


@pytest.fixture(params=["file", "s3"])
def remote(request, tmp_path) -> Remote:  # noqa: ANN001
    if request.param == "file":
        return Remote(f"file://{tmp_path / 'remote'}", None, {})
    bucket = request.getfixturevalue("s3_bucket")
    return Remote(f"s3://{bucket.bucket}/team/store", bucket.endpoint, _s3_env(bucket))


@pytest.fixture
def s3_remote(s3_bucket) -> Remote:  # noqa: ANN001
    return Remote(f"s3://{s3_bucket.bucket}/team/store", s3_bucket.endpoint, _s3_env(s3_bucket))


def cli(ws: Workspace, remote: Remote, *args: str, store: Path | None = None):  # noqa: ANN201
    extra = ["--store", str(store)] if store is not None else []
    return ws.cli(*extra, *args, env=remote.env)


def manifests_of(store: Path, run_id: str) -> dict[str, dict]:
    folder = store / "runs" / run_id
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json") if p.stem != "_run"}


def remote_keys(remote: Remote, prefix: str = "") -> list[str]:
    from stagestore.remote.storage import pages_flat

    return sorted(info.key for info in pages_flat(remote.storage().list(prefix)))


@pytest.fixture
def pushed(ws, remote) -> tuple[Workspace, Remote, str]:  # noqa: ANN001
    ws.linear()
    run_id = ok(ws.cli("run", "--run-id", "r1")).strip()
    ok(cli(ws, remote, *remote.add_args()))
    ok(cli(ws, remote, "push"))
    return ws, remote, run_id


# --- remote add / list / remove -----------------------------------------------------------------


def test_remote_add_list_remove(ws, remote):
    ws.linear()
    out = ok(cli(ws, remote, *remote.add_args()))
    assert "create-only writes hold" in out
    listed = as_json(cli(ws, remote, "remote", "list", "--json"))
    assert [(r["name"], r["url"], r["endpoint"]) for r in listed] == [
        ("origin", remote.url, remote.endpoint)]
    lines = usage_error(cli(ws, remote, *remote.add_args()))
    assert "already exists" in lines[0]
    ok(cli(ws, remote, "remote", "remove", "origin"))
    assert as_json(cli(ws, remote, "remote", "list", "--json")) == []
    lines = usage_error(cli(ws, remote, "remote", "remove", "origin"))
    assert "no remote named 'origin'" in lines[0]


def test_credentials_are_never_written(ws, s3_remote):
    ws.linear()
    ok(ws.cli("run"))
    ok(cli(ws, s3_remote, *s3_remote.add_args()))
    ok(cli(ws, s3_remote, "push"))
    secret = s3_remote.env["AWS_SECRET_ACCESS_KEY"].encode()
    key_id = s3_remote.env["AWS_ACCESS_KEY_ID"].encode()
    for path in ws.root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret not in data and key_id not in data, path


def test_remote_url_and_name_are_checked(ws, remote):
    ws.linear()
    assert "invalid remote URL" in usage_error(cli(ws, remote, "remote", "add", "o", "http://x/y"))[0]
    assert "invalid remote name" in usage_error(cli(ws, remote, "remote", "add", "../o", remote.url))[0]


def test_a_prefix_holding_other_data_is_refused(ws, remote):
    ws.linear()
    remote.storage().write("someone-else/file.txt", b"not ours")
    res = cli(ws, remote, *remote.add_args())
    assert res.returncode == 1, res.stderr
    no_traceback(res)
    assert "not empty and is not a stagestore remote" in res.stderr


def test_probe_refuses_a_server_that_overwrites(ws, rclone_s3):
    """`rclone serve s3` ignores If-None-Match: the capability probe must refuse it."""
    ws.linear()
    env = {"AWS_ACCESS_KEY_ID": rclone_s3.access_key,
           "AWS_SECRET_ACCESS_KEY": rclone_s3.secret_key, "AWS_REGION": rclone_s3.region}
    bad = Remote(f"s3://{rclone_s3.bucket}/refused-{os.getpid()}", rclone_s3.endpoint, env)
    res = cli(ws, bad, *bad.add_args("bad"))
    assert res.returncode == 1, res.stderr
    no_traceback(res)
    assert "does not honour create-only writes" in res.stderr
    assert "hint:" in res.stderr
    assert as_json(ws.cli("remote", "list", "--json")) == []
    assert remote_keys(bad) == []  # no marker, no probe key left on a refused remote


def test_unreachable_endpoint_is_a_one_line_error(ws):
    ws.linear()
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1"}
    res = ws.cli("remote", "add", "o", "s3://b/p", "--endpoint", "http://127.0.0.1:9", env=env,
                 timeout=120)
    assert res.returncode == 1
    no_traceback(res)
    assert res.stderr.startswith("error: cannot ")


# --- push and pull ------------------------------------------------------------------------------


def test_push_then_pull_into_an_empty_store(pushed, tmp_path):
    ws, remote, run_id = pushed
    other = tmp_path / "elsewhere" / "store"
    ok(cli(ws, remote, *remote.add_args(), store=other))
    report = as_json(cli(ws, remote, "pull", run_id, "--json", store=other))
    assert report["ok"] and report["manifests_pulled"] == 3 and report["objects_downloaded"] > 0
    ok(ws.cli("--store", str(other), "verify"))
    assert manifests_of(other, run_id) == manifests_of(ws.store, run_id)
    for store in (ws.store, other):
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        ok(ws.cli("--store", str(store), "checkout", run_id, "make", "--to", str(tmp_path / "out")))
        assert sorted(p.name for p in (tmp_path / "out" / "out").iterdir()) == [
            "f0.txt", "f1.txt", "f2.txt"]
    assert not list((other / "tmp").iterdir())
    again = as_json(cli(ws, remote, "pull", run_id, "--json", store=other))
    assert again["manifests_pulled"] == 0 and again["objects_downloaded"] == 0


def test_push_and_pull_through_a_folder_remote_on_another_filesystem(ws, tmp_path):
    """A `file://` remote under /dev/shm (a tmpfs) while the store is on disk: `push` copies
    objects across filesystems, where `copy_file_range` may refuse (EXDEV)."""
    import tempfile

    from stagestore.remote.storage import PART_SIZE

    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("/dev/shm does not exist: no second filesystem to put a remote on")
    if shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip(f"/dev/shm is on the same filesystem as {tmp_path}")
    folder = Path(tempfile.mkdtemp(prefix="stagestore-test-", dir=shm))
    try:
        remote = Remote(f"file://{folder / 'remote'}", None, {})
        ws.linear()
        # larger than a part: sent from its file (`write_file`), not from bytes in memory
        ws.write("data/big.txt", "0123456789abcdef" * (PART_SIZE // 16 + 1000))
        run_id = ok(ws.cli("run", "--run-id", "r1")).strip()
        ok(cli(ws, remote, *remote.add_args()))
        report = as_json(cli(ws, remote, "push", "--json"))
        assert report["ok"] and report["objects_uploaded"] > 0
        other = tmp_path / "elsewhere" / "store"
        ok(cli(ws, remote, *remote.add_args(), store=other))
        pulled = as_json(cli(ws, remote, "pull", run_id, "--json", store=other))
        assert pulled["ok"] and pulled["manifests_pulled"] == 3
        ok(ws.cli("--store", str(other), "verify"))
        ok(cli(ws, remote, "verify", "--remote", "origin"))
        assert manifests_of(other, run_id) == manifests_of(ws.store, run_id)
        assert not list((folder / "remote" / ".tmp").iterdir())
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_second_push_transfers_nothing(pushed):
    ws, remote, _ = pushed
    report = as_json(cli(ws, remote, "push", "--json"))
    assert report["ok"]
    assert (report["objects_uploaded"], report["manifests_pushed"]) == (0, 0)
    assert report["manifests_present"] == 3 and report["objects_present"] > 0


def test_remote_layout(pushed):
    ws, remote, run_id = pushed
    keys = remote_keys(remote)
    assert "stagestore-remote.json" in keys
    assert {k for k in keys if k.startswith(f"runs/{run_id}/") and not k.split("/")[-1].startswith("_")} == {
        f"runs/{run_id}/{stage}.json" for stage in ("make", "count", "report")}
    assert sum(k.startswith(f"runs/{run_id}/_run.") for k in keys) == 1
    assert sum(k.startswith("cache/") for k in keys) == 3
    assert not any(k.startswith("probe/") for k in keys)
    on_remote = {k.split("/", 1)[1].replace("/", "") for k in keys if k.startswith("objects/")}
    local = {p.parent.name + p.name for p in (ws.store / "objects").rglob("*") if p.is_file()}
    assert local and local == on_remote


def test_pull_unknown_run_and_missing_remote(pushed, tmp_path):
    ws, remote, _ = pushed
    lines = usage_error(cli(ws, remote, "pull", "nope"))
    assert "run 'nope' is not on remote 'origin'" in lines[0]
    lines = usage_error(ws.cli("--store", str(tmp_path / "s"), "push"))
    assert "store" in lines[0]


def test_remote_must_be_named_when_there_are_two(pushed, tmp_path):
    ws, remote, run_id = pushed
    second = Remote(f"file://{tmp_path / 'second'}", None, remote.env)
    ok(cli(ws, second, *second.add_args("backup")))
    lines = usage_error(cli(ws, remote, "push"))
    assert "2 remotes (origin, backup): say which" in lines[0]
    ok(cli(ws, second, "push", "--remote", "backup"))
    assert as_json(ws.cli("remote", "runs", "backup", "--json")) == [run_id]


def test_a_damaged_remote_object_is_refused_on_pull_and_named_by_verify(pushed, tmp_path):
    ws, remote, run_id = pushed
    storage = remote.storage()
    victim = next(k for k in remote_keys(remote, "objects/"))
    storage.write(victim, b"damaged on the remote")
    digest = "blake3:" + victim[len("objects/"):].replace("/", "")
    res = cli(ws, remote, "verify", "--remote", "origin", "--json")
    assert res.returncode == 1
    report = json.loads(res.stdout)
    assert [(p["kind"], p["object"]) for p in report["problems"]] == [("object_damaged", digest)]
    other = tmp_path / "other"
    ok(cli(ws, remote, *remote.add_args(), store=other))
    res = cli(ws, remote, "pull", run_id, store=other)
    assert res.returncode == 1
    no_traceback(res)
    assert f"object {digest}" in res.stderr and "is damaged" in res.stderr
    assert not (other / "objects" / digest[7:9] / digest[9:]).exists()
    assert not list((other / "tmp").iterdir())  # nothing half-downloaded remains
    assert not (other / "runs" / run_id / "_run.json").exists()  # all of a run or nothing
    ok(ws.cli("--store", str(other), "verify"))
    # pushing again from the intact store repairs the remote object
    ok(cli(ws, remote, "push"))
    ok(cli(ws, remote, "verify", "--remote", "origin"))


def test_verify_remote_names_a_missing_object_and_samples(pushed):
    ws, remote, _ = pushed
    victim = next(k for k in remote_keys(remote, "objects/"))
    remote.storage().delete(victim)
    res = cli(ws, remote, "verify", "--remote", "origin", "--sample", "10", "--json")
    assert res.returncode == 1
    report = json.loads(res.stdout)
    assert {p["kind"] for p in report["problems"]} == {"object_missing"}
    assert report["objects_checked"] < len(remote_keys(remote, "objects/"))
    assert "'--sample'" in usage_error(cli(ws, remote, "verify", "--remote", "origin",
                                           "--sample", "0"))[0]


def test_conflicting_manifest_is_reported_never_overwritten(pushed, tmp_path):
    ws, remote, run_id = pushed
    before = remote.storage().read(f"runs/{run_id}/make.json")
    other = Workspace(tmp_path / "other-ws")
    other.root.mkdir()
    other.linear()
    other.write("data/f0.txt", "different content\n")
    ok(other.cli("run", "--run-id", run_id))
    ok(cli(other, remote, *remote.add_args()))
    res = cli(other, remote, "push", "--json")
    assert res.returncode == 1
    report = json.loads(res.stdout)
    stages = {c["stage"] for c in report["conflicts"]}
    assert "make" in stages
    conflict = next(c for c in report["conflicts"] if c["stage"] == "make")
    assert conflict["remote"].endswith(f"runs/{run_id}/make.json")
    assert conflict["local_version"] != conflict["remote_version"]
    assert remote.storage().read(f"runs/{run_id}/make.json") == before
    text = cli(other, remote, "push")
    assert "conflict: run r1 stage make" in text.stderr


def test_failed_stages_are_pushed_under_content_named_keys(ws, remote, tmp_path):
    ws.linear()
    ws.write("steps/count.py", "import sys; sys.exit('count broke')\n")
    res = ws.cli("run", "--run-id", "bad")
    assert res.returncode == 1
    ok(cli(ws, remote, *remote.add_args()))
    ok(cli(ws, remote, "push"))
    keys = remote_keys(remote, "runs/bad/")
    assert any(k.startswith("runs/bad/count~failed~") for k in keys), keys
    other = tmp_path / "other"
    ok(cli(ws, remote, *remote.add_args(), store=other))
    ok(cli(ws, remote, "pull", "bad", store=other))
    ok(ws.cli("--store", str(other), "verify"))
    assert manifests_of(other, "bad")["count"]["status"] == "failed"


def test_two_stores_pushing_the_same_run_at_once(ws, s3_remote, tmp_path):
    """Two copies of a store push the same run concurrently: one manifest per stage, and
    neither push reports an error (the loser of each create-only write finds equal bytes)."""
    ws.linear()
    ok(ws.cli("run", "--run-id", "r1"))
    copies = []
    for n in range(2):
        copy = tmp_path / f"copy{n}"
        shutil.copytree(ws.store, copy)
        ok(cli(ws, s3_remote, *s3_remote.add_args(), store=copy))
        copies.append(copy)
    env = {**{k: v for k, v in os.environ.items() if k != "STAGESTORE_STORE"}, **s3_remote.env}
    procs = [subprocess.Popen([sys.executable, "-m", "stagestore", "--store", str(c), "push",
                               "--json"], cwd=ws.root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in copies]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    for out, err, code in results:
        assert code == 0, err
        assert json.loads(out)["conflicts"] == []
    pushed = sum(json.loads(out)["manifests_pushed"] for out, _, _ in results)
    assert pushed == 3
    keys = remote_keys(s3_remote, "runs/r1/")
    assert sorted(k for k in keys if not k.split("/")[-1].startswith("_")) == [
        "runs/r1/count.json", "runs/r1/make.json", "runs/r1/report.json"]


# --- run --remote and --push --------------------------------------------------------------------


def test_run_remote_on_a_fresh_machine_executes_nothing(pushed, tmp_path):
    ws, remote, run_id = pushed
    fresh = Workspace(tmp_path / "laptop" / "checkout")  # another path: keys do not depend on it
    shutil.copytree(ws.root, fresh.root, ignore=shutil.ignore_patterns(".stagestore"))
    ok(cli(fresh, remote, *remote.add_args()))
    report = as_json(cli(fresh, remote, "run", "--remote", "origin", "--json"))
    assert report["ok"]
    assert {s["stage"]: s["outcome"] for s in report["stages"]} == {
        "make": "cached", "count": "cached", "report": "cached"}
    assert {s["cached_from"] for s in report["stages"]} == {run_id}
    ok(fresh.cli("verify"))
    ok(fresh.cli("checkout", report["run_id"], "report", "--to", str(tmp_path / "o")))
    assert (tmp_path / "o" / "text").read_text() == "files=3\n"
    # the reused results are found locally from now on, without the remote
    again = as_json(fresh.cli("run", "--json"))
    assert {s["outcome"] for s in again["stages"]} == {"cached"}


def test_run_push_pushes_each_result(ws, remote, tmp_path):
    ws.linear()
    ok(cli(ws, remote, *remote.add_args()))
    report = as_json(cli(ws, remote, "run", "--run-id", "p1", "--remote", "origin", "--push",
                         "--json"))
    assert report["push"]["ok"] and report["push"]["manifests_pushed"] == 3
    other = tmp_path / "other"
    ok(cli(ws, remote, *remote.add_args(), store=other))
    ok(cli(ws, remote, "pull", "p1", store=other))
    ok(ws.cli("--store", str(other), "verify"))
    assert "--push needs --remote" in usage_error(ws.cli("run", "--push"))[0]


# --- gc --remote --------------------------------------------------------------------------------


def test_gc_remote_keeps_referenced_and_young_objects(pushed):
    ws, remote, _ = pushed
    storage = remote.storage()
    stray = "objects/ff/" + "0" * 62
    storage.write(stray, b"unreferenced")
    before = set(remote_keys(remote, "objects/"))
    young = as_json(cli(ws, remote, "gc", "--remote", "origin", "--json"))
    assert (young["objects_removed"], young["objects_young"]) == (0, 1)
    dry = as_json(cli(ws, remote, "gc", "--remote", "origin", "--grace", "0", "--dry-run", "--json"))
    assert dry["removed"] == ["blake3:ff" + "0" * 62]
    assert set(remote_keys(remote, "objects/")) == before
    done = as_json(cli(ws, remote, "gc", "--remote", "origin", "--grace", "0", "--json"))
    assert done["objects_removed"] == 1 and done["objects_kept"] == len(before) - 1
    assert set(remote_keys(remote, "objects/")) == before - {stray}
    ok(cli(ws, remote, "verify", "--remote", "origin"))


def test_a_run_whose_record_names_a_missing_manifest_is_not_pulled(pushed, tmp_path):
    ws, remote, run_id = pushed
    remote.storage().delete(f"runs/{run_id}/count.json")
    other = tmp_path / "other"
    ok(cli(ws, remote, *remote.add_args(), store=other))
    res = cli(ws, remote, "pull", run_id, store=other)
    assert res.returncode == 1
    no_traceback(res)
    assert "names stages whose manifests are not there (count)" in res.stderr
    assert not (other / "runs" / run_id / "_run.json").exists()
    ok(ws.cli("--store", str(other), "verify"))


def test_first_use_probes_a_remote_added_by_hand(ws, rclone_s3, s3_remote):
    """A remote written into config.json by hand (no probe recorded) is probed on first use:
    an honest server is then used and its probe time saved; one that overwrites is refused."""
    ws.linear()
    ok(ws.cli("run"))
    ok(cli(ws, s3_remote, *s3_remote.add_args()))
    config_path = ws.store / "config.json"
    config = json.loads(config_path.read_text())
    config["remotes"][0]["probed_at"] = None
    config["remotes"].append({"name": "bad", "url": f"s3://{rclone_s3.bucket}/x",
                              "endpoint": rclone_s3.endpoint, "region": None, "probed_at": None})
    config_path.write_text(json.dumps(config))
    ok(cli(ws, s3_remote, "push", "--remote", "origin"))
    assert json.loads(config_path.read_text())["remotes"][0]["probed_at"] is not None
    env = {"AWS_ACCESS_KEY_ID": rclone_s3.access_key,
           "AWS_SECRET_ACCESS_KEY": rclone_s3.secret_key, "AWS_REGION": rclone_s3.region}
    res = ws.cli("push", "--remote", "bad", env=env)
    assert res.returncode == 1
    no_traceback(res)
    assert "does not honour create-only writes" in res.stderr
    assert json.loads(config_path.read_text())["remotes"][1]["probed_at"] is None
