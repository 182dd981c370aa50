"""Built-in stage kinds in real pipelines, through the CLI: checksum, compress, encrypt and
their inverses, passthrough, disabled stages, check, plan (docs/kinds.md).  The streaming
engine itself is tested in test_kinds.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import msgspec
import pytest

from stagestore.pipeline.model import load_pipeline
from stagestore.store.store import Store
from stagestore.inspection.verify import verify

KEY = "7f" * 32
OTHER_KEY = "a5" * 32

INGEST = """
import os, sys
src, out = sys.argv[1], sys.argv[2]
os.makedirs(os.path.join(out, "sub"))
for name in sorted(os.listdir(src)):
    data = open(os.path.join(src, name), "rb").read()
    open(os.path.join(out, name), "wb").write(data)
    open(os.path.join(out, "sub", name + ".copy"), "wb").write(data[::-1])
"""

ROUND_TRIP = """
[pipeline]
name = "kinds"

[stages.ingest]
cmd = ["python", "{inputs.script}", "{inputs.data}", "{outputs.docs}"]
inputs = { script = "ingest.py", data = "data" }
outputs = ["docs"]

[stages.sums]
kind = "checksum"
upstream = ["ingest"]
input = "{upstream.ingest.docs}"
outputs = ["sha256"]
algorithm = "sha256"

[stages.pack]
kind = "compress"
upstream = ["ingest"]
input = "{upstream.ingest.docs}"
outputs = ["packed"]
algorithm = "zstd"
params = { level = 9 }
chunk_size = "64KiB"
parallel = true

[stages.seal]
kind = "encrypt"
upstream = ["pack"]
input = "{upstream.pack.packed}"
outputs = ["sealed"]
key_env = "DOCS_KEY"

[stages.open]
kind = "decrypt"
upstream = ["seal"]
input = "{upstream.seal.sealed}"
outputs = ["opened"]
key_env = "DOCS_KEY"

[stages.unpack]
kind = "decompress"
upstream = ["open"]
input = "{upstream.open.opened}"
outputs = ["docs"]

