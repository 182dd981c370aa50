"""The scenarios of issue 15: scale.  A folder input of 100,000 (and 1,000,000) small files, item
runs of 1,000 (and 10,000) items through three tiny stages, and what item runs leave in the
store.

Each compares stagestore with DVC, Snakemake, shell loops and the floors the machine sets,
measured in the same run; the targets are the issue's.  Methods are in benchmarks/README.md
("Scale").  The 1,000,000-file, 10,000-item and 10 x 10,000-item variants are opt-in: they run
only when named with `--only` (see `OPT_IN`).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import data
from .harness import (BenchError, Criterion, Measurement, ScenarioResult, interleave, run,
                      run_json)
from .peers import snakemake_env
from .scenarios import MB, PY, Bench, _paired, _ratio, _rmtree

# Scenarios left out of a run without --only (and so of --quick): each takes tens of minutes
# with today's stagestore.
OPT_IN = {"folder_1m", "items_10k", "store_10k"}


# --- helpers ---------------------------------------------------------------------------------


def run_rusage(cmd: list[object], *, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run `cmd`; returns (wall seconds, peak RSS in MB, stdout).  The peak is the kernel's
    ru_maxrss from wait4(2): the largest resident set of the process and of every descendant it
    waited for (the stage's own commands too, which are small here), file pages included, as
    `/usr/bin/time -v` reports it."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(map(str, cmd)), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise BenchError(f"command failed with exit code {proc.returncode}: "
                         f"{' '.join(map(str, cmd))[:500]}\nstdout: {stdout[-1500:]}\n"
                         f"stderr: {stderr[-2000:]}")
    return elapsed, usage.ru_maxrss * 1024 / MB, stdout


def sh(script: str, *, cwd: Path, env: dict[str, str] | None = None) -> float:
    """`/bin/sh -c SCRIPT`, whole command; wall seconds."""
    return run(["/bin/sh", "-c", script], cwd=cwd, env=env)[0]


def store_footprint(store: Path) -> tuple[int, int]:
    """(files, bytes on disk as `du -s -B1` counts them: allocated blocks, hard links once)."""
    files = 0
    stack = [str(store)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    files += 1
    out = subprocess.run(["du", "-s", "-B1", str(store)], capture_output=True, text=True,
                         check=True).stdout
    return files, int(out.split()[0])


def _settle() -> None:
    os.sync()


def _counter() -> Callable[[], int]:
    it = iter(range(1_000_000))
    return lambda: next(it)


def _dvc_note(b: Bench) -> str:
    return "" if b.peers.dvc else b.peers.dvc_missing


def _smk_note(b: Bench) -> str:
    return "" if b.peers.snakemake else b.peers.snakemake_missing


# --- 16, 17. a folder input of many small files ----------------------------------------------

FOLDER_CMD = "find {inputs.data} -type f | wc -l > {outputs.count}"
FOLDER_CMD_DVC = "find data -type f | wc -l > count.txt"


def _folder_pipeline(ws: Path) -> Path:
    return data.write_pipeline(ws, {"count": {
        "cmd": FOLDER_CMD, "shell": True, "inputs": {"data": "data"}, "outputs": ["count"]}},
        name="folder")


class _FolderRuns:
    """stagestore (and DVC) on one workspace holding `data/`: first runs into fresh stores,
    no-op reruns, one file changed, status; every stagestore command's peak RSS."""

    def __init__(self, b: Bench, ws: Path, files: int) -> None:
        self.b, self.ws, self.files = b, ws, files
        self.toml = ws / "stagestore.toml"
        self.store: Path | None = None
        self.next = _counter()
        self.rss: dict[str, list[float]] = {"first": [], "noop": [], "changed": []}
        self.changed = 0

    def _run(self, what: str, run_id: str) -> tuple[float, dict]:
        assert self.store is not None
        elapsed, rss, out = run_rusage(
            [*self.b.ss, "run", "-p", self.toml, "--store", self.store, "--run-id", run_id,
             "--json"], env=self.b.env)
        self.rss[what].append(rss)
        return elapsed, json.loads(out)["stages"][0]

    def first(self) -> float:
        old, self.store = self.store, self.ws / f"store-{self.next()}"
        if old is not None:  # untimed: the previous repetition's store
            _rmtree(old)
            _settle()
        elapsed, stage = self._run("first", "first")
        if stage["outcome"] != "succeeded" or not stage.get("executed", True):
            raise BenchError(f"the first run did not execute the stage: {stage}")
        return elapsed

    def check_count(self, expected: int) -> None:
        """Untimed: the stage saw every file (its output, checked out, is the count)."""
        out = self.ws / "checkout"
        _rmtree(out)
        self.b.stagestore("checkout", "first", "count", "--to", out, "-p", self.toml,
                          "--store", self.store)
        seen = int((out / "count").read_text().split()[0])
        _rmtree(out)
        if seen != expected:
            raise BenchError(f"the stage counted {seen} files, the folder holds {expected}")

    def noop(self) -> float:
        elapsed, stage = self._run("noop", f"noop-{self.next()}")
        if stage["outcome"] != "cached":
            raise BenchError(f"a no-op rerun executed the stage: {stage}")
        return elapsed

    def change_one(self) -> float:
        change_file(self.ws / "data", self.changed, "stagestore")
        self.changed += 1
        elapsed, stage = self._run("changed", f"changed-{self.next()}")
        if stage["outcome"] != "succeeded" or not stage.get("executed", True):
            raise BenchError(f"a run after one file changed did not execute: {stage}")
        return elapsed

    def status(self) -> float:
        elapsed, proc = run([*self.b.ss, "status", "-p", self.toml, "--store", self.store,
                             "--json"], env=self.b.env)
        if json.loads(proc.stdout)["stages"][0]["would_execute"]:
            raise BenchError(f"status says the stage would execute: {proc.stdout[:500]}")
        return elapsed


