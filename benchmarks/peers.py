"""The peers stagestore is compared with: `b3sum` and `zstd` (on PATH), `dvc` and `snakemake`
(each in its own venv).

DVC lives in `benchmarks/.venv-dvc`, created on first use of the full benchmark with
`python3 -m venv` and `pip install dvc`, so it never touches the project's own environment.
Snakemake lives in `benchmarks/.venv-snakemake`, made the same way (`pip install snakemake`)
with the system `python3` (Snakemake 9 needs Python 3.11 or later).
When the install fails, or b3sum is not on PATH, the rows that need them are skipped with the
reason; without `zstd` on PATH, scenario 10 compares with python-zstandard's one-shot compressor.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DVC_VENV = HERE / ".venv-dvc"
SNAKEMAKE_VENV = HERE / ".venv-snakemake"
DVC_INSTALL_TIMEOUT = 1800


@dataclass
class Peers:
    b3sum: str | None = None
    b3sum_version: str | None = None
    b3sum_missing: str = ""
    dvc: str | None = None
    dvc_version: str | None = None
    dvc_missing: str = ""
    zstd: str | None = None
    zstd_version: str | None = None
    zstd_missing: str = ""
    snakemake: str | None = None
    snakemake_version: str | None = None
    snakemake_missing: str = ""
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, str | None]:
        return {"b3sum": self.b3sum, "b3sum_version": self.b3sum_version,
                "b3sum_missing": self.b3sum_missing or None, "dvc": self.dvc,
                "dvc_version": self.dvc_version, "dvc_missing": self.dvc_missing or None,
                "zstd": self.zstd, "zstd_version": self.zstd_version,
                "zstd_missing": self.zstd_missing or None, "snakemake": self.snakemake,
                "snakemake_version": self.snakemake_version,
                "snakemake_missing": self.snakemake_missing or None}


def _version(cmd: list[str], env: dict[str, str] | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    text = out.stdout.strip() or out.stderr.strip()
    return text.splitlines()[-1] if text else ""


def find_b3sum() -> tuple[str | None, str | None, str]:
    path = shutil.which("b3sum")
    if path is None:
        return None, None, "b3sum is not on PATH (Debian: apt-get install b3sum)"
    version = _version([path, "--version"])
    if version is None:
        return None, None, f"{path} --version failed"
    return path, version.removeprefix("b3sum ").strip(), ""


def find_zstd() -> tuple[str | None, str | None, str]:
    path = shutil.which("zstd")
    if path is None:
        return None, None, "zstd is not on PATH (Debian: apt-get install zstd)"
    version = _version([path, "--version"])
    if version is None:
        return None, None, f"{path} --version failed"
    # "*** Zstandard CLI (64-bit) v1.5.4, by Yann Collet ***"
    words = [w.strip(",") for w in version.split() if w.startswith("v") and w[1:2].isdigit()]
    return path, words[0].removeprefix("v") if words else version, ""


def dvc_env(site_cache: Path | None = None) -> dict[str, str]:
    """The environment every dvc command runs with: no analytics, no update check, and its
    site cache inside the benchmark's workdir (so nothing is left in /var/tmp)."""
    env = dict(os.environ)
    # DVC's venv holds the bytecode pip compiled at install; it writes what is missing there.
    env.pop("PYTHONPYCACHEPREFIX", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["DVC_NO_ANALYTICS"] = "1"
    env["DVC_IGNORE_ISATTY"] = "1"
    if site_cache is not None:
        env["DVC_SITE_CACHE_DIR"] = str(site_cache)
        env["DVC_GLOBAL_CONFIG_DIR"] = str(site_cache / "global-config")
    return env


def _venv_install(venv: Path, package: str, log: callable) -> str | None:
    """`python3 -m venv VENV; VENV/bin/pip install PACKAGE`; None, or why it failed."""
    log(f"installing {package} into {venv} (python3 -m venv; pip install {package}) ...")
    base = shutil.which("python3") or sys.executable
    try:
        subprocess.run([base, "-m", "venv", str(venv)], check=True, capture_output=True,
                       text=True, timeout=300, stdin=subprocess.DEVNULL)
        out = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", package],
                             capture_output=True, text=True, timeout=DVC_INSTALL_TIMEOUT,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"installing {package} failed: {exc}"
    if out.returncode != 0:
        tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-5:])
        return f"pip install {package} failed (exit {out.returncode}): {tail}"
    return None


def find_dvc(install: bool, log: callable = print) -> tuple[str | None, str | None, str]:
    dvc = DVC_VENV / "bin" / "dvc"
    if not dvc.exists():
        if not install:
            return None, None, (f"dvc is not installed in {DVC_VENV} (the quick mode does not "
                                "install it; the full mode does)")
        if (why := _venv_install(DVC_VENV, "dvc", log)) is not None:
            return None, None, why
        if not dvc.exists():
            return None, None, f"pip install dvc did not make {dvc}"
    version = _version([str(dvc), "--version"], env=dvc_env())
    if version is None:
        return None, None, f"{dvc} --version failed"
    return str(dvc), version, ""


def snakemake_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a snakemake command: its venv compiled its own bytecode at install, so the
    benchmark's bytecode cache prefix is not passed on."""
    env = dict(env)
    env.pop("PYTHONPYCACHEPREFIX", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def find_snakemake(install: bool, log: callable = print) -> tuple[str | None, str | None, str]:
    smk = SNAKEMAKE_VENV / "bin" / "snakemake"
    if not smk.exists():
        if not install:
            return None, None, (f"snakemake is not installed in {SNAKEMAKE_VENV} (the quick "
                                "mode does not install it; the full mode does)")
        if (why := _venv_install(SNAKEMAKE_VENV, "snakemake", log)) is not None:
            return None, None, why
        if not smk.exists():
            return None, None, f"pip install snakemake did not make {smk}"
    version = _version([str(smk), "--version"], env=snakemake_env(dict(os.environ)))
    if version is None:
        return None, None, f"{smk} --version failed"
    return str(smk), version, ""


def discover(install_dvc: bool, use_dvc: bool = True, use_b3sum: bool = True,
             log: callable = print, use_zstd: bool = True,
             use_snakemake: bool = False) -> Peers:
    """The peers; DVC and Snakemake are installed into their venvs when `install_dvc` (the
    full mode) and missing.  Snakemake is only looked for when a scenario that needs it was
    selected (`use_snakemake`)."""
    peers = Peers()
    if use_zstd:
        peers.zstd, peers.zstd_version, peers.zstd_missing = find_zstd()
    else:
        peers.zstd_missing = "zstd disabled (--no-zstd)"
    if use_b3sum:
        peers.b3sum, peers.b3sum_version, peers.b3sum_missing = find_b3sum()
    else:
        peers.b3sum_missing = "b3sum disabled (--no-b3sum)"
    if use_dvc:
        peers.dvc, peers.dvc_version, peers.dvc_missing = find_dvc(install_dvc, log)
    else:
        peers.dvc_missing = "dvc disabled (--no-dvc)"
    if use_snakemake:
        peers.snakemake, peers.snakemake_version, peers.snakemake_missing = find_snakemake(
            install_dvc, log)
    else:
        peers.snakemake_missing = "snakemake disabled (--no-snakemake, or not needed)"
    return peers
