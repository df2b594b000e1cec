"""Test support: run the real CLI in fresh processes (torchrun for world size > 1).

Imported by tests as `procs` (tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["OMP_NUM_THREADS"] = "1"  # 2 cores shared by up to 4 ranks
    return env


def run_module(args: list[str], *, nproc: int = 1, timeout: float = 300,
               check: bool = True) -> subprocess.CompletedProcess[str]:
    """`python -m megatron_r1 ARGS`, or under torchrun with `nproc` processes."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "megatron_r1", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "megatron_r1", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_script(script: Path, args: list[str], *, nproc: int = 1, timeout: float = 300,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python SCRIPT ARGS` (under torchrun for nproc > 1), with `env` added to the
    environment; raises with its stderr on failure."""
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone",
                                      f"--nproc-per-node={nproc}"]
    proc = subprocess.run([sys.executable, *launcher, str(script), *args], cwd=REPO,
                          env={**_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed:\n{proc.stderr[-6000:]}")
    return proc


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]



def run_python(code: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter (megatron's global state and the CPU redirections
    stay out of the test process); the caller inspects returncode, stdout and stderr."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
