"""Model-based: a hypothesis state machine over one store and one small pipeline.

The pipeline is the shell `linear` workload (make -> count -> report) whose `report` command
depends on a param, `tag`, that a rule edits by rewriting `stagestore.toml`.  Rules: run (a new
run id), edit the param, delete a manifest, corrupt an object (flip one byte in place), kill (a
forked child runs and `os._exit`s before durable operation N), recover, gc and verify.

The model knows, per run id, the param it was started with and so the output hash every stage
must record (from a fault-free run of the same pipeline in a clean reference store per param
value), whether the run completed or was interrupted, and which damage is pending: deleted
manifests and corrupted objects.  Checked:

* after every rule: every manifest of a modelled run that is present is a succeeded one with
  the model's output hash, a completed run has all its manifests but the deleted ones, and
  every succeeded manifest has every declared output;
* after verify: `ok` exactly when no damage is pending; the corrupted objects are exactly the
  `object_corrupt` findings; every deleted manifest is a `manifest_missing` finding, and every
  other finding is explained by pending damage;
* after recover: it reports success, `invariants.check_store` holds (objects sound, no temps,
  verify clean without warnings), every modelled run has the model's output hashes for every
  stage, interrupted runs are completed, and runs killed before their record are gone;
* after gc: no object that a record named before it ran is gone (invariant 7).

A documented limitation shapes the rules: objects are re-hashed only by verify and recover, so a
stage run while an object is corrupted may read the damaged bytes and store what it computes
from them as new, valid objects that recover cannot tell from good ones (docs/format.md,
"Silent corruption after commit").  Run and kill are therefore not taken while a corruption is
pending; the model is the user who recovers first.  Corruptions flip a bit of an ASCII byte, so
a damaged tree object stays valid UTF-8 (invalid UTF-8 is covered by
`test_regression_verify_reports_a_damaged_record_instead_of_crashing` in test_hostile.py).

Fast tier: 50 examples of up to 20 steps (about 30 s); `-m slow`: 300 examples of up to 50
steps.  On a failure hypothesis prints the steps and the seed to reproduce it (`print_blob=True`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from stagestore.store import durable
from stagestore.errors import StagestoreError
from stagestore.pipeline.model import load_pipeline
from stagestore.inspection.gc import gc
from stagestore.inspection.recover import recover
from stagestore.execution.runner import run
from stagestore.store.store import Store
from stagestore.store.trees import read_tree
from stagestore.inspection.verify import verify

sys.path.insert(0, str(Path(__file__).parent))
from invariants import check_complete_manifests, check_store, outputs_of, referenced  # noqa: E402

STAGES = ("make", "count", "report")
PARAMS = ("alpha", "beta", "gamma")
MAX_OPS = 170  # a full run of this pipeline makes about 160 durable operations

PIPELINE = """
[pipeline]
name = "model"

[stages.make]
cmd = "cp -r {inputs.src} {outputs.out} && echo made"
shell = true
inputs = { src = "data" }
outputs = ["out"]

[stages.count]
upstream = ["make"]
cmd = "ls {upstream.make.out} | wc -l > {outputs.n}"
shell = true
outputs = ["n"]