def change_file(root: Path, k: int, tag: str) -> None:
    """Change the content of one file (the k-th folder's first file), keeping its size class."""
    folders = sorted(os.listdir(root))
    folder = root / folders[k % len(folders)]
    name = min(os.listdir(folder))
    with open(folder / name, "a") as f:
        f.write(f"changed {k} {tag}\n")


class _DvcFolder:
    """The same stage as a dvc.yaml in its own repo, with `data/` a `cp -a` of stagestore's."""

    def __init__(self, b: Bench, repo: Path) -> None:
        self.b, self.repo = b, repo
        self.env = dict(b.dvc_env)
        self.next = _counter()
        self.rss: dict[str, list[float]] = {"first": [], "noop": [], "changed": []}
        self.changed = 0
        self.site: Path | None = None

    def _cmd(self, what: str, *args: str) -> tuple[float, str]:
        assert self.b.peers.dvc is not None
        elapsed, rss, out = run_rusage([self.b.peers.dvc, *args], cwd=self.repo, env=self.env)
        if what in self.rss:
            self.rss[what].append(rss)
        return elapsed, out

    def first(self) -> float:
        """A fresh repo (and a fresh site cache, where DVC keeps its hash database) around the
        same data; untimed set-up, timed `dvc repro`."""
        for name in (".dvc", "dvc.lock", "count.txt", ".dvcignore"):
            path = self.repo / name
            if path.is_dir():
                _rmtree(path)
            elif path.exists():
                path.unlink()
        if self.site is not None:
            _rmtree(self.site)
        self.site = site = self.repo.parent / f"{self.repo.name}-site-{self.next()}"
        self.env["DVC_SITE_CACHE_DIR"] = str(site)
        self.env["DVC_GLOBAL_CONFIG_DIR"] = str(site / "global-config")
        data.dvc_repo(self.repo, self.b.peers.dvc, self.env, cache_type=None)  # type: ignore[arg-type]
        data.dvc_yaml(self.repo, {"count": {"cmd": FOLDER_CMD_DVC, "deps": ["data"],
                                            "outs": ["count.txt"]}})
        _settle()
        elapsed, out = self._cmd("first", "repro")
        if "Running stage" not in out:
            raise BenchError(f"dvc repro did not run the stage: {out[-1000:]}")
        return elapsed

    def noop(self) -> float:
        elapsed, out = self._cmd("noop", "repro")
        if "Running stage" in out:
            raise BenchError(f"a no-op dvc repro ran the stage: {out[-1000:]}")
        return elapsed

    def change_one(self) -> float:
        change_file(self.repo / "data", self.changed, "dvc")
        self.changed += 1
        elapsed, out = self._cmd("changed", "repro")
        if "Running stage" not in out:
            raise BenchError(f"dvc repro after one file changed did not run: {out[-1000:]}")
        return elapsed

    def status(self) -> float:
        elapsed, out = self._cmd("status", "status")
        if "up to date" not in out:
            raise BenchError(f"dvc status is not up to date: {out[-500:]}")
        return elapsed


