"""Timing, medians, memory sampling, the machine line, and the table and JSON of a run.

Everything here is standard library.  Times are wall-clock (`time.perf_counter`) around a whole
subprocess unless a measurement says it is the probe's own internal time.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PASS, FAIL, SKIP, ERROR = "PASS", "FAIL", "SKIP", "ERROR"


class BenchError(RuntimeError):
    """A command of the benchmark failed: the scenario cannot be measured."""


# --- running commands ---------------------------------------------------------------------


def run(cmd: Sequence[str], *, cwd: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None, check: bool = True,
        timeout: float | None = 3600) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run `cmd` to completion; returns (wall seconds, completed process with captured output)."""
    t0 = time.perf_counter()
    proc = subprocess.run(list(map(str, cmd)), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout)
    elapsed = time.perf_counter() - t0
    if check and proc.returncode != 0:
        raise BenchError(f"command failed with exit code {proc.returncode}: "
                         f"{' '.join(map(str, cmd))}\n"
                         f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}")
    return elapsed, proc


def run_to_file(cmd: Sequence[str], out: str | os.PathLike[str], *,
                cwd: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None,
                timeout: float | None = 3600) -> float:
    """Run `cmd` with its stdout written to the file `out` (as `cmd > out` in a shell), for
    peers whose output is a file the stage also writes; returns the wall seconds."""
    with open(out, "wb") as sink:
        t0 = time.perf_counter()
        proc = subprocess.run(list(map(str, cmd)), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                              stdout=sink, stderr=subprocess.PIPE, timeout=timeout)
        elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(f"command failed with exit code {proc.returncode}: "
                         f"{' '.join(map(str, cmd))[:500]}\n"
                         f"stderr: {proc.stderr.decode(errors='replace')[-2000:]}")
    return elapsed


def run_json(cmd: Sequence[str], **kwargs: Any) -> dict[str, Any]:
    """Run a probe that prints one JSON line; returns that object (plus `wall`)."""
    wall, proc = run(cmd, **kwargs)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"no JSON from {' '.join(map(str, cmd))}: {proc.stdout[-500:]}")
    result = json.loads(lines[-1])
    result["wall"] = wall
    return result


@dataclass
class MemorySample:
    seconds: float
    peak_rss_anon_kb: int
    peak_vm_rss_kb: int
    last_vm_hwm_kb: int
    samples: int
    returncode: int
    stdout: str
    stderr: str


def _status_fields(pid: int) -> dict[str, int]:
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "VmRSS", "VmHWM"):
                    found[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return found


def run_sampled(cmd: Sequence[str], *, cwd: str | os.PathLike[str] | None = None,
                env: dict[str, str] | None = None, interval: float = 0.005) -> MemorySample:
    """Run `cmd`, reading /proc/<pid>/status every `interval` s.  RssAnon has no peak field in
    the kernel, so its peak is the largest sampled value (spikes shorter than the interval can
    be missed).  VmHWM is the kernel's own peak of the whole RSS, file-backed pages (mmap'd
    files being hashed) included; the last value read before the process exits is kept."""
    with open(os.devnull, "rb") as devnull, tempfile.TemporaryFile() as out, \
            tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(map(str, cmd)), cwd=cwd, env=env, stdin=devnull,
                                stdout=out, stderr=err)
        anon = rss = hwm = 0
        samples = 0
        while proc.poll() is None:
            fields = _status_fields(proc.pid)
            if fields:
                samples += 1
                anon = max(anon, fields.get("RssAnon", 0))
                rss = max(rss, fields.get("VmRSS", 0))
                hwm = max(hwm, fields.get("VmHWM", 0))
            time.sleep(interval)
        elapsed = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise BenchError(f"command failed with exit code {proc.returncode}: "
                         f"{' '.join(map(str, cmd))}\n"
                         f"stderr: {stderr[-2000:]}")
    return MemorySample(elapsed, anon, rss, hwm, samples, proc.returncode, stdout, stderr)


# --- results -----------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


@dataclass
class Measurement:
    """Repetitions of one thing; the median is what is reported."""

    label: str
    times: list[float] = field(default_factory=list)
    unit: str = "s"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float | None:
        return median(self.times) if self.times else None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"label": self.label, "unit": self.unit, "median": self.median,
                                "reps": len(self.times), "times": [round(t, 6) for t in self.times]}
        if self.times:
            data["min"] = min(self.times)
            data["max"] = max(self.times)
        if self.note:
            data["note"] = self.note
        if self.extra:
            data.update(self.extra)
        return data


