"""The command line: bad input ends with exit code 2 and one line naming the problem, before
any process group exists."""

from __future__ import annotations

import pytest

from procs import REPO, run_module


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "parallel.tensor=3"],
     "parallel.tensor=3 x parallel.pipeline=1 x parallel.context=1 = 3 does not divide the world size 1"),
    (["--set", "model.num_layers=zero"], "model.num_layers: expected int, got str 'zero'"),
    (["--set", "grpo.kl_estimator=k9"], "grpo.kl_estimator: expected 'k1' | 'k2' | 'k3'"),
    (["--config", "configs/nope.yaml"], "config file not found: configs/nope.yaml"),
    (["--set", "train.micro_batch_size=3"], "train.global_batch_size=16: must be a multiple of"),
])
def test_bad_input_is_reported_before_process_groups(args, message):
    proc = run_module(["sft", *args], check=False, timeout=120)
    assert proc.returncode == 2
    assert f"megatron-r1 sft: error: {message}" in proc.stderr
    assert "rank 0/1" not in proc.stderr  # init_parallel logs this line once groups exist
    assert "Traceback" not in proc.stderr


def test_check_world_size_validates_without_starting_anything():
    ok = run_module(["sft", "--set", "parallel.tensor=2", "--check-world-size", "2"], check=False)
    assert ok.returncode == 0 and "config and layout valid for 2 process(es)" in ok.stdout
    bad = run_module(["sft", "--set", "parallel.tensor=2", "--check-world-size", "3"],
                     check=False)
    assert bad.returncode == 2 and "does not divide the world size 3" in bad.stderr


def test_help_lists_the_commands():
    proc = run_module(["--help"], check=False)
    assert proc.returncode == 0 and "sft" in proc.stdout


def test_code_prompts_need_a_reward_time_limit_for_their_tests(tmp_path):
    """Checked on rank 0 once the prompts are read, before the engine starts."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Add two numbers", "tests": [{"input": "1 2", "output": "3"}]}\n')
    proc = run_module(["sample", "--set", "data.source=jsonl", "--set", f"data.path={prompts}",
                       "--set", "reward.timeout_s=2", "--set", f"logging.run_dir={tmp_path}/run",
                       "--set", "logging.tensorboard=false"], check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("megatron-r1 sample: error: reward.timeout_s=2.0: the prompts hold code tests, and "
            "one test may take 5 s") in proc.stderr


R1_PIPELINE = [  # (command, config): every stage of DeepSeek-R1 on the 671B policy
    ("train", "deepseek_v3_671b_r1zero"), ("sft", "r1_stage1_cold_start"),
    ("train", "r1_stage2_reasoning_rl"), ("sample", "r1_stage3_sample"),
    ("sft", "r1_stage3_sft_mix"), ("rm", "r1_reward_helpfulness"), ("rm", "r1_reward_safety"),
    ("train", "r1_stage4_all_scenario"),
]


@pytest.mark.parametrize(("command", "config"), R1_PIPELINE)
def test_every_r1_stage_config_is_valid_on_512_gpus(command, config, capsys):
    from megatron_r1.cli import main

    path = REPO / "configs" / f"{config}.yaml"
    assert main([command, "--config", str(path), "--check-world-size", "512"]) == 0
    assert "config and layout valid for 512 process(es)" in capsys.readouterr().out