[stages.debug]
kind = "passthrough"
upstream = ["unpack"]
input = "{upstream.unpack.docs}"
outputs = ["docs"]
"""


@pytest.fixture
def kws(ws):
    ws.write("ingest.py", INGEST)
    for i in range(5):
        ws.write(f"data/doc{i}.txt", f"document {i}\n" * (200 * (i + 1)))
    ws.pipeline(ROUND_TRIP)
    return ws


def _run(ws, *args: str, key: str | None = KEY) -> subprocess.CompletedProcess:
    env = {"DOCS_KEY": key} if key is not None else {}
    return ws.cli("run", *args, env=env)


def _manifest(ws, run_id: str, stage: str) -> dict:
    return json.loads((ws.store / "runs" / run_id / f"{stage}.json").read_text())


def test_a_round_trip_through_every_kind_restores_the_folder_byte_for_byte(kws):
    result = _run(kws, "--run-id", "r1")
    assert result.returncode == 0, result.stderr
    ingest, unpack, debug = (_manifest(kws, "r1", s) for s in ("ingest", "unpack", "debug"))
    # decompress(decrypt(encrypt(compress(folder)))) is the same tree object as the folder
    assert unpack["outputs"]["docs"] == ingest["outputs"]["docs"]
    # passthrough: the same object again, no process, no copy
    assert debug["outputs"]["docs"] == unpack["outputs"]["docs"] and debug["attempts"] == 0
    pack, seal = _manifest(kws, "r1", "pack"), _manifest(kws, "r1", "seal")
    assert pack["resources"]["bytes_in"] > pack["resources"]["bytes_out"] > 0
    assert seal["resources"]["peak_rss_bytes"] > 0
    assert verify(Store.open(kws.store)).ok


def test_the_sums_file_checks_with_sha256sum_in_the_checked_out_folder(kws, tmp_path):
    if shutil.which("sha256sum") is None:
        pytest.skip("sha256sum is not installed")
    assert _run(kws, "--run-id", "r1").returncode == 0
    for stage, out in (("ingest", tmp_path / "out"), ("sums", tmp_path / "sums")):
        result = kws.cli("checkout", "r1", stage, "--to", str(out))
        assert result.returncode == 0, result.stderr
    sums = (tmp_path / "sums" / "sha256").read_text()
    assert "sub/doc0.txt.copy" in sums
    check = subprocess.run(["sha256sum", "-c", str(tmp_path / "sums" / "sha256")],
                           cwd=tmp_path / "out" / "docs", capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count(": OK") == 10


def test_a_rerun_reuses_every_kind_and_a_new_key_reruns_only_what_it_touches(kws):
    assert _run(kws, "--run-id", "r1").returncode == 0
    again = _run(kws, "--run-id", "r2", "--json")
    assert again.returncode == 0, again.stderr
    outcomes = {s["stage"]: s["outcome"] for s in json.loads(again.stdout)["stages"]}
    assert outcomes == {"ingest": "cached", "sums": "cached", "pack": "cached", "seal": "cached",
                        "open": "cached", "unpack": "cached", "debug": "succeeded"}
    rekeyed = _run(kws, "--run-id", "r3", "--json", key=OTHER_KEY)
    assert rekeyed.returncode == 0, rekeyed.stderr
    outcomes = {s["stage"]: s["outcome"] for s in json.loads(rekeyed.stdout)["stages"]}
    assert outcomes["seal"] == outcomes["open"] == "succeeded"  # new key id, new config hash
    assert outcomes["pack"] == "cached"
    # decrypt gives the same bytes back, so everything after it is reused
    assert outcomes["unpack"] == "cached"


def test_the_key_is_never_written_into_the_store(kws):
    assert _run(kws, "--run-id", "r1").returncode == 0
    key_bytes = bytes.fromhex(KEY)
    for folder, _, files in os.walk(kws.store):
        for name in files:
            data = open(os.path.join(folder, name), "rb").read()
            assert KEY.encode() not in data and key_bytes not in data, name


def test_a_missing_key_fails_the_stage_with_a_message_naming_the_variable(kws):
    result = _run(kws, "--run-id", "r1", key=None)
    assert result.returncode == 1
    assert "DOCS_KEY" in result.stderr and "Traceback" not in result.stderr
    seal = kws.cli("check", env={})
    assert seal.returncode == 2 and "DOCS_KEY" in seal.stderr


def test_decrypting_a_tampered_input_is_a_validation_failure(ws):
    ws.write("ingest.py", INGEST)
    ws.write("data/a.txt", "secret\n" * 1000)
    ws.pipeline("""
        [pipeline]
        name = "tamper"

        [stages.seal]
        kind = "encrypt"
        inputs = { plain = "data/a.txt" }
        input = "{inputs.plain}"
        outputs = ["sealed"]
        key_env = "DOCS_KEY"
    """)
    assert _run(ws, "--run-id", "r1").returncode == 0
    sealed = _manifest(ws, "r1", "seal")["outputs"]["sealed"]["hash"].split(":")[1]
    data = bytearray((ws.store / "objects" / sealed[:2] / sealed[2:]).read_bytes())
    data[len(data) // 2] ^= 1
    ws.write("sealed.bin", "")
    (ws.root / "sealed.bin").write_bytes(bytes(data))
    ws.pipeline("""
        [pipeline]
        name = "tamper"

        [stages.open]
        kind = "decrypt"
        inputs = { sealed = "sealed.bin" }
        input = "{inputs.sealed}"
        outputs = ["plain"]
        key_env = "DOCS_KEY"
    """)
    result = _run(ws, "--run-id", "r2", "--json")
    assert result.returncode == 1
    failure = json.loads(result.stdout)["stages"][0]["failure"]
    assert failure["class"] == "ValidationFailure" and failure["category"] == "validation"
    assert "tampered" in failure["signal"] or "wrong key" in failure["signal"]


def test_a_checksum_against_expected_sums_names_each_mismatch(ws):
    ws.write("data/a.txt", "alpha\n")
    ws.write("data/b.txt", "beta\n")
    ws.write("expected.sha256",
             "0" * 64 + "  a.txt\n"
             "f0d3b8e0a3fbd1c2e4a5d7b29c3a1b8e2f4a6c8d0e2f4a6b8c0d2e4f6a8b0c2d  b.txt\n")
    ws.pipeline("""
        [pipeline]
        name = "expect"

        [stages.sums]
        kind = "checksum"
        inputs = { data = "data", sums = "expected.sha256" }
        input = "{inputs.data}"
        expect = "{inputs.sums}"
        outputs = ["sha256"]
        algorithm = "sha256"
    """)
    result = ws.cli("run", "--run-id", "r1", "--json")
    assert result.returncode == 1
    failure = json.loads(result.stdout)["stages"][0]["failure"]
    assert failure["class"] == "ValidationFailure"
    assert "a.txt" in failure["signal"] and "b.txt" in failure["signal"]


DISABLED = """
[pipeline]
name = "disabled"

