"""Item runs on Dask with a remote (`run --items F --executor dask --remote NAME --push`): each
item runs in a node-local scratch store on its worker, takes the run's shared results and its
input snapshots from the remote (SeaweedFS), pushes its results there, and the driver's store
ends up holding the whole run, with the local executor's hashes."""

from __future__ import annotations

import json

import pytest

from conftest import Workspace
from test_cli import ok
from test_remote import Remote, cli

pytest.importorskip("distributed")

ITEMS = [f"i{n:02d}" for n in range(12)]

PIPE = """
[pipeline]
name = "scatter"

[stages.prep]
cmd = ["sh", "-c", "tr a-z A-Z < {inputs.base} > {outputs.o}"]
inputs = { base = "base.txt" }
outputs = ["o"]

[stages.derive]
upstream = ["prep"]
cmd = ["sh", "-c", "cat {upstream.prep.o} {inputs.mine} > {outputs.o}; echo {item} >> {outputs.o}"]
inputs = { mine = "in/{item}.txt" }
outputs = ["o"]

[stages.count]
upstream = ["derive"]
cmd = ["sh", "-c", "wc -c < {upstream.derive.o} > {outputs.o}"]
outputs = ["o"]
"""


def _workspace(ws: Workspace) -> None:
    ws.pipeline(PIPE)
    ws.write("base.txt", "shared base\n")
    for item in ITEMS:
        ws.write(f"in/{item}.txt", f"own input of {item}\n")
    ws.write("items.txt", "".join(f"{item}\n" for item in ITEMS))


def _hashes(store, run_id: str) -> dict:  # noqa: ANN001
    from stagestore.store.store import Store

    manifests = Store.open(store).manifests
    found = {("-", "prep"): manifests.read(run_id, "prep").output_hash}
    for item in manifests.items(run_id):
        for stage in ("derive", "count"):
            found[item, stage] = manifests.read(run_id, stage, item).output_hash
    return found


def test_items_run_in_scratch_stores_and_push_to_the_remote(ws, s3_bucket, tmp_path):
    _workspace(ws)
    ok(ws.cli("run", "--items", "items.txt", "--run-id", "r", "--store", str(tmp_path / "local")))
    local = _hashes(tmp_path / "local", "r")
    remote = Remote(f"s3://{s3_bucket.bucket}/p", s3_bucket.endpoint,
                    {"AWS_ACCESS_KEY_ID": s3_bucket.access_key,
                     "AWS_SECRET_ACCESS_KEY": s3_bucket.secret_key,
                     "AWS_REGION": s3_bucket.region})
    ok(cli(ws, remote, *remote.add_args()))
    scratch = tmp_path / "scratch"
    env = {**remote.env, "STAGESTORE_SCRATCH": str(scratch)}
    proc = ws.cli("run", "--items", "items.txt", "--run-id", "r", "--executor", "dask",
                  "--jobs", "2", "--remote", "origin", "--push", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["status"] == "succeeded" and report["push"]["ok"]
    assert _hashes(ws.store, "r") == local  # the driver's store holds the whole run
    ok(ws.cli("verify"))
    # the items ran in the scratch store (one per remote URL under STAGESTORE_SCRATCH)
    [scratch_store] = list(scratch.iterdir())
    from stagestore.store.store import Store

    assert sorted(Store.open(scratch_store).manifests.items("r")) == ITEMS
    # and the remote has everything: another store pulls the run and verifies
    other = tmp_path / "other"
    ok(cli(ws, remote, *remote.add_args(), store=other))
    ok(cli(ws, remote, "pull", "r", store=other))
    ok(ws.cli("--store", str(other), "verify"))
    assert _hashes(other, "r") == local
    # a second run reuses every result, from the remote or the scratch store
    again = ws.cli("run", "--items", "items.txt", "--run-id", "r2", "--executor", "dask",
                   "--jobs", "2", "--remote", "origin", "--push", "--json", env=env)
    assert again.returncode == 0, again.stderr
    outcomes = {s["outcome"] for i in json.loads(again.stdout)["items"] for s in i["stages"]}
    assert outcomes == {"cached"}


def test_remote_items_need_push(ws, tmp_path):
    _workspace(ws)
    ok(ws.cli("remote", "add", "origin", f"file://{tmp_path / 'r'}"))
    proc = ws.cli("run", "--items", "items.txt", "--executor", "dask", "--remote", "origin")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: the Dask scheduler with a remote runs items in scratch "
                                  "stores")
    assert "hint: add --push (or leave out --remote" in proc.stderr


