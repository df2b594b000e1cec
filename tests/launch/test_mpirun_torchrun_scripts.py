"""launch/mpirun.sh (2 MPI ranks, the `mpich` wheel, as root) and launch/torchrun.sh: a run,
its resume by running the same command again, and the exit code of bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _mpirun() -> str:
    found = shutil.which("mpirun") or shutil.which("mpirun", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("no mpirun (pip install mpich)")
    return found


def run(script: str, args: list[str], env: dict[str, str], cwd: Path,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "launch" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_mpirun_two_ranks_run_then_resume(tmp_path, kit):
    env = kit.launch_env(MPIRUN=_mpirun(), MR1_RUN_DIR=str(tmp_path / "run"))
    config = kit.tiny_config(tmp_path / "run.yaml", steps=4, stop_at_step=2)
    first = run("mpirun.sh", ["-n", "2", "--", "sft", str(config)], env, tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "rank 0/2 (mpi, gloo)" in first.stdout
    assert kit.loss_steps(tmp_path / "run") == [1, 2]

    kit.tiny_config(config, steps=4)
    second = run("mpirun.sh", ["-n", "2", "--", "sft", str(config)], env, tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "step_0000002 (resume)" in second.stdout
    assert kit.loss_steps(tmp_path / "run") == [1, 2, 3, 4]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_0000004"
    logs = sorted((tmp_path / "run" / "logs").glob("mpirun-*.log"))
    assert len(logs) == 2 and "step_0000002 (resume)" in logs[-1].read_text()  # one per launch


def test_mpirun_bad_input_exits_2(tmp_path, kit):
    env = kit.launch_env(MPIRUN=_mpirun())
    bad = run("mpirun.sh", ["-n", "2", "--", "sft", "--set", "train.steps=0"], env, tmp_path)
    assert bad.returncode == 2
    assert "train.steps=0: must be > 0" in bad.stdout + bad.stderr
    missing = run("mpirun.sh", ["-n", "2", "--", "sft", "nowhere.yaml"], env, tmp_path)
    assert missing.returncode == 2
    assert "config file not found: nowhere.yaml" in missing.stderr


def test_torchrun_two_ranks(tmp_path, kit):
    env = kit.launch_env(NPROC_PER_NODE="2", PYTHON=sys.executable,
                         MR1_RUN_DIR=str(tmp_path / "run"))
    config = kit.tiny_config(tmp_path / "run.yaml", steps=1)
    proc = run("torchrun.sh", ["sft", str(config)], env, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert kit.loss_steps(tmp_path / "run") == [1]
    # torchrun reports any failed rank as 1 (the rank's own code is in its error summary)
    bad = run("torchrun.sh", ["sft", "--set", "train.steps=0"], env, tmp_path)
    assert bad.returncode == 1
    assert "train.steps=0: must be > 0" in bad.stderr


def test_arguments_pass_through_unchanged(tmp_path, kit):
    """COMMAND and CONFIG are recognised; everything else reaches megatron-r1 verbatim."""
    (tmp_path / "c.yaml").write_text("{}\n")
    probe = (f'source {REPO}/launch/common.sh; mr1_parse_args "$@" && '
             'printf "%s\\n" "${MR1_ARGS[@]}"')
    env = kit.launch_env(MR1_RUN_DIR="runs/x")

    def parsed(*args: str) -> list[str]:
        out = subprocess.run(["bash", "-c", probe, "probe", *args], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    assert parsed("c.yaml", "--set", "grpo.kl_coef=0.001") == [
        "train", "--config", "c.yaml", "--set", "logging.run_dir=runs/x", "--set",
        "grpo.kl_coef=0.001"]
    assert parsed("sft") == ["sft", "--set", "logging.run_dir=runs/x"]
    assert parsed("convert", "hf-to-mcore", "--hf", "a b", "--out", "o") == [
        "convert", "hf-to-mcore", "--hf", "a b", "--out", "o"]