[stages.report]
upstream = ["count"]
cmd = "echo files=$(cat {upstream.count.n}) tag={params.tag} > {outputs.text}"
shell = true
outputs = ["text"]
params = { tag = "TAG" }
"""


def write_workspace(root: Path, tag: str) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    for i in range(2):
        (root / "data" / f"f{i}.txt").write_text(f"file {i}\n")
    path = root / "stagestore.toml"
    path.write_text(textwrap.dedent(PIPELINE).replace("TAG", tag))
    return path


_SCRATCH = Path(tempfile.mkdtemp(prefix="stagestore-model-ref-"))
atexit.register(shutil.rmtree, _SCRATCH, True)
_EXPECTED: dict[str, dict[str, str]] = {}


def expected(tag: str) -> dict[str, str]:
    """stage -> output_hash of a fault-free run with this tag, in a clean reference store."""
    if tag not in _EXPECTED:
        pipeline = load_pipeline(write_workspace(_SCRATCH / f"ws-{tag}", tag))
        store = Store.create(_SCRATCH / f"store-{tag}")
        assert run(pipeline, store, run_id="reference").ok
        found = outputs_of(store, "reference")
        _EXPECTED[tag] = {stage: found[(None, stage)] for stage in STAGES}
        assert all(_EXPECTED[tag].values())
    return _EXPECTED[tag]


def in_child(work, crash_at: int) -> int:  # noqa: ANN001
    """Run `work` in a forked child that ends with os._exit(99) right before durable operation
    `crash_at`; returns its exit code (0: finished first, 1: raised)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        seen = 0

        def hook(op: str, path: str) -> None:
            nonlocal seen
            seen += 1
            if seen == crash_at:
                os._exit(99)

        durable.set_fault_hook(hook)
        code = 0
        try:
            work()
        except BaseException:  # noqa: BLE001
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="stagestore-model-"))
        self.param = PARAMS[0]
        self.pipeline_file = write_workspace(self.tmp / "ws", self.param)
        self.store = Store.create(self.tmp / "store")
        self.runs: dict[str, list[str]] = {}  # run id -> [param, "complete" | "interrupted"]
        self.gone: set[str] = set()  # killed before their run record was written
        self.deleted: set[tuple[str, str]] = set()  # (run id, stage) whose manifest was removed
        self.corrupt: dict[str, bool] = {}  # damaged object -> whether it is a tree object
        self.serial = 0

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _new_run_id(self) -> str:
        self.serial += 1
        return f"r{self.serial}"

    def _expect_run(self, run_id: str) -> None:
        param = self.runs[run_id][0]
        got = outputs_of(self.store, run_id)
        want = {(None, stage): digest for stage, digest in expected(param).items()}
        assert got == want, f"run {run_id} (tag {param}): {got} != {want}"

    # --- rules ---

    @precondition(lambda self: not self.corrupt)
    @rule()
    def run_pipeline(self) -> None:
        run_id = self._new_run_id()
        report = run(load_pipeline(self.pipeline_file), self.store, run_id=run_id)
        assert report.ok, [s.failure for s in report.stages]
        self.runs[run_id] = [self.param, "complete"]
        self._expect_run(run_id)

    @rule(tag=st.sampled_from(PARAMS))
    def edit_param(self, tag: str) -> None:
        write_workspace(self.pipeline_file.parent, tag)
        self.param = tag

    @precondition(lambda self: any(state == "complete" and (rid, stage) not in self.deleted
                                   for rid, (_, state) in self.runs.items() for stage in STAGES))
    @rule(data=st.data())
    def delete_manifest(self, data: st.DataObject) -> None:
        choices = sorted((rid, stage) for rid, (_, state) in self.runs.items()
                         if state == "complete" for stage in STAGES
                         if (rid, stage) not in self.deleted)
        run_id, stage = data.draw(st.sampled_from(choices), label="manifest")
        self.store.layout.manifest_path(run_id, stage).unlink()
        self.deleted.add((run_id, stage))

    @rule(data=st.data())
    def corrupt_object(self, data: st.DataObject) -> None:
        candidates = []
        for digest, path in self.store.objects.scan():
            if digest is not None and digest not in self.corrupt and os.stat(path).st_size:
                candidates.append(digest)
        if not candidates:
            return
        digest = data.draw(st.sampled_from(sorted(candidates)), label="object")
        path = self.store.objects.path(digest)
        content = bytearray(path.read_bytes())
        ascii_at = [i for i, byte in enumerate(content) if byte < 0x80]
        if not ascii_at:
            return
        index = data.draw(st.sampled_from(ascii_at), label="byte")
        try:
            read_tree(self.store.objects, digest)
            is_tree = True
        except StagestoreError:
            is_tree = False
        content[index] ^= 1  # stays ASCII, so a tree object stays valid UTF-8
        os.chmod(path, 0o644)
        path.write_bytes(bytes(content))
        os.chmod(path, 0o444)
        self.corrupt[digest] = is_tree

    @precondition(lambda self: not self.corrupt)
    @rule(crash_at=st.one_of(st.integers(min_value=1, max_value=40),  # a cached run is ~30 ops
                             st.integers(min_value=1, max_value=MAX_OPS)))
    def kill(self, crash_at: int) -> None:
        run_id = self._new_run_id()
        pipeline = load_pipeline(self.pipeline_file)
        code = in_child(lambda: run(pipeline, self.store, run_id=run_id), crash_at)
        if code == 0:
            self.runs[run_id] = [self.param, "complete"]
            self._expect_run(run_id)
        elif code == 99:
            if self.store.layout.run_record_path(run_id).exists():
                self.runs[run_id] = [self.param, "interrupted"]
            else:
                self.gone.add(run_id)
        else:
            raise AssertionError(f"the killed run raised instead (exit {code})")

    @rule()
    def recover_store(self) -> None:
        report = recover(self.store)
        assert report.ok, report.unresolved
        check_store(self.store)
        for run_id, entry in self.runs.items():
            entry[1] = "complete"
            self._expect_run(run_id)
        for run_id in self.gone:
            assert not self.store.manifests.has_run(run_id), f"run {run_id} was never started"
        self.deleted.clear()
        self.corrupt.clear()

    @rule()
    def collect_garbage(self) -> None:
        present = set(self.store.objects.list())
        named = set(referenced(self.store)) & present
        try:
            gc(self.store)
        except StagestoreError as exc:
            # gc refuses when it cannot read a record: only a damaged tree object can cause that
            assert any(self.corrupt.values()), exc
            return
        after = set(self.store.objects.list())
        assert named <= after, f"invariant 7: gc removed named objects {sorted(named - after)[:3]}"
        for digest in [d for d in self.corrupt if d not in after]:
            del self.corrupt[digest]  # unreferenced, so collected: the damage went with it

    @rule()
    def verify_store(self) -> None:
        report = verify(self.store)
        problems = report.problems
        corrupt = {f.object for f in problems if f.kind == "object_corrupt"}
        assert corrupt == set(self.corrupt), (corrupt, self.corrupt)
        missing = {(f.run_id, f.stage) for f in problems if f.kind == "manifest_missing"}
        assert missing == self.deleted, (missing, self.deleted)
        trees = {digest for digest, is_tree in self.corrupt.items() if is_tree}
        for finding in problems:
            if finding.kind == "tree_invalid":
                assert finding.object in trees, finding
            elif finding.kind == "object_missing":
                # a damaged tree that still decodes may name objects that do not exist
                assert trees, finding
            else:
                assert finding.kind in ("object_corrupt", "manifest_missing"), finding
        assert report.ok == (not self.corrupt and not self.deleted), problems

    # --- after every rule ---

    @invariant()
    def manifests_match_the_model(self) -> None:
        for run_id, (param, state) in self.runs.items():
            for stage in STAGES:
                path = self.store.layout.manifest_path(run_id, stage)
                if (run_id, stage) in self.deleted:
                    assert not path.exists()
                    continue
                manifest = self.store.manifests.read_optional(run_id, stage)
                if manifest is None:
                    assert state == "interrupted", f"run {run_id} lost its {stage} manifest"
                    continue
                assert manifest.status == "succeeded"
                assert manifest.output_hash == expected(param)[stage], (run_id, stage, param)
        check_complete_manifests(self.store)


_SETTINGS = dict(deadline=None, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

TestStoreModel = StoreMachine.TestCase
TestStoreModel.settings = settings(max_examples=50, stateful_step_count=20, **_SETTINGS)


class SlowStoreMachine(StoreMachine):
    pass


TestStoreModelSlow = pytest.mark.slow(SlowStoreMachine.TestCase)
TestStoreModelSlow.settings = settings(max_examples=300, stateful_step_count=50, **_SETTINGS)