[stages.make]
cmd = ["python", "-c", "import sys; open(sys.argv[1], 'w').write('x' * 5000)", "{outputs.raw}"]
outputs = ["raw"]

[stages.pack]
kind = "compress"
upstream = ["make"]
input = "{upstream.make.raw}"
outputs = ["packed"]
enabled = false

[stages.copy]
upstream = ["pack"]
cmd = ["python", "-c", "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])",
       "{upstream.pack.packed}", "{outputs.out}"]
outputs = ["out"]

[stages.note]
cmd = ["python", "-c", "import sys; open(sys.argv[1], 'w').write('n')", "{outputs.n}"]
outputs = ["n"]
enabled = false

[stages.after_note]
upstream = ["note"]
cmd = ["python", "-c", "import sys; open(sys.argv[1], 'w').write('a')", "{outputs.a}"]
outputs = ["a"]
"""


def test_a_disabled_kind_passes_its_input_through_and_a_disabled_command_skips_dependents(ws):
    ws.pipeline(DISABLED)
    result = ws.cli("run", "--run-id", "r1", "--json")
    assert result.returncode == 4, result.stderr  # degraded: a dependent was skipped
    stages = {s["stage"]: s for s in json.loads(result.stdout)["stages"]}
    assert stages["pack"]["outcome"] == "disabled" and stages["note"]["outcome"] == "disabled"
    assert stages["copy"]["outcome"] == "succeeded"
    assert stages["after_note"]["outcome"] == "skipped"
    assert stages["after_note"]["reason"] == "upstream stage 'note' is disabled (enabled = false)"
    make, pack, copy = (_manifest(ws, "r1", s) for s in ("make", "pack", "copy"))
    assert pack["status"] == "disabled" and pack["outputs"]["packed"] == make["outputs"]["raw"]
    assert copy["outputs"]["out"]["hash"] == make["outputs"]["raw"]["hash"]
    assert _manifest(ws, "r1", "note")["outputs"] == {}
    record = json.loads((ws.store / "runs" / "r1" / "_run.json").read_text())
    assert record["outcomes"]["pack"] == "disabled"
    assert verify(Store.open(ws.store)).ok

    # re-enabling needs no other change: the compressor runs and copy sees its output
    ws.pipeline(DISABLED.replace("enabled = false\n\n[stages.copy]", "\n[stages.copy]"))
    result = ws.cli("run", "--run-id", "r2", "--json")
    stages = {s["stage"]: s for s in json.loads(result.stdout)["stages"]}
    assert stages["pack"]["outcome"] == "succeeded"
    packed = _manifest(ws, "r2", "pack")["outputs"]["packed"]
    assert packed["size"] < 5000 and _manifest(ws, "r2", "copy")["outputs"]["out"] == packed


COMPAT = """
[pipeline]
name = "compat"

[stages.seal]
kind = "encrypt"
inputs = { data = "data.bin" }
input = "{inputs.data}"
outputs = ["sealed"]
key_env = "DOCS_KEY"

[stages.look]
kind = "passthrough"
upstream = ["seal"]
input = "{upstream.seal.sealed}"
outputs = ["same"]