def _folder(b: Bench, sid: str, name: str, shape: tuple[int, int], *, peers: bool,
            reps_first: int, reps: int) -> tuple[ScenarioResult, dict[str, float]]:
    folders, per = shape
    n = folders * per
    r = ScenarioResult(
        sid, name, f"a folder input of {n:,} small files ({folders} folders x {per:,}), "
                   "stage `find data -type f | wc -l`",
        target=("first run at least as fast as `dvc repro`; no-op rerun, one file changed and "
                "`status` each >= 10x faster than DVC's; peak RSS of every stagestore run "
                "<= 150 MB") if peers else "(per-file figures; see the target below)",
        method=("One workspace holding data/ (stagecmd write-tree: small distinct text files, "
                "last changed >= 3 s before the first run) and a one-stage pipeline, shell = "
                "true: `find {inputs.data} -type f | wc -l > {outputs.count}`; DVC: the same "
                "command as a dvc.yaml stage in its own repo (default cache type), `data` a "
                "`cp -a` copy, as its dep. Three phases, each interleaved per repetition in a "
                "rotating order after one untimed warm-up where it matters: (1) first runs: "
                "`stagestore run` into a fresh store, `dvc repro` in a fresh repo with a fresh "
                "site cache, and the floors: `cp -a data COPY`, `b3sum` of every file "
                "(find -print0 | xargs -0 b3sum > /dev/null), `find data -type f -printf "
                "'%s\\n' > /dev/null` (readdir + one lstat per file, C), and the same walk in "
                "Python (os.scandir + DirEntry.stat, in-process time, info); (2) no-op reruns "
                "(new run id; the stage must be cached / DVC must run no stage), `stagestore "
                "status` and `dvc status`, the stat floor; (3) one file changed (a line "
                "appended to a different file each time) then a run, which must execute the "
                "stage, for both tools. Whole commands. Peak RSS = ru_maxrss from wait4 of the "
                "stagestore process (its waited-for children included; file pages included), "
                "largest over all its runs here."))
    free_needed = n * 4096 * 4  # the data, DVC's copy, a store, a cp -a copy; a block each
    if (why := b.need_disk(free_needed, "the files and their copies")) is not None:
        r.skip_reason = why
        return r, {}
    ws = b.workdir / name
    _rmtree(ws)
    ws.mkdir(parents=True)
    _folder_pipeline(ws)
    t0 = time.perf_counter()
    run([PY, data.STAGECMD, "write-tree", ws / "data", folders, per])
    b.log(f"  wrote {n:,} files in {time.perf_counter() - t0:.1f} s")
    use_dvc = peers and b.peers.dvc is not None
    repo = b.workdir / f"{name}-dvc"
    if use_dvc:
        _rmtree(repo)
        repo.mkdir()
        run(["cp", "-a", ws / "data", repo / "data"])
    time.sleep(3.1)  # every input last changed >= 3 s before the first run (racy-timestamp rule)
    ss = _FolderRuns(b, ws, n)
    dv = _DvcFolder(b, repo) if use_dvc else None
    if peers and not use_dvc:
        r.notes.append(f"dvc rows skipped: {b.peers.dvc_missing}")

    m = {key: r.add(Measurement(label)) for key, label in [
        ("ss_first", "stagestore run, first (fresh store)"),
        ("dvc_first", "dvc repro, first (fresh repo)"),
        ("cp", "floor: cp -a data COPY"),
        ("b3", "floor: b3sum of every file (find | xargs b3sum)"),
        ("stat", "floor: find -printf '%s' (readdir + lstat per file, C)"),
        ("pystat", "Python os.scandir walk + lstat, in-process (info)"),
        ("ss_noop", "stagestore run, no-op rerun"),
        ("dvc_noop", "dvc repro, no-op"),
        ("ss_status", "stagestore status"),
        ("dvc_status", "dvc status"),
        ("ss_changed", "stagestore run, one file changed"),
        ("dvc_changed", "dvc repro, one file changed"),
    ]}
    r.primary = m["ss_noop"].label
    find_stat = "find data -type f -printf '%s\\n' > /dev/null"
    stat_floor = (m["stat"].label, lambda: sh(find_stat, cwd=ws))

    def do_cp() -> float:
        copy = b.workdir / f"{name}-cp"
        _rmtree(copy)
        _settle()
        elapsed = run(["cp", "-a", ws / "data", copy])[0]
        _rmtree(copy)
        return elapsed

    # (1) first runs
    steps = [(m["ss_first"].label, ss.first), stat_floor,
             (m["pystat"].label,
              lambda: data_probe("stat-walk", ws / "data")["seconds"])]
    if peers:
        steps.append((m["cp"].label, do_cp))
        if b.peers.b3sum:
            steps.append((m["b3"].label, lambda: sh(
                f"find data -type f -print0 | xargs -0 {b.peers.b3sum} > /dev/null", cwd=ws)))
        else:
            r.notes.append(f"b3sum row skipped: {b.peers.b3sum_missing}")
    if dv is not None:
        steps.append((m["dvc_first"].label, dv.first))
    sh(find_stat, cwd=ws)  # untimed warm-up: the page cache of the listings and inodes
    interleave(reps_first, steps, {x.label: x for x in m.values()})
    ss.check_count(n)
    # (2) no-op reruns and status
    ss.noop()  # untimed warm-ups
    ss.status()
    steps = [(m["ss_noop"].label, ss.noop), (m["ss_status"].label, ss.status), stat_floor]
    if dv is not None:
        dv.noop()
        dv.status()
        steps += [(m["dvc_noop"].label, dv.noop), (m["dvc_status"].label, dv.status)]
    interleave(reps, steps, {x.label: x for x in m.values()})
    # (3) one file changed
    steps = [(m["ss_changed"].label, ss.change_one)]
    if dv is not None:
        steps.append((m["dvc_changed"].label, dv.change_one))
    interleave(reps_first, steps, {x.label: x for x in m.values()})
    _rmtree(ws)
    _rmtree(repo)
    for site in b.workdir.glob(f"{name}-dvc-site-*"):
        _rmtree(site)
    r.measurements = [x for x in r.measurements if x.times]  # rows this variant measures

    rss_all = [x for v in ss.rss.values() for x in v]
    for what, values in ss.rss.items():
        r.add(Measurement(f"stagestore run peak RSS, {what}", values, unit="MB"))
    if dv is not None:
        for what, values in dv.rss.items():
            r.add(Measurement(f"dvc repro peak RSS, {what} (info)", values, unit="MB"))
    for key in ("ss_first", "ss_noop", "ss_changed"):
        if m[key].times:
            r.add(Measurement(f"{m[key].label} per file", [m[key].median / n * 1e6], unit="us"))
    med = {k: v.median for k, v in m.items()}
    r.ratios["stagestore no-op / stat floor (find)"] = _ratio(med["ss_noop"], med["stat"])
    if peers:
        r.ratios["stagestore first / cp -a"] = _ratio(med["ss_first"], med["cp"])
        r.ratios["stagestore first / b3sum of the files"] = _ratio(med["ss_first"], med["b3"])
        note = _dvc_note(b)
        for text, key, limit in [("first run: dvc repro / stagestore", "first", 1.0),
                                 ("no-op rerun: dvc repro / stagestore", "noop", 10.0),
                                 ("one file changed: dvc repro / stagestore", "changed", 10.0),
                                 ("status: dvc status / stagestore status", "status", 10.0)]:
            ratio = _ratio(med[f"dvc_{key}"], med[f"ss_{key}"])
            r.ratios[text] = ratio
            r.criteria.append(Criterion(text, ratio, limit, ">=", note=note))
        r.criteria.append(Criterion("peak RSS of stagestore run (largest)", max(rss_all), 150,
                                    "<=", unit="MB"))
    per_file = {k: med[f"ss_{k}"] / n for k in ("first", "noop", "changed")}
    b.shared.setdefault("folder", {})[n] = per_file
    return r, per_file


