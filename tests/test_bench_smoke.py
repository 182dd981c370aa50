"""The benchmark suite cannot rot: its quick mode runs end to end and writes well-formed JSON.

Only the structure is asserted, never a timing: this machine is shared and the quick sizes are
far too small for the targets to mean anything.  `make bench` runs the real thing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ["hash", "commit_big", "commit_files", "noop_rerun", "noop_big_input", "verify",
             "cli_startup", "memory", "scale", "zstd", "encrypt", "checksum_folder", "push",
             "pull", "noop_push",
             # issue 15 (benchmarks/scale.py); folder_1m, items_10k and store_10k are opt-in
             "folder_100k", "items_1k", "store_footprint"]


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_quick_benchmark_writes_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    work = tmp_path / "work"
    # --no-dvc, --no-snakemake: slow to start and only sometimes installed; `make bench`
    # measures them.
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-dvc", "--no-snakemake", "--json",
         str(out), "--workdir", str(work)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())

    assert report["mode"] == "quick"
    for key in ("cpu", "cores", "kernel", "filesystem", "python", "versions"):
        assert key in report["machine"], key
    for key in ("stagestore", "blake3", "msgspec", "dvc", "b3sum"):
        assert key in report["machine"]["versions"], key
    assert report["date"]
    assert len(report["loadavg_start"]) == 3 and len(report["loadavg_end"]) == 3

    by_name = {s["name"]: s for s in report["scenarios"]}
    assert list(by_name) == SCENARIOS
    for name, s in by_name.items():
        assert s["error"] is None, f"{name}: {s['error']}"
        assert s["target"] and s["method"], name
        assert s["verdict"] in ("PASS", "FAIL", "SKIP"), name
        if s["skip_reason"] is None:
            assert _number(s["median"]), f"{name}: median {s['median']!r}"
            assert s["criteria"], name
        else:
            assert isinstance(s["skip_reason"], str) and s["skip_reason"], name
        for m in s["measurements"]:
            assert m["reps"] == len(m["times"]), (name, m["label"])
            assert all(_number(t) for t in m["times"]), (name, m["label"])
        for c in s["criteria"]:
            assert c["verdict"] in ("PASS", "FAIL", "SKIP"), (name, c)
            assert c["value"] is None or _number(c["value"]), (name, c)
            if c["verdict"] == "SKIP":
                assert c["value"] is None
    # Floors are measured on demand, by the scenarios that need them; all are here.
    assert set(report["floors"]) == {"python_pass", "python_import", "hash_big",
                                     "write_fsync_big", "write_fsync_files"}
    for key, floor in report["floors"].items():
        assert _number(floor["median"]), key
    # The scratch folder is removed at the end.
    assert not any(work.iterdir())
    # The printed table ends with the summary of every scenario.
    assert "== summary" in proc.stdout
