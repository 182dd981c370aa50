"""Running one attempt of one stage and committing what it produced.

An attempt gets a fresh folder `tmp/<owner>~<random>~<stage>.<attempt>/` holding

* `in/`: read-only views of its file inputs (hard links to objects) and of a `call` stage's
  own code,
* `out/`: where the command must create each declared output (`STAGESTORE_OUT`),
* `stdout`, `stderr`: what the command printed.

A folder input, or an upstream output that is a folder, is handed over as the store's shared
view of its tree (`views/<tree hex>/tree`, store/views.py): built once, reused by every
attempt that reads that tree, watched while the command runs, and checked afterwards at a cost
per folder, not per file.

The command runs through `processes.run_group` (its own process group, guarded by the
process's watchdog).  Then the stage's checks run (`gates`), and a failure gets its class and category
(`classify.classify`).  On success each declared output is moved into `objects/` by rename;
nothing is copied except files with other hard links.  The folder is removed whatever happens;
if the runner dies first, the folder is an orphan for `recover`.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import OutputError, StagestoreError
from ..model.failures import (BUILD_FAILURE, DISK_FULL, INPUT_EMPTY, INPUT_MISSING, INPUT_MODIFIED,
                              KILLED, LAUNCH, OUTPUT_INVALID, OUTPUT_MISSING, TIMEOUT, VALIDATION)
from ..model.records import ArtifactRef, AttemptLog, Failure, Resources, StageSpec, now
from ..pipeline.model import CODE_INPUT
from ..pipeline.syntax import Placeholder, command_template, render
from ..store import durable
from ..store.hashing import hash_file
from ..store.layout import TMP_SEP
from ..store.objects import ObjectStore, SyncBatch
from ..store.trees import materialize, read_tree, store_tree
from ..store.views import ViewLease, ViewStore
from .classify import classify
from .gates import run_checks
from .processes import StopToken, run_group
from .inputs import StageInputs

LARGE_OUTPUT = 64 << 20  # outputs this big get a progress note while they are hashed and stored
SIGNAL_LINES = 20
SIGNAL_CHARS = 2000

CLASSIFY_BYTES = 1 << 20  # the tail of stderr that classify rules search


KIND_STATS = "kind-stats.json"  # in the attempt folder: what a built-in kind measured
KIND_VALIDATION_EXIT = 3  # stagestore.execution.kindstage: the data failed a check (ValidationFailure)


class AttemptResult:
    def __init__(self, log: AttemptLog, outputs: dict[str, ArtifactRef] | None,
                 failure: Failure | None, warnings: list[str],
                 resources: Resources | None = None) -> None:
        self.log = log
        self.outputs = outputs
        self.failure = failure  # classified: class, category, domain
        self.warnings = warnings  # failed non-critical checks, in sampling mode
        self.resources = resources  # built-in kinds: what the attempt measured


# --- one attempt ---------------------------------------------------------------------------


class Attempt:
    def __init__(self, *, objects: ObjectStore, owner: str, folder: Path, workdir: Path,
                 run_id: str, stage: str, spec: StageSpec, inputs: StageInputs, number: int,
                 item: str | None = None, sampling: bool = False,
                 note: Callable[[str], None] | None = None,
                 stop: StopToken | None = None) -> None:
        self.stop = stop if stop is not None else StopToken()  # the run's: see processes.py
        self.note = note or (lambda message: None)
        self.item = item
        self.sampling = sampling
        self.objects = objects
        self.owner = owner
        self.folder = folder
        self.workdir = workdir
        self.run_id = run_id
        self.stage = stage
        self.spec = spec
        self.inputs = inputs
        self.number = number
        self.in_dir = folder / "in"
        self.out_dir = folder / "out"
        self.stdout_path = folder / "stdout"
        self.stderr_path = folder / "stderr"
        self._linked: dict[Path, tuple[str, tuple[int, int, int, int]]] = {}
        self._leases: list[tuple[str, ViewLease]] = []  # (what, lease) of each folder handed over
        self._files: dict[str, int] = {}  # tree digest -> how many files it holds

    # paths the command sees

    def _tree_view(self, ref: ArtifactRef, what: str) -> Path:
        """The shared, watched view of a folder (store/views.py); `what` names its role."""
        scope = f"{self.stage}/{self.item}" if self.item is not None else self.stage
        lease = ViewStore(self.objects).lease(
            ref.hash, f"{self.folder.name}{TMP_SEP}{len(self._leases)}", self.owner,
            f"{scope}/{what}")
        self._leases.append((what, lease))
        self._files[ref.hash] = lease.files
        return lease.path

    def _view(self, ref: ArtifactRef, dest: Path) -> Path:
        """A private view, in the attempt folder: a file (one hard link), or the code of a
        `call` stage (imported from there, so it keeps its own name)."""
        if ref.kind == "tree":
            listing = read_tree(self.objects, ref.hash)
            materialize(listing, self.objects, dest, link=True)
            for entry in listing.entries:
                if entry.kind == "file" and not entry.executable and entry.hash is not None:
                    self._watch(dest / entry.path, entry.hash)
        else:
            durable.temp_link(self.objects.path(ref.hash), dest)
            self._watch(dest, ref.hash)
        return dest

    def _watch(self, path: Path, digest: str) -> None:
        self._linked[path] = (digest, _fingerprint(path))

    def prepare(self) -> dict[str, str]:
        """Lay out the attempt folder; returns the placeholder values."""
        durable.temp_dir(self.folder)
        durable.temp_dir(self.in_dir)
        durable.temp_dir(self.out_dir)
        values: dict[str, str] = {"run_id": self.run_id}
        if self.item is not None:
            values["item"] = self.item
        if self.inputs.workspace:
            durable.temp_dir(self.in_dir / "inputs")
        for name, ref in self.inputs.workspace.items():
            if name == CODE_INPUT:
                durable.temp_dir(self.in_dir / "code")
                self._view(ref, self.in_dir / "code" / self.inputs.basenames[name])
                continue
            if ref.kind == "tree":
                path = self._tree_view(ref, f"inputs.{name}")
            else:
                durable.temp_dir(self.in_dir / "inputs" / name)
                path = self._view(ref, self.in_dir / "inputs" / name / self.inputs.basenames[name])
            values[f"inputs.{name}"] = str(path)
        if self.inputs.upstream:
            durable.temp_dir(self.in_dir / "upstream")
        for up, outputs in self.inputs.upstream.items():
            durable.temp_dir(self.in_dir / "upstream" / up)
            for name, ref in outputs.items():
                values[f"upstream.{up}.{name}"] = str(
                    self._tree_view(ref, f"upstream.{up}.{name}") if ref.kind == "tree"
                    else self._view(ref, self.in_dir / "upstream" / up / name))
        for name in self.spec.outputs:
            values[f"outputs.{name}"] = str(self.out_dir / name)
        for key, value in self.spec.params.items():
            values[f"params.{key}"] = value if isinstance(value, str) else json.dumps(value, default=str)
        return values

    def _resolve(self, values: dict[str, str]):  # noqa: ANN202
        def resolve(ref: Placeholder) -> str:
            key = ref.kind if ref.kind in ("run_id", "item") else (
                f"upstream.{ref.stage}.{ref.name}" if ref.kind == "upstream" else f"{ref.kind}.{ref.name}")
            return values[key]
        return resolve

    def argv(self, values: dict[str, str], template: list[str] | None = None) -> list[str]:
        if self.spec.kind is not None and template is None:
            return self._kind_argv(values)
        if self.spec.call is not None and template is None:
            context = {
                "call": self.spec.call, "run_id": self.run_id, "stage": self.stage,
                "item": self.item,
                "workdir": str(self.workdir), "out_dir": str(self.out_dir),
                "params": self.spec.params,
                "inputs": {n: values[f"inputs.{n}"] for n in self.inputs.workspace
                           if n != CODE_INPUT},
                "code_dir": str(self.in_dir / "code") if CODE_INPUT in self.inputs.workspace else None,
                "upstream": {up: {n: values[f"upstream.{up}.{n}"] for n in outs}
                             for up, outs in self.inputs.upstream.items()},
                "outputs": {n: values[f"outputs.{n}"] for n in self.spec.outputs},
            }
            context_path = self.folder / "context.json"
            durable.write_temp(context_path, json.dumps(context, default=str).encode())
            return [sys.executable, "-m", "stagestore.execution.callstage", str(context_path)]
        shell = self.spec.shell if template is None else False
        template = command_template(self.spec) if template is None else template
        resolve = self._resolve(values)
        if shell:
            import shlex

            quoted = {key: shlex.quote(value) for key, value in values.items()}
            return ["/bin/sh", "-c", render(template[0], self._resolve(quoted))]
        return [render(arg, resolve) for arg in template]

    def _kind_argv(self, values: dict[str, str]) -> list[str]:
        """`python -m stagestore.execution.kindstage CONTEXT.json` (docs/kinds.md); the key itself stays
        in the environment or its file, never in the context."""
        spec = self.spec
        resolve = self._resolve(values)
        context = {
            "kind": spec.kind, "algorithm": spec.algorithm, "params": spec.params,
            "chunk_size": spec.chunk_size, "parallel": spec.parallel, "workers": spec.workers,
            "call": spec.call, "key_env": spec.key_env, "key_file": spec.key_file,
            "src": render(spec.input or "", resolve),
            "expect": render(spec.expect, resolve) if spec.expect is not None else None,
            "dest": values[f"outputs.{spec.outputs[0]}"],
            "workdir": str(self.workdir),
            "code_dir": str(self.in_dir / "code") if CODE_INPUT in self.inputs.workspace else None,
            "stats": str(self.folder / KIND_STATS),
        }
        context_path = self.folder / "context.json"
        durable.write_temp(context_path, json.dumps(context, default=str).encode())
        return [sys.executable, "-m", "stagestore.execution.kindstage", str(context_path)]

    def _kind_resources(self) -> Resources | None:
        """What the kind's process wrote to `kind-stats.json`; None for other stages, or when
        the file is missing or malformed (the measurement is a hint for `plan`, not a result)."""
        if self.spec.kind is None:
            return None
        import msgspec

        try:
            return msgspec.json.decode((self.folder / KIND_STATS).read_bytes(), type=Resources)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return None

    def environment(self) -> dict[str, str]:
        # Anything added here that can differ between two stages or items must enter a key
        # (keys.py), or a result is reused where it does not fit; the stage, item and params are
        # in the keys, the run id, attempt and paths are documented as not to be depended on
        # (docs/stages.md#what-is-in-the-key).  The same holds for the call and kind contexts.
        env = dict(os.environ)
        env.update(self.spec.env)
        env.update({
            "STAGESTORE_RUN_ID": self.run_id,
            "STAGESTORE_STAGE": self.stage,
            "STAGESTORE_OUT": str(self.out_dir),
            "STAGESTORE_PARAMS": json.dumps(self.spec.params, default=str, sort_keys=True),
            "STAGESTORE_ATTEMPT": str(self.number),
        })
        if self.item is not None:
            env["STAGESTORE_ITEM"] = self.item
        return env

    def execute(self, batch: SyncBatch) -> AttemptResult:
        started = now()
        failure: Failure | None = None
        exit_code: int | None = None
        outputs: dict[str, ArtifactRef] | None = None
        warnings: list[str] = []
        try:
            try:
                values = self.prepare()
            except (StagestoreError, FileNotFoundError) as exc:
                failure = Failure(class_=INPUT_MISSING, signal=(
                    f"cannot lay out the stage's inputs: {getattr(exc, 'message', exc)}; "
                    "run `stagestore verify`"))
            if failure is None:
                failure = self._entry_check()
            if failure is None:
                exit_code, failure = self._spawn(self.argv(values))
                if failure is not None and self.spec.kind is not None \
                        and exit_code == KIND_VALIDATION_EXIT:
                    failure = Failure(class_=VALIDATION, signal=failure.signal,
                                      exit_code=exit_code)
                # Checked whatever the exit code: a failing stage may have damaged an input too.
                failure = self._inputs_unchanged() or failure
            if failure is None:
                failure, warnings = run_checks(self, values, _tail_lines)
            if failure is None:
                outputs, failure = self._commit_outputs(batch)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            failure = Failure(class_=DISK_FULL, signal=f"{exc.strerror}: {exc.filename}")
        if failure is not None:
            failure = classify(self.spec, failure, self._stderr_tail(CLASSIFY_BYTES))
        stdout_digest, stderr_digest = self._commit_logs(batch)
        log = AttemptLog(attempt=self.number, stdout=stdout_digest, stderr=stderr_digest,
                         exit_code=exit_code, started_at=started, finished_at=now(), failure=failure)
        return AttemptResult(log, outputs if failure is None else None, failure, warnings,
                             self._kind_resources() if failure is None else None)

    def _entry_check(self) -> Failure | None:
        for name, ref in self.inputs.workspace.items():
            if ref.kind == "tree" and name not in self.spec.allow_empty and name != CODE_INPUT:
                files = self._files.get(ref.hash)
                if files is None:
                    files = sum(e.kind == "file" for e in read_tree(self.objects, ref.hash).entries)
                if not files:
                    return Failure(class_=INPUT_EMPTY, signal=(
                        f"input {name!r} ({self.spec.inputs.get(name, '?')}) is an empty folder; "
                        f"add files to it, or list it in `allow_empty` if empty is fine"))
        return None

    def _spawn(self, argv: list[str]) -> tuple[int | None, Failure | None]:
        with os.fdopen(durable.create_exclusive(self.stdout_path), "wb") as out, \
                os.fdopen(durable.create_exclusive(self.stderr_path), "wb") as err:
            try:
                code = run_group(argv, cwd=self.workdir, env=self.environment(), stdout=out,
                                 stderr=err, timeout=self.spec.timeout, stop=self.stop)
            except OSError as exc:
                return None, Failure(class_=LAUNCH, signal=f"cannot start {argv[0]!r}: {exc.strerror}")
        if code is None:
            return None, Failure(class_=TIMEOUT, signal=(
                f"timed out after {self.spec.timeout:g}s; the stage's process group was killed"))
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            return code, Failure(class_=KILLED, signal=self._signal(f"killed by signal {name}"),
                                 exit_code=code)
        if code != 0:
            return code, Failure(class_=BUILD_FAILURE,
                                 signal=self._signal(f"exited with code {code} and printed nothing to stderr"),
                                 exit_code=code)
        return 0, None

    def _signal(self, fallback: str) -> str:
        return _tail_lines(self.stderr_path) or fallback

    def _stderr_tail(self, limit: int) -> str:
        return _read_tail(self.stderr_path, limit)

    def _inputs_unchanged(self) -> Failure | None:
        """Whether the stage wrote into an input it was handed: a folder's shared view (see
        `_views_unchanged`), or a file (a hard link to an object: as root, mode 0444 does not
        stop it).  A changed size, mtime or mode is a write.  A changed
        ctime alone may be one that put the mtime back (`touch -d`), or only another attempt
        linking the same object into its own view: the file is then hashed again."""
        failure = self._views_unchanged()
        if failure is not None:
            return failure
        for path, (digest, before) in self._linked.items():
            try:
                after = _fingerprint(path)
            except FileNotFoundError:
                continue  # the stage removed its own link: the object behind it is untouched
            changed = after[:3] != before[:3]
            if not changed and after[3] != before[3]:
                try:
                    changed = hash_file(path, after[0]) != digest
                except OSError:
                    changed = True
            if changed:
                return Failure(class_=INPUT_MODIFIED, signal=(
                    f"the stage modified a read-only input it was handed ({path.name}); the "
                    "store object behind it is damaged: run `stagestore verify`"))
        return None

    def _views_unchanged(self) -> Failure | None:
        """Whether anything was written, created, removed, renamed or chmod-ed in a folder view
        while the command ran (inotify on every folder of the view, or a check of every file
        where inotify is not available; `ViewLease.check`).  A changed view is condemned (the
        next attempt gets a fresh one); the objects behind the files named are hashed to say
        whether the store itself is damaged."""
        for what, lease in self._leases:
            changed = lease.check()
            if not changed:
                continue
            damaged = self._damaged_objects(lease.digest, changed)
            shown = ", ".join(p or "." for p in changed[:3]) + (" ..." if len(changed) > 3 else "")
            return Failure(class_=INPUT_MODIFIED, signal=(
                f"the stage modified its read-only input view of {what} ({shown}); "
                + ("the store objects behind it are damaged: run `stagestore verify`"
                   if damaged else "the view was discarded; the store's objects are intact")))
        return None

    def _damaged_objects(self, digest: str, changed: list[str]) -> bool:
        try:
            entries = {e.path: e for e in read_tree(self.objects, digest).entries}
        except (StagestoreError, OSError):
            return True
        for path in changed:
            entry = entries.get(path)
            if entry is None or entry.kind != "file" or entry.executable or entry.hash is None:
                continue
            try:
                if hash_file(self.objects.path(entry.hash)) != entry.hash:
                    return True
            except OSError:
                return True
        return False

    def _commit_outputs(self, batch: SyncBatch) -> tuple[dict[str, ArtifactRef] | None, Failure | None]:
        outputs: dict[str, ArtifactRef] = {}
        for name in self.spec.outputs:
            path = self.out_dir / name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return None, Failure(class_=OUTPUT_MISSING, signal=(
                    f"declared output {name!r} was not created (expected at {{outputs.{name}}})"))
            if st.st_size >= LARGE_OUTPUT or os.path.isdir(path):
                self.note(f"storing output {name!r}" + (
                    f" ({st.st_size / 2**20:.0f} MiB)" if st.st_size >= LARGE_OUTPUT else ""))
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    outputs[name] = store_tree(path, self.objects, self.owner, batch, move=True,
                                               what=f"output {name!r}")
                elif os.path.isfile(path) and not os.path.islink(path):
                    digest, size = self.objects.commit_file(path, self.owner, batch)
                    outputs[name] = ArtifactRef(hash=digest, size=size, kind="file")
                else:
                    kind = "a symlink" if os.path.islink(path) else f"not a file or folder (mode {st.st_mode:o})"
                    raise OutputError(f"output {name!r} is {kind}; stored outputs hold only "
                                      "files and folders")
            except OutputError as exc:
                return None, Failure(class_=OUTPUT_INVALID, signal=exc.message)
        return outputs, None

    def _commit_logs(self, batch: SyncBatch) -> tuple[str, str]:
        digests = []
        for path in (self.stdout_path, self.stderr_path):
            try:
                empty = os.stat(path).st_size == 0
            except FileNotFoundError:
                empty = True
            if empty:  # most stages print nothing: the empty object, no fsync
                digest = self.objects.put_bytes(b"", self.owner, batch)
            else:
                digest, _ = self.objects.commit_file(path, self.owner, batch)
            digests.append(digest)
        return digests[0], digests[1]

    def cleanup(self) -> None:
        try:
            while self._leases:
                self._leases.pop()[1].release()
        finally:
            if self.folder.exists():
                # Done on the remover thread; the run waits for it at its end.
                durable.remove_later(self.folder)


def _read_tail(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _tail_lines(path: Path) -> str:
    """The last non-blank lines of a log: what a failure's `signal` shows."""
    lines = [line.rstrip() for line in _read_tail(path, 64 * 1024).splitlines() if line.strip()]
    return "\n".join(lines[-SIGNAL_LINES:])[-SIGNAL_CHARS:]


def _fingerprint(path: Path) -> tuple[int, int, int, int]:
    """(size, mtime_ns, mode, ctime_ns), read through this attempt's own link (the object's
    path may meanwhile name a fresh copy of the same content)."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_mode, st.st_ctime_ns


def run_attempt(*, deferral: durable.Deferral | None = None, **kwargs) -> AttemptResult:  # noqa: ANN003
    """Run one attempt in a fresh temp folder and always remove the folder afterwards.  With a
    `deferral` (an item stage: store/unsynced.py), what it stores is not fsynced here but by
    the item log's group commit."""
    attempt = Attempt(**kwargs)
    batch = SyncBatch(deferral)
    try:
        result = attempt.execute(batch)
        batch.flush()
        return result
    finally:
        attempt.cleanup()


def backoff(spec: StageSpec, attempt: int) -> float:
    """Seconds to wait before retry number `attempt` (1-based): exponential, capped at 60 s."""
    return min(spec.retry_delay * (2 ** (attempt - 1)), 60.0)
