"""launch/slurm/train.sbatch on a real (one-node) SLURM: exit codes, logs, checkpoints, and a
requeued job resuming from its checkpoint. Skipped where sbatch is not installed."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

SBATCH = str(Path(__file__).resolve().parents[2] / "launch" / "slurm" / "train.sbatch")
TWO_TASKS = ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2"]


def test_requeued_job_resumes_from_its_checkpoint(tmp_path, kit, slurm):
    config = kit.tiny_config(tmp_path / "run.yaml", steps=4, stop_at_step=2)
    job = slurm.submit([*TWO_TASKS, "--job-name=mr1-requeue", SBATCH, "sft", str(config)],
                       tmp_path, kit.launch_env())
    first = slurm.wait_job(job)
    assert (first["JobState"], first["ExitCode"], first["Restarts"]) == ("COMPLETED", "0:0", "0")
    run = tmp_path / "runs" / f"mr1-requeue-{job}"
    assert kit.loss_steps(run) == [1, 2]
    assert (run / "checkpoints" / "latest").read_text() == "step_0000002"
    rank_log = (run / "logs" / f"{job}.0.log").read_text()
    assert "rank 0/2 (slurm, gloo)" in rank_log and "saved" in rank_log

    # The job comes back with the same id, script and arguments (as after a preemption or
    # the time-limit signal); lifting the stop lets it run on to train.steps.
    kit.tiny_config(config, steps=4)
    slurm.requeue_now(job)
    second = slurm.wait_job(job)
    assert (second["JobState"], second["ExitCode"], second["Restarts"]) == (
        "COMPLETED", "0:0", "1")
    assert kit.loss_steps(run) == [1, 2, 3, 4]  # rows continue from the saved step
    assert (run / "checkpoints" / "latest").read_text() == "step_0000004"
    resumed = (run / "logs" / f"{job}.1.log").read_text()
    assert "checkpoints/step_0000002 (resume)" in resumed
    batch_log = (tmp_path / f"mr1-requeue-{job}.out").read_text()
    assert f"job {job} attempt 0 finished" in batch_log  # appended, not overwritten
    assert f"job {job} attempt 1 finished" in batch_log


def test_bad_config_fails_the_job_with_exit_code_2(tmp_path, kit, slurm):
    job = slurm.submit([*TWO_TASKS, "--job-name=mr1-bad", SBATCH, "sft", "--set",
                        "train.steps=0"], tmp_path, kit.launch_env())
    fields = slurm.wait_job(job)
    assert (fields["JobState"], fields["ExitCode"]) == ("FAILED", "2:0")
    batch_log = (tmp_path / f"mr1-bad-{job}.out").read_text()
    assert "failed with exit code 2" in batch_log
    assert "train.steps=0: must be > 0" in batch_log  # the rank log's tail is shown


def test_time_limit_signal_requeues_the_job(tmp_path, kit, slurm):
    """USR1 is what --signal=B:USR1@300 delivers before the time limit: the batch script
    requeues its job (a stand-in program passes the config check, then sleeps instead of
    training)."""
    sleeper = tmp_path / "sleeper.sh"
    sleeper.write_text("#!/bin/bash\n"
                       'for a in "$@"; do [[ $a == --check-world-size ]] && exit 0; done\n'
                       "sleep 120\n")
    sleeper.chmod(0o755)
    job = slurm.submit([*TWO_TASKS, "--job-name=mr1-usr1", SBATCH, "sft"], tmp_path,
                       kit.launch_env(MR1_LAUNCHER=str(sleeper)))
    try:
        slurm.wait_job(job, 60, {"RUNNING"})
        time.sleep(2)  # let the batch script reach its `wait`
        sent = subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)],
                              capture_output=True, text=True, timeout=30)
        assert sent.returncode == 0, sent.stderr
        deadline = time.monotonic() + 60
        while slurm.job_fields(job).get("Restarts") != "1" and time.monotonic() < deadline:
            time.sleep(1)
        assert slurm.job_fields(job).get("Restarts") == "1"
        batch_log = (tmp_path / f"mr1-usr1-{job}.out").read_text()
        assert "time limit near, requeueing" in batch_log
    finally:
        subprocess.run(["scancel", str(job)], timeout=30)