def s16_folder_100k(b: Bench) -> ScenarioResult:
    reps = b.cfg.reps if b.cfg.quick else min(b.cfg.reps, 3)
    result, _ = _folder(b, "16", "folder_100k", b.cfg.folder, peers=True, reps_first=reps,
                        reps=b.cfg.reps)
    return result


def s17_folder_1m(b: Bench) -> ScenarioResult:
    big = b.cfg.folder_big
    n_big, n_small = big[0] * big[1], b.cfg.folder[0] * b.cfg.folder[1]
    small = b.shared.get("folder", {}).get(n_small)
    measured_small = small is None
    if measured_small:  # not run with folder_100k in this process: measure it here, no peers
        b.log(f"  measuring the {n_small:,}-file size first (stagestore only)")
        small_result, small = _folder(b, "17", "folder_1m-small", b.cfg.folder, peers=False,
                                      reps_first=min(b.cfg.reps, 3), reps=min(b.cfg.reps, 3))
        if small_result.skip_reason:
            return small_result
    r, per_big = _folder(b, "17", "folder_1m", big, peers=False, reps_first=1,
                         reps=min(b.cfg.reps, 3))
    r.title = (f"per-file cost of a folder input of {n_big:,} files vs {n_small:,} "
               "(stagestore only)")
    r.target = (f"per-file time at {n_big:,} files <= 1.2x the per-file time at {n_small:,}, "
                "for the first run, the no-op rerun and one file changed")
    r.method += (f" Here: stagestore only, first run and one file changed once (one "
                 f"repetition), no-op {min(b.cfg.reps, 3)} repetitions; the {n_small:,}-file "
                 "figures come from folder_100k of the same benchmark process"
                 + (", measured here as it was not selected" if measured_small else "") + ".")
    if r.skip_reason:
        return r
    r.criteria = []
    for what in ("first", "noop", "changed"):
        ratio = _ratio(per_big[what], small[what])
        r.add(Measurement(f"per file at {n_small:,} files, {what}", [small[what] * 1e6],
                          unit="us"))
        r.ratios[f"{what}: per-file {n_big:,} / {n_small:,}"] = ratio
        r.criteria.append(Criterion(f"{what}: per-file time {n_big:,} / {n_small:,}", ratio,
                                    1.2, "<="))
    r.primary = "stagestore run, first (fresh store)"
    return r


def data_probe(cmd: str, *args: object) -> dict:
    return run_json([PY, data.STAGECMD, cmd, *args])


# --- 18, 19. item runs ---------------------------------------------------------------------

ITEM_STAGES = {
    "copy": {"cmd": ["cp", "{inputs.src}", "{outputs.out}"],
             "inputs": {"src": "data/{item}.txt"}, "outputs": ["out"]},
    "upper": {"cmd": "tr a-z A-Z < {upstream.copy.out} > {outputs.out}", "shell": True,
              "upstream": ["copy"], "outputs": ["out"]},
    "count": {"cmd": "wc -c < {upstream.upper.out} > {outputs.out}", "shell": True,
              "upstream": ["upper"], "outputs": ["out"]},
}

LOOP_SH = """\
# The three stages' commands for every item, one item after another.
out=$1
while IFS= read -r i; do
  cp "data/$i.txt" "$out/$i.a"
  tr a-z A-Z < "$out/$i.a" > "$out/$i.b"
  wc -c < "$out/$i.b" > "$out/$i.c"
done < items.txt
"""

ITEM_SH = """\
# The three stages' commands for one item ($1), into $OUT; run by xargs -P2 -n1.
cp "data/$1.txt" "$OUT/$1.a"
tr a-z A-Z < "$OUT/$1.a" > "$OUT/$1.b"
wc -c < "$OUT/$1.b" > "$OUT/$1.c"
"""

SPAWN_FLOOR_PY = """\
# The floor of any Python runner: the three stages' commands per item, each started the way
# stagestore starts a stage (subprocess, a new session, stdin from /dev/null, the shell stages
# through /bin/sh -c), J items at a time, and nothing else.  Usage: spawn_floor.py OUT J.
import subprocess, sys
from concurrent.futures import ThreadPoolExecutor

out, jobs = sys.argv[1], int(sys.argv[2])
items = [line.strip() for line in open("items.txt") if line.strip()]


def one(i):
    for argv in (["cp", f"data/{i}.txt", f"{out}/{i}.a"],
                 ["/bin/sh", "-c", f"tr a-z A-Z < {out}/{i}.a > {out}/{i}.b"],
                 ["/bin/sh", "-c", f"wc -c < {out}/{i}.b > {out}/{i}.c"]):
        subprocess.run(argv, stdin=subprocess.DEVNULL, start_new_session=True, check=True)


if jobs == 1:
    for i in items:
        one(i)
else:
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, items))
"""

SNAKEFILE = """\
ITEMS = [line.strip() for line in open("items-smk.txt") if line.strip()]

rule all:
    input: expand("smk-out/{item}.c", item=ITEMS)

rule copy:
    input: "data/{item}.txt"
    output: "smk-out/{item}.a"
    shell: "cp {input} {output}"

rule upper:
    input: "smk-out/{item}.a"
    output: "smk-out/{item}.b"
    shell: "tr a-z A-Z < {input} > {output}"

rule count:
    input: "smk-out/{item}.b"
    output: "smk-out/{item}.c"
    shell: "wc -c < {input} > {output}"
"""