@dataclass
class Criterion:
    """One target: a value (a ratio or a time) compared with a limit."""

    text: str
    value: float | None
    limit: float
    op: str  # "<=", ">=", "<"
    unit: str = "x"
    verdict: str = SKIP
    note: str = ""

    def __post_init__(self) -> None:
        if self.value is None:
            self.verdict = SKIP
        elif self.op == "<=":
            self.verdict = PASS if self.value <= self.limit else FAIL
        elif self.op == ">=":
            self.verdict = PASS if self.value >= self.limit else FAIL
        elif self.op == "<":
            self.verdict = PASS if self.value < self.limit else FAIL
        elif self.op == "==":
            self.verdict = PASS if self.value == self.limit else FAIL
        else:
            raise ValueError(self.op)

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "value": self.value, "op": self.op, "limit": self.limit,
                "unit": self.unit, "verdict": self.verdict,
                **({"note": self.note} if self.note else {})}


@dataclass
class ScenarioResult:
    id: str
    name: str
    title: str
    target: str
    method: str = ""
    measurements: list[Measurement] = field(default_factory=list)
    criteria: list[Criterion] = field(default_factory=list)
    ratios: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skip_reason: str | None = None
    primary: str | None = None  # label of the measurement whose median is the scenario's median
    seconds: float = 0.0
    error: str | None = None  # the scenario could not be measured (a command failed)

    def add(self, m: Measurement) -> Measurement:
        self.measurements.append(m)
        return m

    def get(self, label: str) -> Measurement | None:
        return next((m for m in self.measurements if m.label == label), None)

    @property
    def median(self) -> float | None:
        if self.primary is None:
            return None
        m = self.get(self.primary)
        return m.median if m else None

    @property
    def verdict(self) -> str:
        if self.error is not None:
            return ERROR
        if self.skip_reason is not None and not self.criteria:
            return SKIP
        verdicts = {c.verdict for c in self.criteria}
        if FAIL in verdicts:
            return FAIL
        if PASS in verdicts:
            return PASS
        return SKIP

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "title": self.title, "target": self.target,
            "method": self.method, "verdict": self.verdict, "median": self.median,
            "median_of": self.primary, "skip_reason": self.skip_reason, "error": self.error,
            "measurements": [m.to_json() for m in self.measurements],
            "ratios": self.ratios,
            "criteria": [c.to_json() for c in self.criteria],
            "notes": self.notes, "seconds": round(self.seconds, 1),
        }


# --- the machine -------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def filesystem_of(path: str | os.PathLike[str]) -> dict[str, str]:
    """The mount (device, mount point, type) holding `path`, from /proc/self/mounts."""
    target = os.path.realpath(path)
    best = {"device": "?", "mount": "/", "type": "unknown"}
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best["mount"]):
                    best = {"device": parts[0], "mount": mount, "type": parts[2]}
    except OSError:
        pass
    return best


def _pkg_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info(workdir: Path, peers: dict[str, Any]) -> dict[str, Any]:
    fs = filesystem_of(workdir)
    mem_kb = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "os": platform.platform(),
        "filesystem": fs["type"],
        "mount": fs["mount"],
        "workdir": str(workdir),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "versions": {
            "stagestore": _pkg_version("stagestore"),
            "blake3": _pkg_version("blake3"),
            "msgspec": _pkg_version("msgspec"),
            "click": _pkg_version("click"),
            "filelock": _pkg_version("filelock"),
            "dvc": peers.get("dvc_version"),
            "snakemake": peers.get("snakemake_version"),
            "b3sum": peers.get("b3sum_version"),
            "zstd": peers.get("zstd_version"),
            "zstandard": _pkg_version("zstandard"),
            "cryptography": _pkg_version("cryptography"),
        },
    }


