"""`python -m benchmarks [--quick] [--only S,...] [--reps N] [--json PATH] [--workdir DIR]`."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from .harness import (ScenarioResult, loadavg, machine_info, render_table, source_fingerprint,
                      write_json)
from .peers import discover
from .scale import NEEDS_SNAKEMAKE, OPT_IN, SCALE_SCENARIOS
from .scenarios import SCENARIOS, Bench, Config

ALL_SCENARIOS = SCENARIOS + SCALE_SCENARIOS

METHOD = (
    "Every number is the median of repetitions measured in this one run, on a warm page cache "
    "(the cache cannot be dropped without root on a shared machine, so one untimed warm-up "
    "precedes the timed repetitions where it matters). Steps of a scenario are interleaved per "
    "repetition in a rotating order (A B C, B C A, ...), so load changes hit all of them alike. "
    "Commands are timed whole (wall clock around the process, interpreter start-up included) "
    "unless the label says in-process. Python processes read compiled bytecode (a cache in the "
    "scratch folder). Ratios are computed from medians of the same run; differences are medians "
    "of per-repetition differences. See benchmarks/README.md.")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks",
                                description="Benchmark stagestore against b3sum, DVC, Snakemake, "
                                            "zstd, cryptography and floors.",
                                epilog="Opt-in scenarios (run only when named in --only): "
                                       + ", ".join(sorted(OPT_IN)) + ".")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and one repetition; dvc only if already installed")
    p.add_argument("--only", metavar="S,...",
                   help="scenarios to run, by number or name (e.g. 1,4 or hash,noop_rerun); "
                        "without it, every scenario but the opt-in ones")
    p.add_argument("--reps", type=int, help="repetitions (default 5; 3 for the big scenarios; "
                                            "1 with --quick)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    p.add_argument("--workdir", metavar="DIR",
                   help="make the scratch folder inside DIR (default: the system temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--no-dvc", action="store_true", help="skip the DVC rows")
    p.add_argument("--no-snakemake", action="store_true", help="skip the Snakemake rows")
    p.add_argument("--no-b3sum", action="store_true", help="skip the b3sum rows")
    p.add_argument("--no-zstd", action="store_true",
                   help="do not use the zstd command (scenario 10 then compares with "
                        "python-zstandard's one-shot compressor)")
    args = p.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be at least 1")
    return args


def _select(only: str | None) -> list[tuple[str, str, object]]:
    if not only:
        # The opt-in scenarios take tens of minutes each: only when named.
        return [s for s in ALL_SCENARIOS if s[1] not in OPT_IN]
    wanted = {w.strip() for w in only.split(",") if w.strip()}
    chosen = [s for s in ALL_SCENARIOS if s[0] in wanted or s[1] in wanted]
    unknown = wanted - {s[0] for s in chosen} - {s[1] for s in chosen}
    if unknown:
        names = ", ".join(f"{i} {n}" for i, n, _ in ALL_SCENARIOS)
        raise SystemExit(f"unknown scenario(s) {', '.join(sorted(unknown))}; choose from {names}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    selected = _select(args.only)
    cfg = Config.make(args.quick, args.reps, keep=args.keep)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", file=sys.stderr, flush=True)

    base = Path(args.workdir) if args.workdir else None
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="stagestore-bench-", dir=base)).resolve()
    try:
        return _bench(args, selected, cfg, workdir, started, log)
    finally:
        if cfg.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _bench(args: argparse.Namespace, selected: list, cfg: Config, workdir: Path,
           started: float, log) -> int:  # noqa: ANN001
    # Every Python process measured reads compiled bytecode, as from an installed package:
    # PYTHONDONTWRITEBYTECODE (set in some shells and CI) would make each stagestore command
    # compile its modules from source.  The cache lives in the scratch folder, so nothing is
    # written into the source tree under test.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
    load_start = loadavg()
    log(f"workdir {workdir}; load average {load_start}")
    peers = discover(install_dvc=not cfg.quick, use_dvc=not args.no_dvc,
                     use_b3sum=not args.no_b3sum, log=log, use_zstd=not args.no_zstd,
                     use_snakemake=not args.no_snakemake
                     and any(name in NEEDS_SNAKEMAKE for _, name, _ in selected))
    for name in ("b3sum", "dvc", "zstd", "snakemake"):
        path = getattr(peers, name)
        log(f"{name}: {path} ({getattr(peers, name + '_version')})" if path
            else f"{name}: skipped: {getattr(peers, name + '_missing')}")
    machine = machine_info(workdir, peers.to_json())
    source_start = source_fingerprint()
    log(f"stagestore source {source_start['path']}: {source_start.get('files')} files, digest "
        f"{source_start['digest']}, newest {source_start.get('newest_mtime')}")
    bench = Bench(cfg, peers, workdir, log)
    try:
        bench.warm_up()
    except Exception as exc:  # noqa: BLE001 - the scenarios still warm up on their own
        log(f"warm-up failed: {exc}")
    results: list[ScenarioResult] = []
    errors = 0
    try:
        for sid, name, func in selected:
            log(f"scenario {sid} {name} ...")
            t0 = time.perf_counter()
            try:
                result = func(bench)
            except Exception as exc:  # noqa: BLE001 - reported, and the others still run
                errors += 1
                result = ScenarioResult(sid, name, name, target="", error=(
                    f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"))
                log(f"scenario {sid} {name} ERROR: {exc}")
            result.seconds = time.perf_counter() - t0
            results.append(result)
            log(f"scenario {sid} {name}: {result.verdict} ({result.seconds:.1f} s)")
    finally:
        bench.close()  # the S3 server of scenarios 13-15, before the scratch folder goes
    source_end = source_fingerprint()
    if source_end["digest"] != source_start["digest"]:
        log("WARNING: the stagestore source changed during the run; results mix versions")
    report = {
        "mode": "quick" if cfg.quick else "full",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "machine": machine,
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "method": METHOD,
        "stagestore_source": {"start": source_start, "end": source_end,
                              "changed_during_run": source_end["digest"] != source_start["digest"]},
        "config": {"reps": cfg.reps, "big_reps": cfg.big_reps, "big_size": cfg.big_size,
                   "mem_size": cfg.mem_size, "nfiles": cfg.nfiles, "file_size": cfg.file_size,
                   "kind_size": cfg.kind_size,
                   "scale_steps": cfg.scale_steps, "remote_rows": cfg.remote_rows,
                   "noop_objects": cfg.noop_objects, "folder": cfg.folder,
                   "folder_big": cfg.folder_big, "items": cfg.items, "items_big": cfg.items_big,
                   "store_runs": cfg.store_runs, "store_runs_big": cfg.store_runs_big},
        "peers": peers.to_json(),
        "floors": {k: m.to_json() for k, m in bench.floors.items()},
        "scenarios": [r.to_json() for r in results],
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(render_table(report, results))
    if args.json:
        write_json(Path(args.json), report)
        log(f"wrote {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