# An item stage with inputs that are not per item (a script, a folder) and a `call` stage,
# whose code is snapshotted once per run: the worker's scratch store must get those snapshots
# as well as the item's own inputs and the shared stages' results.
SHARED_INPUTS = """
[pipeline]
name = "sharedin"

[stages.step]
cmd = ["sh", "-c", "sh {inputs.script} {inputs.mine} {inputs.lib} > {outputs.o}; echo {item} >> {outputs.o}"]
inputs = { script = "steps/step.sh", mine = "in/{item}.txt", lib = "lib" }
outputs = ["o"]

[stages.called]
upstream = ["step"]
call = "mod:f"
outputs = ["o"]
"""

SHARED_ITEMS = ["ok-1", "ok-2", "ok-3"]


def test_items_get_the_snapshots_of_shared_inputs_from_the_remote(ws, tmp_path):
    ws.pipeline(SHARED_INPUTS)
    ws.write("steps/step.sh", 'cat "$1"; cat "$2"/a.txt "$2"/sub/b.txt\n')
    ws.write("lib/a.txt", "lib a\n")
    ws.write("lib/sub/b.txt", "lib b\n")
    ws.write("mod.py", "def f(ctx):\n"
                       "    text = ctx.upstream['step']['o'].read_text()\n"
                       "    ctx.outputs['o'].write_text(text.upper())\n")
    for item in SHARED_ITEMS:
        ws.write(f"in/{item}.txt", f"own input of {item}\n")
    ws.write("items.txt", "".join(f"{item}\n" for item in SHARED_ITEMS))
    ok(ws.cli("run", "--items", "items.txt", "--run-id", "r", "--store", str(tmp_path / "local")))
    from stagestore.store.store import Store

    local = Store.open(tmp_path / "local").manifests
    expected = {(item, stage): local.read("r", stage, item).output_hash
                for item in SHARED_ITEMS for stage in ("step", "called")}
    remote_url = f"file://{tmp_path / 'team'}"
    ok(ws.cli("remote", "add", "team", remote_url))
    env = {"STAGESTORE_SCRATCH": str(tmp_path / "scratch")}
    proc = ws.cli("run", "--items", "items.txt", "--run-id", "r", "--executor", "dask",
                  "--jobs", "2", "--remote", "team", "--push", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["status"] == "succeeded" and report["push"]["ok"], report
    driver = Store.open(ws.store).manifests
    assert {(item, stage): driver.read("r", stage, item).output_hash
            for item in SHARED_ITEMS for stage in ("step", "called")} == expected
    ok(ws.cli("verify"))
    # every item's results are on the remote: another store pulls the run and verifies
    other = tmp_path / "other"
    ok(ws.cli("--store", str(other), "remote", "add", "team", remote_url))
    ok(ws.cli("--store", str(other), "pull", "r"))
    ok(ws.cli("--store", str(other), "verify"))
    pulled = Store.open(other).manifests
    assert {(item, stage): pulled.read("r", stage, item).output_hash
            for item in SHARED_ITEMS for stage in ("step", "called")} == expected


def test_an_error_inside_an_item_task_is_one_line_without_dask_logs(ws, tmp_path):
    # The worker cannot create its scratch store (STAGESTORE_SCRATCH names a file): an error
    # raised inside the item's task.  The user sees stagestore's error, not Dask's log lines
    # ("distributed.worker - ERROR - Compute Failed ... Traceback: ...").
    _workspace(ws)
    ok(ws.cli("remote", "add", "team", f"file://{tmp_path / 'team'}"))
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    proc = ws.cli("run", "--items", "items.txt", "--run-id", "r", "--executor", "dask",
                  "--jobs", "2", "--remote", "team", "--push",
                  env={"STAGESTORE_SCRATCH": str(blocker)})
    assert proc.returncode != 0
    assert "distributed." not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(blocker) in errors[0], proc.stderr