def _item_ids(n: int) -> list[str]:
    return [f"pkg-{i:05d}" for i in range(n)]


def _item_workspace(ws: Path, n: int) -> list[str]:
    _rmtree(ws)
    ws.mkdir(parents=True)
    data.write_pipeline(ws, ITEM_STAGES, name="items")
    (ws / "data").mkdir()
    ids = _item_ids(n)
    for item in ids:
        (ws / "data" / f"{item}.txt").write_text(f"package {item} version 1.0\nsome text\n")
    (ws / "loop.sh").write_text(LOOP_SH)
    (ws / "item.sh").write_text(ITEM_SH)
    (ws / "Snakefile").write_text(SNAKEFILE)
    (ws / "spawn_floor.py").write_text(SPAWN_FLOOR_PY)
    return ids


def _set_items(ws: Path, name: str, ids: list[str]) -> Path:
    path = ws / name
    path.write_text("".join(f"{i}\n" for i in ids))
    return path


def _add_item(ws: Path, items_file: Path, item: str) -> None:
    path = ws / "data" / f"{item}.txt"
    if not path.exists():
        path.write_text(f"package {item} version 1.0\nadded later\n")
    with open(items_file, "a") as f:
        f.write(f"{item}\n")


class _ItemRuns:
    """stagestore on the item workspace: first runs into fresh stores, no-op reruns, one item
    added (each repetition adds a new one)."""

    def __init__(self, b: Bench, ws: Path, jobs: int) -> None:
        self.b, self.ws, self.jobs = b, ws, jobs
        self.toml = ws / "stagestore.toml"
        self.items = ws / "items.txt"
        self.store: Path | None = None
        self.next = _counter()

    def _run(self, run_id: str) -> tuple[float, dict]:
        assert self.store is not None
        elapsed, proc = run([*self.b.ss, "run", "-p", self.toml, "--store", self.store,
                             "--items", self.items, "-j", self.jobs, "--run-id", run_id,
                             "--json"], env=self.b.env)
        return elapsed, json.loads(proc.stdout)

    @staticmethod
    def executed(report: dict) -> tuple[int, int]:
        """(stage executions, items) of an item run's report; every item must have succeeded."""
        items = report.get("items") or []
        bad = [i for i in items if i["status"] != "succeeded"]
        if bad or not report["ok"]:
            raise BenchError(f"an item run failed: {bad[:3] or report.get('status')}")
        return sum(1 for i in items for s in i["stages"] if s.get("executed")), len(items)

    def first(self) -> float:
        old, self.store = self.store, self.ws / f"store-j{self.jobs}-{self.next()}"
        if old is not None:
            _rmtree(old)
            _settle()
        elapsed, report = self._run("r0")
        executed, items = self.executed(report)
        if executed != 3 * items:
            raise BenchError(f"a first run executed {executed} stages for {items} items")
        return elapsed

    def noop(self) -> float:
        elapsed, report = self._run(f"noop-{self.next()}")
        executed, _ = self.executed(report)
        if executed:
            raise BenchError(f"a no-op rerun executed {executed} stages")
        return elapsed

    def add_one(self) -> float:
        _add_item(self.ws, self.items, f"new-j{self.jobs}-{self.next()}")
        elapsed, report = self._run(f"added-{self.next()}")
        executed, _ = self.executed(report)
        if executed != 3:
            raise BenchError(f"a run with one item added executed {executed} stages, not 3")
        return elapsed


class _Snakemake:
    def __init__(self, b: Bench, ws: Path, cores: int) -> None:
        self.b, self.ws, self.cores = b, ws, cores
        self.env = snakemake_env(b.env)
        self.items = ws / "items-smk.txt"
        self.next = _counter()

    def _run(self) -> tuple[float, str]:
        assert self.b.peers.snakemake is not None
        elapsed, proc = run([self.b.peers.snakemake, "--cores", self.cores, "-s", "Snakefile"],
                            cwd=self.ws, env=self.env)
        return elapsed, proc.stdout + proc.stderr

    def first(self) -> float:
        _rmtree(self.ws / "smk-out")
        _rmtree(self.ws / ".snakemake")
        _settle()
        elapsed, out = self._run()
        if "Nothing to be done" in out:
            raise BenchError(f"snakemake did nothing on a first run: {out[-500:]}")
        return elapsed

    def noop(self) -> float:
        elapsed, out = self._run()
        if "Nothing to be done" not in out:
            raise BenchError(f"a no-op snakemake rerun ran jobs: {out[-1000:]}")
        return elapsed

    def add_one(self) -> float:
        _add_item(self.ws, self.items, f"new-smk{self.cores}-{self.next()}")
        elapsed, out = self._run()
        if "3 of 4 steps" not in out and "4 of 4 steps" not in out:
            raise BenchError(f"snakemake with one item added: {out[-1000:]}")
        return elapsed


def _peer_first(b: Bench, ws: Path, jobs: int) -> Callable[[], float]:
    """The shell peer of a first run: the sequential loop (jobs 1) or xargs -P2 of a per-item
    script (jobs 2), into a fresh output folder."""
    out = ws / "peer-out"
    env = dict(b.env, OUT=str(out))

    def step() -> float:
        _rmtree(out)
        out.mkdir()
        _settle()
        if jobs == 1:
            return sh("sh loop.sh peer-out", cwd=ws, env=env)
        return sh(f"xargs -P {jobs} -n 1 sh item.sh < items.txt", cwd=ws, env=env)

    return step