[stages.pack]
kind = "compress"
upstream = ["look"]
input = "{upstream.look.same}"
outputs = ["packed"]

[stages.again]
kind = "compress"
upstream = ["pack"]
input = "{upstream.pack.packed}"
outputs = ["twice"]
"""


def test_check_warns_about_compressing_encrypted_data_and_compressing_twice(ws):
    ws.write("data.bin", "payload\n" * 100)
    ws.pipeline(COMPAT)
    env = {"DOCS_KEY": KEY}
    result = ws.cli("check", env=env)
    assert result.returncode == 0, result.stderr
    assert "stage 'pack' compresses the output of 'seal', which is encrypted" in result.stderr
    assert "stage 'again' compresses the output of 'pack', which is already compressed" \
        in result.stderr
    assert "2 warnings" in result.stdout
    assert ws.cli("check", "--strict", env=env).returncode == 2
    refused = ws.cli("run", "--strict", env=env)
    assert refused.returncode == 2 and not (ws.store / "runs").exists()
    report = json.loads(ws.cli("check", "--json", env=env).stdout)
    assert [w["stages"] for w in report["warnings"]] == [["seal", "pack"], ["pack", "again"]]


def test_decompressing_in_between_makes_a_second_compression_fine(ws):
    from stagestore.pipeline.kindspec import compatibility

    ws.write("data.bin", "x")
    ws.pipeline("""
        [pipeline]
        name = "ok"

        [stages.pack]
        kind = "compress"
        inputs = { data = "data.bin" }
        input = "{inputs.data}"
        outputs = ["packed"]

        [stages.unpack]
        kind = "decompress"
        upstream = ["pack"]
        input = "{upstream.pack.packed}"
        outputs = ["plain"]

        [stages.repack]
        kind = "compress"
        upstream = ["unpack"]
        input = "{upstream.unpack.plain}"
        outputs = ["packed"]
        algorithm = "xz"

        [stages.off]
        kind = "compress"
        upstream = ["repack"]
        input = "{upstream.repack.packed}"
        outputs = ["packed"]
        enabled = false
    """)
    assert compatibility(load_pipeline(ws.pipeline_file).stages) == []


@pytest.mark.parametrize(("body", "message"), [
    ('kind = "compress"\noutputs = ["a", "b"]\ninput = "{inputs.d}"',
     "produces exactly one output"),
    ('kind = "compress"\noutputs = ["a"]', "needs `input`"),
    ('kind = "compress"\noutputs = ["a"]\ninput = "x{inputs.d}"', "exactly one placeholder"),
    ('kind = "compress"\noutputs = ["a"]\ninput = "{inputs.nope}"', "undeclared input"),
    ('kind = "compress"\noutputs = ["a"]\ninput = "{inputs.d}"\nchunk_size = "101MiB"',
     "100 MiB"),
    ('kind = "compress"\noutputs = ["a"]\ninput = "{inputs.d}"\nparams = { level = 23 }',
     "level"),
    ('kind = "encrypt"\noutputs = ["a"]\ninput = "{inputs.d}"', "key_env"),
    ('kind = "transform"\noutputs = ["a"]\ninput = "{inputs.d}"', "call"),
    ('kind = "compress"\ncmd = "true"\noutputs = ["a"]\ninput = "{inputs.d}"', "no `cmd`"),
])
def test_a_kind_stage_is_validated_with_a_message_naming_the_problem(ws, body, message):
    ws.write("d.txt", "d")
    ws.pipeline(f'[pipeline]\nname = "v"\n\n[stages.k]\ninputs = {{ d = "d.txt" }}\n{body}\n')
    result = ws.cli("check")
    assert result.returncode == 2, result.stdout
    assert message in result.stderr and "$.stages.k" in result.stderr
    assert "Traceback" not in result.stderr


PLAN = """
[pipeline]
name = "plan"

[stages.pack]
kind = "compress"
inputs = { data = "data.bin" }
input = "{inputs.data}"
outputs = ["packed"]
algorithm = "gzip"
chunk_size = "1MiB"

