"""Fixtures of the launch-script tests: `kit` (the environment ranks need, tiny-run configs,
metrics) and `slurm` (submit, inspect, wait for and requeue jobs on a live cluster)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def launch_env(**extra: str) -> dict[str, str]:
    """The caller's environment plus what a rank needs to run this checkout on 2 cores."""
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["MR1_LAUNCHER"] = f"{sys.executable} -m megatron_r1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MR1_RUN_DIR"):
        env.pop(key, None)
    env.update(extra)
    return env


def tiny_config(path: Path, **train: int) -> Path:
    """The tiny CPU config with the given train.* values and no progress bar."""
    data = yaml.safe_load((REPO / "configs" / "tiny_moe_cpu.yaml").read_text())
    data["train"].update(train)
    data["logging"] = {"progress_bar": False, "tensorboard": False}
    data["checkpoint"] = {"keep_last": 1}
    path.write_text(yaml.safe_dump(data))
    return path


def loss_steps(run_dir: Path) -> list[int]:
    """Steps of the training rows of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


@pytest.fixture
def kit() -> SimpleNamespace:
    return SimpleNamespace(launch_env=launch_env, tiny_config=tiny_config,
                           loss_steps=loss_steps, launch=LAUNCH, repo=REPO)


# --- SLURM -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def slurm() -> SimpleNamespace:
    """Skip without sbatch; with it, the cluster must answer (launch/ci/start_slurm.sh)."""
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch not on PATH (CI starts a one-node cluster with "
                    "launch/ci/start_slurm.sh)")
    proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip(), (
        f"sbatch is installed but the cluster does not answer ({proc.stderr.strip()}); start "
        "it with launch/ci/start_slurm.sh")
    return SimpleNamespace(submit=submit, job_fields=job_fields, wait_job=wait_job,
                           requeue_now=requeue_now)


def submit(args: list[str], cwd: Path, env: dict[str, str]) -> int:
    proc = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().split(";")[0])


def job_fields(job: int) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job)], capture_output=True,
                         text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(job: int, timeout: float = 300, states: set[str] = TERMINAL) -> dict[str, str]:
    """Poll until the job reaches one of `states`; return its scontrol fields."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = job_fields(job)
        if fields.get("JobState") in states:
            return fields
        time.sleep(1)
    subprocess.run(["scancel", str(job)], timeout=30)
    raise AssertionError(f"job {job} still {job_fields(job).get('JobState')} after {timeout}s")


def requeue_now(job: int) -> None:
    """`scontrol requeue`, then shorten SLURM's ~2 minute hold on requeued jobs. The hold
    exists because slurmd revokes the finished attempt's job credential (one-second clock):
    an attempt that starts within the same second is killed as "credential revoked"."""
    proc = subprocess.run(["scontrol", "requeue", str(job)], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    time.sleep(3)
    proc = subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