def _spawn_floor(b: Bench, ws: Path, jobs: int) -> Callable[[], float]:
    """The Python spawn floor of a first run (SPAWN_FLOOR_PY), into a fresh folder."""
    out = ws / "floor-out"

    def step() -> float:
        _rmtree(out)
        out.mkdir()
        _settle()
        elapsed, _ = run([sys.executable, "spawn_floor.py", "floor-out", str(jobs)], cwd=ws, env=b.env)
        return elapsed

    return step


def _items(b: Bench, sid: str, name: str, n: int, *, jobs_list: tuple[int, ...],
           smk_cores: tuple[int, ...], reps_first: int, smk_reps_first: int,
           peers: bool = True) -> tuple[ScenarioResult, dict[int, float]]:
    r = ScenarioResult(
        sid, name, f"an item run of {n:,} items x 3 tiny stages (cp, tr, wc)",
        target=("first run within 1.5x the shell loop (--jobs 1) / xargs -P2 (--jobs 2); >= 5x "
                "faster than Snakemake (first run and no-op rerun); no-op rerun <= 0.1x the "
                "loop's time; one item added costs that item's work plus a no-op (added - "
                "no-op <= 2x one item's share of the first run)"),
        method=("A workspace of N items (data/ITEM.txt, two short lines each; items.txt one id "
                "a line) and a pipeline of three per-item stages: copy (`cp {inputs.src} "
                "{outputs.out}`, src = data/{item}.txt), upper (shell: `tr a-z A-Z < "
                "{upstream.copy.out} > {outputs.out}`), count (shell: `wc -c < ... > "
                "{outputs.out}`). Per --jobs J: (1) first runs, interleaved: `stagestore run "
                "--items items.txt -j J` into a fresh store (every stage of every item must "
                "execute); the shell peer into a fresh folder: for J = 1 a sequential "
                "`while read` loop running the same three commands per item, for J = 2 "
                "`xargs -P 2 -n 1 sh item.sh` (the three commands for one item); Snakemake 9 "
                "(its own venv) with the same three rules and `--cores J` after removing its "
                "outputs and .snakemake; (2) interleaved: a no-op rerun (new run id; no stage "
                "may execute; Snakemake: 'Nothing to be done'), and one item added (a new "
                "item appended to the tool's own items file, then a run: exactly its three "
                "stages execute), each tool on its own items file. Whole commands."))
    ws = b.workdir / name
    ids = _item_ids(n)
    _item_workspace(ws, n)
    use_smk = peers and b.peers.snakemake is not None
    if peers and not use_smk:
        r.notes.append(f"snakemake rows skipped: {b.peers.snakemake_missing}")
    per_item: dict[int, float] = {}
    for jobs in jobs_list:
        _set_items(ws, "items.txt", ids)
        _set_items(ws, "items-smk.txt", ids)
        ss = _ItemRuns(b, ws, jobs)
        peer_name = "sequential shell loop" if jobs == 1 else f"xargs -P{jobs} of a per-item script"
        m = {key: r.add(Measurement(f"--jobs {jobs}: {label}")) for key, label in [
            ("ss_first", "stagestore run, first (fresh store)"),
            ("peer", peer_name),
            ("floor", f"Python spawn floor (subprocess.run of the same commands, {jobs} at a time)"),
            ("smk_first", f"snakemake --cores {jobs}, first"),
            ("ss_noop", "stagestore run, no-op rerun"),
            ("smk_noop", f"snakemake --cores {jobs}, no-op"),
            ("ss_added", "stagestore run, one item added"),
            ("smk_added", f"snakemake --cores {jobs}, one item added"),
        ]}
        labels = {x.label: x for x in m.values()}
        steps = [(m["ss_first"].label, ss.first)]
        if peers:
            steps.append((m["peer"].label, _peer_first(b, ws, jobs)))
            steps.append((m["floor"].label, _spawn_floor(b, ws, jobs)))
        smk = _Snakemake(b, ws, jobs) if use_smk and jobs in smk_cores else None
        interleave(reps_first, steps, labels)
        if smk is not None:
            # Snakemake's first run takes minutes at these sizes: fewer repetitions, run
            # between the others' (not interleaved with them).
            interleave(smk_reps_first, [(m["smk_first"].label, smk.first)], labels)
            smk.noop()
        ss.noop()  # untimed warm-up
        steps = [(m["ss_noop"].label, ss.noop), (m["ss_added"].label, ss.add_one)]
        if smk is not None:
            steps += [(m["smk_noop"].label, smk.noop), (m["smk_added"].label, smk.add_one)]
        interleave(b.cfg.reps, steps, labels)
        _rmtree(ss.store)  # type: ignore[arg-type]
        for path in (ws / "smk-out", ws / ".snakemake", ws / "peer-out", ws / "floor-out"):
            _rmtree(path)

        med = {k: v.median for k, v in m.items()}
        per_item[jobs] = med["ss_first"] / n
        r.add(Measurement(f"--jobs {jobs}: stagestore first run per item", [per_item[jobs] * 1e3],
                          unit="ms"))
        extra = _paired(m["ss_added"].times, m["ss_noop"].times)
        r.add(Measurement(f"--jobs {jobs}: one item added - no-op (paired)",
                          [a - b_ for a, b_ in zip(m["ss_added"].times, m["ss_noop"].times)]))
        if not peers:
            continue
        smk_note = _smk_note(b) if jobs in smk_cores else f"snakemake not run with --cores {jobs}"
        crits = [
            (f"--jobs {jobs}: first run / {peer_name}", _ratio(med["ss_first"], med["peer"]),
             1.5, "<=", ""),
            (f"--jobs {jobs}: first run, snakemake / stagestore",
             _ratio(med["smk_first"], med["ss_first"]), 5.0, ">=", smk_note),
            (f"--jobs {jobs}: no-op rerun, snakemake / stagestore",
             _ratio(med["smk_noop"], med["ss_noop"]), 5.0, ">=", smk_note),
            (f"--jobs {jobs}: no-op rerun / {peer_name}", _ratio(med["ss_noop"], med["peer"]),
             0.1, "<=", ""),
            (f"--jobs {jobs}: (one item added - no-op) / one item's share of the first run",
             _ratio(extra, per_item[jobs]), 2.0, "<=", ""),
        ]
        for text, value, limit, op, note in crits:
            r.ratios[text] = value
            r.criteria.append(Criterion(text, value, limit, op, note=note))
        r.ratios[f"--jobs {jobs}: one item added, snakemake / stagestore (info)"] = _ratio(
            med["smk_added"], med["ss_added"])
        # The target's physical floor, measured in the same run: no Python runner can start
        # the same processes faster (a `sh -c` per shell stage is one exec more than the loop).
        r.ratios[f"--jobs {jobs}: Python spawn floor / {peer_name} (info)"] = _ratio(
            med["floor"], med["peer"])
        r.ratios[f"--jobs {jobs}: first run / Python spawn floor (info)"] = _ratio(
            med["ss_first"], med["floor"])
        if r.primary is None:
            r.primary = m["ss_first"].label
    _rmtree(ws)
    r.measurements = [x for x in r.measurements if x.times]  # rows this variant measures
    b.shared.setdefault("items", {})[n] = per_item
    if use_smk:
        r.notes.append(f"Snakemake {b.peers.snakemake_version}: first runs {smk_reps_first} "
                       f"repetition(s), with --cores {', '.join(map(str, smk_cores))}")
    return r, per_item


