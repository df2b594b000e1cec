"""The GRPO loss and its gradient do not depend on the data-parallel layout or on how the
step is split into micro-batches (the denominator is global), nor on tensor parallelism of the
vocabulary (the fused op's statistics are all-reduced). gloo, world size 2.

Tolerance: relative 1e-5, for the same reason as tests/e2e/test_sft_parallel.py: fp32, only the
order of floating-point sums changes (measured: ~1e-7)."""

from __future__ import annotations

import json

import pytest

from procs import REPO, run_script

AGGREGATIONS = ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"]


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
    run = tmp_path_factory.mktemp("init")
    run_script(REPO / "tests/e2e/save_initial_checkpoint.py", [f"logging.run_dir={run}"])
    return run / "checkpoints"


def grpo_step(tmp_path, initial, nproc, *overrides):
    args = [f"logging.run_dir={tmp_path}", f"checkpoint.load_dir={initial}",
            "checkpoint.load_optimizer=false", "train.global_batch_size=16",
            "grpo.kl_coef=0.05", *overrides]
    proc = run_script(REPO / "tests/e2e/grpo_step_worker.py", args, nproc=nproc)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_loss_and_gradient_independent_of_split_and_dp(tmp_path, initial, aggregation):
    mode = f"grpo.loss_aggregation={aggregation}"
    base = grpo_step(tmp_path / "one", initial, 1, mode, "train.micro_batch_size=16")
    for name, nproc, overrides in (
            ("split", 1, ["train.micro_batch_size=2"]),
            ("dp2", 2, ["train.micro_batch_size=4"]),
            ("tp2", 2, ["train.micro_batch_size=8", "parallel.tensor=2"])):
        got = grpo_step(tmp_path / name, initial, nproc, mode, *overrides)
        for key in ("loss", "kl", "grad_norm"):
            assert got[key] == pytest.approx(base[key], rel=1e-5), (name, key)
    assert base["grad_norm"] > 0 and base["kl"] > 0
