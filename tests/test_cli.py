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


@pytest.mark.parametrize(("per_node", "env", "message"), [
    (["--ranks-per-node", "8"], {}, None),  # two whole nodes
    (["--ranks-per-node", "4"], {}, None),  # four
    ([], {"LOCAL_WORLD_SIZE": "8"}, None),  # torchrun's
    ([], {"SLURM_TASKS_PER_NODE": "8(x6)"}, None),  # SLURM's, in the batch script
    (["--ranks-per-node", "6"], {}, "rollout.tensor_parallel=16 spans nodes of 6 ranks but "
                                    "not whole ones"),
    ([], {"SLURM_TASKS_PER_NODE": "12(x4)"}, "rollout.tensor_parallel=16 spans nodes of 12 "
                                               "ranks but not whole ones"),
])
def test_check_world_size_knows_the_node_size_of_engines_across_nodes(
        per_node, env, message, capsys, monkeypatch):
    """An engine wider than a node starts only on whole nodes (rollout/placement.py): the
    pre-flight refuses the others before any rank builds a model, naming the field."""
    from megatron_r1.cli import main

    for key in ("LOCAL_WORLD_SIZE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    rc = main(["train", *(arg for item in (
        "rollout.tensor_parallel=16", "model.num_attention_heads=16", "model.num_query_groups=16",
        "train.global_batch_size=96", "grpo.prompts_per_rollout=24", "parallel.tensor=2") for arg in ("--set", item)),
        "--check-world-size", "48", *per_node])
    out = capsys.readouterr()
    if message is None:
        assert rc == 0 and "config and layout valid for 48 process(es)" in out.out, out.err
    else:
        assert rc == 2 and message in out.err, out.err


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
    assert main([command, "--config", str(path), "--check-world-size", "512",
                 "--ranks-per-node", "8"]) == 0  # 64 nodes of 8 GPUs
    assert "config and layout valid for 512 process(es), 8 per node" in capsys.readouterr().out