def source_fingerprint(package: str = "stagestore") -> dict[str, Any]:
    """Which code was measured, without asking a version-control tool: a BLAKE3 over the
    package's .py files (paths and bytes, sorted), their count and the newest mtime."""
    import importlib.util

    import blake3

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return {"path": None, "digest": None}
    root = Path(list(spec.submodule_search_locations)[0])
    hasher = blake3.blake3()
    newest = 0.0
    files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    for path in files:
        rel = path.relative_to(root).as_posix().encode()
        hasher.update(len(rel).to_bytes(4, "little") + rel)
        body = path.read_bytes()
        hasher.update(len(body).to_bytes(8, "little") + body)
        newest = max(newest, path.stat().st_mtime)
    return {"path": str(root), "files": len(files), "digest": hasher.hexdigest()[:16],
            "newest_mtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(newest))}


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


# --- output ------------------------------------------------------------------------------


def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        if value < 1:
            return f"{value * 1000:.1f} ms"
        return f"{value:.3f} s"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "MB":
        return f"{value:.1f} MB"
    if unit == "us":
        return f"{value:.1f} us"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "n":
        return f"{value:g}"
    if unit == "GB/s":
        return f"{value:.2f} GB/s"
    return f"{value:g} {unit}"


def _op_text(op: str) -> str:
    return {"<=": "<=", ">=": ">=", "<": "<", "==": "=="}[op]


def render_table(report: dict[str, Any], results: list[ScenarioResult]) -> str:
    lines: list[str] = []
    m = report["machine"]
    lines.append(f"stagestore benchmark ({report['mode']}), {report['date']}")
    lines.append(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, kernel "
                 f"{m['kernel']}, workdir on {m['filesystem']} ({m['mount']}), "
                 f"python {m['python']}")
    v = m["versions"]
    names = ("stagestore", "blake3", "msgspec", "click", "dvc", "b3sum", "zstd", "zstandard",
             "cryptography")
    lines.append("versions: " + ", ".join(f"{k} {v.get(k) or 'absent'}" for k in names))
    lines.append(f"load average: start {report['loadavg_start']}, end {report['loadavg_end']}")
    src = report.get("stagestore_source", {})
    if src:
        start = src["start"]
        lines.append(f"stagestore source: {start.get('path')} ({start.get('files')} .py files, "
                     f"digest {start.get('digest')}, newest file {start.get('newest_mtime')})"
                     + ("; CHANGED DURING THE RUN" if src.get("changed_during_run") else ""))
    lines.append("method: medians of repetitions, warm page cache; ratios from the same run")
    lines.append("")
    lines.append("== floors (measured in this run)")
    for name, f in report["floors"].items():
        lines.append(f"  {f['label']:<58} {fmt_value(f['median'], f['unit']):>12}  n={f['reps']}")
    for r in results:
        lines.append("")
        lines.append(f"== {r.id}. {r.title}   [{r.verdict}]")
        if r.skip_reason:
            lines.append(f"  skipped: {r.skip_reason}")
        if r.error:
            lines.append("  error: " + r.error.strip().replace("\n", "\n    "))
        for meas in r.measurements:
            value = fmt_value(meas.median, meas.unit)
            lines.append(f"  {meas.label:<58} {value:>12}  n={len(meas.times)}")
        for name, value in r.ratios.items():
            lines.append(f"  ratio {name:<52} {fmt_value(value, 'x'):>12}")
        for c in r.criteria:
            lines.append(f"  target: {c.text:<50} {fmt_value(c.value, c.unit):>12} "
                         f"{_op_text(c.op)} {fmt_value(c.limit, c.unit):<10} {c.verdict}"
                         + (f"  ({c.note})" if c.note else ""))
        for note in r.notes:
            lines.append(f"  note: {note}")
    lines.append("")
    lines.append("== summary")
    lines.append(f"  {'#':<3} {'scenario':<44} {'median':>12}  verdict")
    for r in results:
        unit = r.get(r.primary).unit if r.primary and r.get(r.primary) else "s"
        lines.append(f"  {r.id:<3} {r.title[:44]:<44} {fmt_value(r.median, unit):>12}  {r.verdict}")
    return "\n".join(lines)


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def interleave(reps: int, steps: Sequence[tuple[str, Callable[[], float]]],
               into: dict[str, Measurement]) -> None:
    """Run every step once per repetition, in turn, so that a change of load during the
    scenario affects all of them alike; the order rotates from one repetition to the next
    (A B C, B C A, C A B, ...), so that no step always follows the same one (a step that
    deletes gigabytes leaves the filesystem busy for the next)."""
    n = len(steps)
    for rep in range(reps):
        for k in range(n):
            label, step = steps[(rep + k) % n]
            into[label].times.append(step())
