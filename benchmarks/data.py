"""Workloads: benchmark workspaces (stagestore.toml and dvc.yaml), and the large scale store.

Every workspace gets a copy of `stagecmd.py`, declared as the stage's `script` input, so
stagestore, DVC and the bare command all run the same code.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from .harness import run

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STAGECMD = HERE / "stagecmd.py"
EXAMPLE = REPO / "examples" / "docs-pipeline"

GiB = 1 << 30
MiB = 1 << 20


def human(size: int) -> str:
    if size >= GiB and size % GiB == 0:
        return f"{size // GiB} GiB"
    if size >= MiB and size % MiB == 0:
        return f"{size // MiB} MiB"
    return f"{size} B"


def _toml_value(value: object) -> str:
    # JSON strings, numbers and arrays of them are valid TOML values.
    return json.dumps(value)


def write_pipeline(ws: Path, stages: dict[str, dict[str, object]], name: str = "bench") -> Path:
    """A workspace folder holding stagecmd.py and a stagestore.toml with `stages`."""
    ws.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(STAGECMD, ws / "stagecmd.py")
    lines = ["[pipeline]", f"name = {_toml_value(name)}", 'version = "1"', ""]
    for stage, spec in stages.items():
        lines.append(f"[stages.{stage}]")
        for key, value in spec.items():
            if isinstance(value, dict):
                inner = ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items())
                lines.append(f"{key} = {{ {inner} }}")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    path = ws / "stagestore.toml"
    path.write_text("\n".join(lines))
    return path


def one_stage(ws: Path, args: Sequence[str], *, inputs: dict[str, str] | None = None,
              outputs: Sequence[str] = ("out",), stage: str = "produce") -> Path:
    """A one-stage pipeline running `python {inputs.script} ARGS...`."""
    all_inputs = {"script": "stagecmd.py", **(inputs or {})}
    return write_pipeline(ws, {stage: {
        "cmd": [sys.executable, "{inputs.script}", *map(str, args)],
        "inputs": all_inputs,
        "outputs": list(outputs),
    }})


# --- DVC ---------------------------------------------------------------------------------


def dvc_repo(repo: Path, dvc: str, env: dict[str, str], *, cache_type: str | None) -> None:
    """`dvc init --no-scm` in `repo`, then a config without analytics or update checks."""
    repo.mkdir(parents=True, exist_ok=True)
    run([dvc, "init", "--no-scm", "-q"], cwd=repo, env=env)
    config = ["[core]", "    no_scm = True", "    analytics = false", "    check_update = false"]
    if cache_type:
        config += ["[cache]", f"    type = {cache_type}"]
    (repo / ".dvc" / "config").write_text("\n".join(config) + "\n")


def dvc_yaml(repo: Path, stages: dict[str, dict[str, object]]) -> None:
    """A dvc.yaml; values are JSON-quoted, which YAML reads as the same strings."""
    lines = ["stages:"]
    for name, spec in stages.items():
        lines.append(f"  {name}:")
        lines.append(f"    cmd: {json.dumps(spec['cmd'])}")
        for key in ("deps", "outs"):
            if spec.get(key):
                lines.append(f"    {key}:")
                items: list[str] = spec[key]  # type: ignore[assignment]
                lines += [f"      - {json.dumps(item)}" for item in items]
    (repo / "dvc.yaml").write_text("\n".join(lines) + "\n")


def py_cmd(*args: object) -> str:
    return shlex.join([sys.executable, *map(str, args)])


def docs_pipeline_dvc(repo: Path) -> None:
    """The six stages of examples/docs-pipeline as a dvc.yaml: the same scripts, the same
    arguments (params.limit = 100; normalize's `lowercase` defaults to true without
    STAGESTORE_PARAMS), outputs under out/."""
    py = "python"
    dvc_yaml(repo, {
        "ingest": {"cmd": f"{py} steps/ingest.py corpus out/raw 100",
                   "deps": ["steps/ingest.py", "corpus"], "outs": ["out/raw"]},
        "normalize": {"cmd": f"{py} steps/normalize.py out/raw out/clean",
                      "deps": ["steps/normalize.py", "out/raw"], "outs": ["out/clean"]},
        "extract": {"cmd": f"{py} steps/extract.py out/clean out/terms out/links",
                    "deps": ["steps/extract.py", "out/clean"], "outs": ["out/terms", "out/links"]},
        "link": {"cmd": f"{py} steps/link.py out/links out/terms out/graph",
                 "deps": ["steps/link.py", "out/links", "out/terms"], "outs": ["out/graph"]},
        "index": {"cmd": f"{py} steps/index.py out/terms out/index",
                  "deps": ["steps/index.py", "out/terms", "out/links"], "outs": ["out/index"]},
        "serve": {"cmd": f"{py} steps/serve.py out/index out/graph queries.txt out/results",
                  "deps": ["steps/serve.py", "out/index", "out/graph", "queries.txt"],
                  "outs": ["out/results"]},
    })
    (repo / "out").mkdir(exist_ok=True)


# --- the scale store ---------------------------------------------------------------------


class ScaleStore:
    """A valid store of many small objects and many runs, written through stagestore's own
    record classes and layout, quickly: each run has one stage `produce` whose output is a
    folder (a tree) of `files_per_run` distinct small files, and empty logs.

    Objects are written straight into `objects/` (mode 0444, named by their BLAKE3) without
    fsync: this is benchmark data, and durability is not what is measured here.  Manifests
    and run records go through `ManifestStore`, as a run writes them.
    """

    def __init__(self, root: Path, files_per_run: int, file_size: int = 256) -> None:
        from stagestore.store.store import Store

        self.root = root
        self.files_per_run = files_per_run
        self.file_size = file_size
        self.store = Store.create(root)
        self.runs = 0
        self.objects = 0
        for i in range(256):
            (self.store.layout.objects / f"{i:02x}").mkdir(exist_ok=True)
        self.empty = ""

    def _put(self, data: bytes) -> str:
        from stagestore.store.hashing import digest_bytes

        digest = digest_bytes(data)
        path = self.store.layout.object_path(digest)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        except FileExistsError:
            return digest
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        self.objects += 1
        return digest

    def run_id(self, index: int) -> str:
        return f"scale-{index:05d}"

    def grow(self, total_runs: int) -> None:
        from stagestore.pipeline.keys import config_hash, input_hash
        from stagestore.store.layout import run_owner
        from stagestore.store.manifests import output_hash
        from stagestore.model.records import (ArtifactRef, AttemptLog, PipelineDef, PipelineMeta,
                                              PipelineRef, RunRecord, StageManifest, StageSpec,
                                              TreeEntry, TreeListing)
        from stagestore.store.trees import encode_tree

        pref = PipelineRef(name="scale", version="1")
        workdir = self.root.parent
        if not self.empty:
            self.empty = self._put(b"")  # every log: created with the first run that names it
        for index in range(self.runs, total_runs):
            run_id = self.run_id(index)
            owner = run_owner(run_id)
            entries = []
            total = 0
            for j in range(self.files_per_run):
                head = f"scale run {index} file {j}\n".encode()
                data = head + b"." * max(0, self.file_size - len(head))
                digest = self._put(data)
                entries.append(TreeEntry(path=f"f{j:05d}.txt", kind="file", size=len(data),
                                         hash=digest))
                total += len(data)
            tree = self._put(encode_tree(TreeListing(entries=entries)))
            spec = StageSpec(cmd=["produce", "{outputs.out}"], outputs=["out"],
                             params={"run": index})
            definition = PipelineDef(pipeline=PipelineMeta(name="scale"), stages={"produce": spec})
            outputs = {"out": ArtifactRef(hash=tree, size=total, kind="tree")}
            at = datetime.now(UTC)
            manifest = StageManifest(
                stage="produce", run_id=run_id, pipeline=pref, status="succeeded",
                input_hash=input_hash({}), config_hash=config_hash("produce", spec),
                output_hash=output_hash(outputs), inputs={}, outputs=outputs, started_at=at,
                finished_at=at, attempts=1,
                logs=[AttemptLog(attempt=1, stdout=self.empty, stderr=self.empty, exit_code=0,
                                 started_at=at, finished_at=at)])
            record = RunRecord(run_id=run_id, pipeline=pref,
                               pipeline_file=str(workdir / "stagestore.toml"),
                               workdir=str(workdir), definition=definition, selected=["produce"],
                               inputs={"produce": {}}, started_at=at, finished_at=at,
                               outcomes={"produce": "succeeded"}, status="succeeded")
            self.store.manifests.write_run(record, owner)
            self.store.manifests.write(manifest, owner)
        self.runs = max(self.runs, total_runs)