def s18_items_1k(b: Bench) -> ScenarioResult:
    n = b.cfg.items
    result, _ = _items(b, "18", "items_1k", n, jobs_list=(1, 2), smk_cores=(1, 2),
                       reps_first=b.cfg.reps if b.cfg.quick else min(b.cfg.reps, 3),
                       smk_reps_first=1)
    return result


def s19_items_10k(b: Bench) -> ScenarioResult:
    n_small, n_big = b.cfg.items, b.cfg.items_big
    small = b.shared.get("items", {}).get(n_small)
    measured_small = small is None
    if measured_small:
        b.log(f"  measuring {n_small:,} items first (stagestore only)")
        _, small = _items(b, "19", "items_10k-small", n_small, jobs_list=(1, 2), smk_cores=(),
                          reps_first=1, smk_reps_first=0, peers=False)
    r, big = _items(b, "19", "items_10k", n_big, jobs_list=(1, 2), smk_cores=(2,),
                    reps_first=1, smk_reps_first=1)
    r.target += (f"; per-item cost of the first run at {n_big:,} items <= 1.2x that at "
                 f"{n_small:,}")
    r.method += (f" Here the first runs are one repetition each, and Snakemake runs with "
                 f"--cores 2 only. The {n_small:,}-item figures come from items_1k of the same "
                 "benchmark process" + (", measured here (stagestore only, one repetition) as "
                                        "it was not selected" if measured_small else "") + ".")
    for jobs in (1, 2):
        ratio = _ratio(big[jobs], small[jobs])
        r.ratios[f"--jobs {jobs}: per item {n_big:,} / {n_small:,}"] = ratio
        r.criteria.append(Criterion(f"--jobs {jobs}: first run per item, {n_big:,} / "
                                    f"{n_small:,}", ratio, 1.2, "<="))
    return r


# --- 20, 21. what item runs leave in the store, and reading it back --------------------------


