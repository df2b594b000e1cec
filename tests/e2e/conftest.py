"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sft_checkpoint(tmp_path_factory):
    """The tiny policy after 60 SFT steps (one run for every GRPO test of the session)."""
    from grpo_runs import sft_checkpoint as train

    return train(tmp_path_factory.mktemp("sft"))


@pytest.fixture(scope="session")
def grpo_straight(tmp_path_factory, sft_checkpoint):
    """World size 1, one engine: GRPO for two rollouts from the SFT policy, a checkpoint after
    each (grpo_runs.STRAIGHT). The run tests/e2e/test_grpo_train.py checks and cuts to resume,
    and the one every layout of tests/e2e/test_grpo_scaleout.py must reproduce."""
    from grpo_runs import STRAIGHT, grpo

    run = tmp_path_factory.mktemp("grpo_straight")
    grpo(run, sft_checkpoint, *STRAIGHT)
    return run


@pytest.fixture(scope="session")
def initial(tmp_path_factory):
    """The default config's step-0 checkpoint at world size 1: runs at other layouts start
    from exactly these weights."""
    from procs import REPO, run_script

    run = tmp_path_factory.mktemp("init")
    run_script(REPO / "tests/e2e/save_initial_checkpoint.py", [f"logging.run_dir={run}"])
    return run / "checkpoints"


@pytest.fixture(scope="session")
def helpfulness_model(tmp_path_factory, sft_checkpoint):
    """A pairwise reward model from the SFT policy: 40 `megatron-r1 rm` steps on generated
    arithmetic pairs that prefer the correct final answer (measured: held-out pair accuracy
    0.42 -> 0.83, 34 s on 2 cores); returns its checkpoints."""
    from grpo_runs import TINY
    from procs import run_module

    run = tmp_path_factory.mktemp("rm")
    run_module(["rm", *TINY, "--set", "train.steps=40", "--set", f"logging.run_dir={run}",
                "--set", f"checkpoint.load_dir={sft_checkpoint}",
                "--set", "checkpoint.load_optimizer=false"])
    return run / "checkpoints"