[stages.seal]
kind = "encrypt"
upstream = ["pack"]
input = "{upstream.pack.packed}"
outputs = ["sealed"]
key_env = "DOCS_KEY"
"""


def _half_compressible(size: int) -> bytes:
    """Half random, half zeros: compresses to about half, whatever the seed."""
    return b"".join(os.urandom(4096) + bytes(4096) for _ in range(size // 8192))


def test_plan_estimates_from_history_within_twice_the_measured_figures(ws):
    """Output bytes and peak memory within 2x of what the next run measures; the duration is
    the recorded throughput applied to the new input."""
    env = {"DOCS_KEY": KEY}
    (ws.root / "data.bin").write_bytes(_half_compressible(16 << 20))
    ws.pipeline(PLAN)
    before = json.loads(ws.cli("plan", "--json", env=env).stdout)
    assert [s["action"] for s in before["stages"]] == ["run", "run"]
    assert before["stages"][0]["basis"] == "defaults (no earlier run)"
    assert ws.cli("run", "--run-id", "r1", env=env).returncode == 0
    assert json.loads(ws.cli("plan", "--json", env=env).stdout)["stages"][0]["action"] == "reuse"

    (ws.root / "data.bin").write_bytes(_half_compressible(16 << 20))  # new bytes, same size
    estimate = {s["stage"]: s for s in json.loads(ws.cli("plan", "--json", env=env).stdout)["stages"]}
    assert estimate["pack"]["basis"] == "1 earlier run"
    assert ws.cli("run", "--run-id", "r2", env=env).returncode == 0
    for stage in ("pack", "seal"):
        measured = _manifest(ws, "r2", stage)["resources"]
        planned = estimate[stage]
        assert measured["bytes_out"] / 2 <= planned["output_bytes"] <= measured["bytes_out"] * 2
        assert measured["peak_rss_bytes"] / 2 <= planned["memory_bytes"] \
            <= measured["peak_rss_bytes"] * 2
        # Duration: the first run's throughput applied to this input, exactly.  How close
        # that comes to the next run's time is the machine's timing noise (tens of ms here),
        # so it is not asserted: docs/performance.md's rule, no timed assertions in tests.
        history = _manifest(ws, "r1", stage)["resources"]
        rate = history["bytes_in"] / history["seconds"]
        assert planned["seconds"] == pytest.approx(planned["input_bytes"] / rate, abs=1e-3)


def test_plan_prints_a_table_and_runs_without_a_store(ws):
    (ws.root / "data.bin").write_bytes(b"x" * 1000)
    ws.pipeline(PLAN)
    result = ws.cli("plan", env={"DOCS_KEY": KEY})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split()[:3] == ["stage", "action", "input"]
    assert "defaults (no earlier run)" in result.stdout
    assert not ws.store.exists()


def test_the_builder_makes_kind_stages_that_round_trip(ws):
    from stagestore import Pipeline

    ws.write("data.bin", "x")
    built = (Pipeline("b", workdir=ws.root)
             .stage("pack", kind="compress", inputs={"data": "data.bin"}, input="{inputs.data}",
                    outputs=["packed"], algorithm="zstd", params={"level": 3},
                    chunk_size="1MiB", parallel=True)
             .stage("look", kind="passthrough", upstream=["pack"],
                    input="{upstream.pack.packed}", outputs=["same"], enabled=False)
             .validate())
    assert Pipeline.from_toml(built.to_toml(), workdir=ws.root) == built


def test_manifests_of_kind_stages_decode_as_records(kws):
    from stagestore.model.records import StageManifest

    assert _run(kws, "--run-id", "r1").returncode == 0
    for stage in ("sums", "pack", "seal", "open", "unpack", "debug"):
        raw = (kws.store / "runs" / "r1" / f"{stage}.json").read_bytes()
        assert msgspec.json.decode(raw, type=StageManifest).stage == stage


def test_a_transform_stage_applies_its_workspace_function_and_reruns_when_it_changes(ws):
    ws.write("upper.py", "def chunk(data):\n    return data.upper()\n")
    (ws.root / "text.txt").write_bytes(b"abc\n" * 50000)
    ws.pipeline("""
        [pipeline]
        name = "transform"

        [stages.shout]
        kind = "transform"
        call = "upper:chunk"
        inputs = { text = "text.txt" }
        input = "{inputs.text}"
        outputs = ["loud"]
        chunk_size = "4KiB"
        parallel = true
        workers = 2
    """)
    first = ws.cli("run", "--run-id", "r1", "--json")
    assert first.returncode == 0, first.stderr
    loud = _manifest(ws, "r1", "shout")
    assert "inputs._code" in loud["inputs"]  # the function's module is an input
    out = ws.root / "out"
    assert ws.cli("checkout", "r1", "shout", "--to", str(out)).returncode == 0
    assert (out / "loud").read_bytes() == b"ABC\n" * 50000
    ws.write("upper.py", "def chunk(data):\n    return data.upper()[::-1]\n")
    second = ws.cli("run", "--run-id", "r2", "--json")
    assert json.loads(second.stdout)["stages"][0]["outcome"] == "succeeded"
    assert _manifest(ws, "r2", "shout")["outputs"] != loud["outputs"]


def test_kind_stages_run_per_item_each_on_its_own_input(ws):
    """An item run through encrypt and decrypt: each item reads its own input and gets its own
    manifests; a new key makes every item's encrypt stage run again."""
    for item in ("a", "b", "c"):
        ws.write(f"data/{item}.txt", f"item {item}\n" * 500)
    ws.write("items.txt", "a\nb\nc\n")
    ws.pipeline("""
        [pipeline]
        name = "per-item"

        [stages.seal]
        kind = "encrypt"
        inputs = { plain = "data/{item}.txt" }
        input = "{inputs.plain}"
        outputs = ["sealed"]
        key_env = "DOCS_KEY"

        [stages.open]
        kind = "decrypt"
        upstream = ["seal"]
        input = "{upstream.seal.sealed}"
        outputs = ["plain"]
        key_env = "DOCS_KEY"
    """)
    result = _run(ws, "--run-id", "r1", "--items", "items.txt", "--json")
    assert result.returncode == 0, result.stderr
    for item in ("a", "b", "c"):
        opened = json.loads(Store.open(ws.store).manifests.read_bytes("r1", "open", item))
        digest = opened["outputs"]["plain"]["hash"].split(":")[1]
        stored = (ws.store / "objects" / digest[:2] / digest[2:]).read_bytes()
        assert stored == (ws.root / "data" / f"{item}.txt").read_bytes()
    # the same items with another key: every stage runs again, nothing is reused wrongly
    again = _run(ws, "--run-id", "r2", "--items", "items.txt", "--json", key=OTHER_KEY)
    assert again.returncode == 0, again.stderr
    stages = [s for i in json.loads(again.stdout)["items"] for s in i["stages"]]
    assert {s["outcome"] for s in stages if s["stage"] == "seal"} == {"succeeded"}


def test_the_kinds_example_runs_and_gives_the_folder_back(tmp_path):
    """examples/kinds, as `make demo` runs it: valid with no warnings, and `unpack` is the same
    tree object as the delivery folder it started from."""
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "kinds"
    ws_root = tmp_path / "kinds"
    shutil.copytree(example, ws_root)
    env = dict(os.environ, DEMO_KEY="00" * 32)
    env.pop("STAGESTORE_STORE", None)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "stagestore", *args], cwd=ws_root, env=env,
                              capture_output=True, text=True, timeout=120)

    checked = cli("check")
    assert checked.returncode == 0 and "0 warnings" in checked.stdout, checked.stderr
    ran = cli("run", "--run-id", "r1", "--json")
    assert ran.returncode == 0, ran.stderr
    outcomes = {s["stage"]: s["outcome"] for s in json.loads(ran.stdout)["stages"]}
    assert outcomes["inspect"] == "disabled" and outcomes["unpack"] == "succeeded"
    store = Store.open(ws_root / ".stagestore")
    unpack = store.manifests.read("r1", "unpack")
    from stagestore.store.trees import hash_artifact

    assert unpack.outputs["delivery"] == hash_artifact(ws_root / "data", "data")