def _store(b: Bench, sid: str, name: str, shape: tuple[int, int]) -> ScenarioResult:
    runs, n = shape
    r = ScenarioResult(
        sid, name, f"the store after {runs} runs of {n:,} items x 3 stages: footprint and "
                   "the commands that read it",
        target=(f"a no-op rerun of {n:,} items adds <= {n // 20:,} files (N/20) to the store; "
                "`show`, `report` and `diff` of the same runs take no longer (<= 1.2x) in a store "
                f"of {runs} runs than of 2; `stats`, `verify` and `gc` take time linear in what "
                "they read (time per manifest at the large size <= 1.2x that at 2 runs)"),
        method=("The item workspace of items_1k (3 per-item stages). Run r00 executes every "
                "item (--jobs 2); runs r01.. are no-op reruns of the same items. Before and "
                "after each no-op rerun: files in the store folder and `du -s -B1` bytes. At "
                f"2 runs and at {runs} runs, after one untimed warm-up each, interleaved "
                "whole commands: `runs`, `show r01`, `report r01`, `diff r00 r01`, `stats` "
                "(default --last 20: every run), `verify`, `gc` (nothing to collect). "
                "Manifests read = what the command must read by its definition: show, report "
                "= one run's 3N item manifests, diff = two runs', stats, verify, gc = every "
                "run's. Per-manifest = (median time - fixed cost) / that count, the fixed "
                "cost being `runs` at 2 runs (start-up, imports, opening the store, two run "
                "records)."))
    ws = b.workdir / name
    ids = _item_ids(n)
    _item_workspace(ws, n)
    _set_items(ws, "items.txt", ids)
    store = ws / ".stagestore"
    toml = ws / "stagestore.toml"
    base = ["-p", toml, "--store", store]

    def do_run(run_id: str) -> tuple[float, dict]:
        elapsed, proc = run([*b.ss, "run", *base, "--items", ws / "items.txt", "-j", 2,
                             "--run-id", run_id, "--json"], env=b.env)
        return elapsed, json.loads(proc.stdout)

    t0 = time.perf_counter()
    _, report = do_run("r00")
    executed, _ = _ItemRuns.executed(report)
    files_added = r.add(Measurement("files added by a no-op rerun", unit="n"))
    bytes_added = r.add(Measurement("du bytes added by a no-op rerun", unit="MB"))
    noop_time = r.add(Measurement("no-op rerun (info)"))
    r.primary = files_added.label
    commands = {
        "runs": (["runs"], lambda k: k),
        "show": (["show", "r01"], lambda k: 3 * n),
        "report": (["report", "r01"], lambda k: 3 * n),
        "diff": (["diff", "r00", "r01"], lambda k: 6 * n),
        "stats": (["stats"], lambda k: 3 * n * min(k, 20)),
        "verify": (["verify"], lambda k: 3 * n * k),
        "gc": (["gc"], lambda k: 3 * n * k),
    }
    timed: dict[int, dict[str, Measurement]] = {}

    def measure(k: int) -> None:
        ms = {c: r.add(Measurement(f"{c} @ {k} runs")) for c in commands}
        for args, _ in commands.values():  # untimed warm-up
            b.stagestore(*args, *base)
        interleave(b.cfg.reps, [
            (ms[c].label, (lambda args=args: b.stagestore(*args, *base)[0]))
            for c, (args, _) in commands.items()], {x.label: x for x in ms.values()})
        timed[k] = ms

    for k in range(1, runs):
        before = store_footprint(store)
        elapsed, report = do_run(f"r{k:02d}")
        executed, _ = _ItemRuns.executed(report)
        if executed:
            raise BenchError(f"no-op rerun r{k:02d} executed {executed} stages")
        after = store_footprint(store)
        files_added.times.append(after[0] - before[0])
        bytes_added.times.append((after[1] - before[1]) / MB)
        noop_time.times.append(elapsed)
        if k + 1 == 2:
            measure(2)
    b.log(f"  built {runs} runs of {n:,} items in {time.perf_counter() - t0:.1f} s")
    r.notes.append(f"built {runs} runs of {n:,} items in {time.perf_counter() - t0:.1f} s "
                   "(timed commands included)")
    if runs > 2:
        measure(runs)
    files, nbytes = store_footprint(store)
    r.notes.append(f"the store holds {files:,} files, {nbytes / MB:.1f} MB (du) after {runs} "
                   "runs")
    _rmtree(ws)
    r.criteria.append(Criterion(f"files a no-op rerun of {n:,} items adds (median)",
                                files_added.median, n / 20, "<=", unit="n"))
    small, big = timed[2], timed[runs]
    # The fixed cost of a command (start-up, imports, opening the store): `runs` at 2 runs,
    # which reads two run records.  Per-manifest figures are net of it.
    fixed = small["runs"].median
    r.notes.append(f"fixed cost (`runs` @ 2 runs) {fixed * 1000:.1f} ms, subtracted from the "
                   "per-manifest figures")
    for c, (_, count) in commands.items():
        if c == "runs":
            continue
        for k, ms in timed.items():
            per = (ms[c].median - fixed) / count(k) * 1e6
            r.add(Measurement(f"{c} per manifest @ {k} runs ({count(k):,} read, net of the "
                              "fixed cost)", [per], unit="us"))
        if runs == 2:
            continue
        if c in ("show", "report", "diff"):
            ratio = _ratio(big[c].median, small[c].median)
            r.criteria.append(Criterion(f"{c}: time @ {runs} runs / @ 2 runs", ratio, 1.2, "<="))
        else:
            ratio = _ratio((big[c].median - fixed) / count(runs),
                           (small[c].median - fixed) / count(2))
            r.criteria.append(Criterion(f"{c}: per-manifest time @ {runs} runs / @ 2 runs", ratio,
                                        1.2, "<="))
        r.ratios[f"{c}: @ {runs} runs / @ 2 runs"] = ratio
    r.ratios[f"runs: time @ {runs} runs / @ 2 runs (info)"] = _ratio(big["runs"].median, fixed)
    return r


def s20_store(b: Bench) -> ScenarioResult:
    return _store(b, "20", "store_footprint", b.cfg.store_runs)


def s21_store_10k(b: Bench) -> ScenarioResult:
    return _store(b, "21", "store_10k", b.cfg.store_runs_big)


SCALE_SCENARIOS: list[tuple[str, str, Callable[[Bench], ScenarioResult]]] = [
    ("16", "folder_100k", s16_folder_100k),
    ("17", "folder_1m", s17_folder_1m),
    ("18", "items_1k", s18_items_1k),
    ("19", "items_10k", s19_items_10k),
    ("20", "store_footprint", s20_store),
    ("21", "store_10k", s21_store_10k),
]

# Which scenarios need the Snakemake peer (installed on demand).
NEEDS_SNAKEMAKE = {"items_1k", "items_10k"}
