"""The memory and layout planner (megatron_r1.plan).

Per-rank parameter counts: the planner's composed counts equal models built at that layout on
gloo ranks (tiny config on CPU, Qwen3-30B-A3B on meta), rank builds on the fake backend at
512 ranks, and the 671B meta-device total. The memory arithmetic is checked term by term on
small numbers, and the shipped R1-Zero config is the planner's own first choice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from megatron_r1.config import load_config
from megatron_r1.config.schema import ModelConfig
from megatron_r1.layout import resolve_layout
from megatron_r1.plan.activations import (
    MicroBatchShape,
    in_flight_microbatches,
    kept_layer_bytes,
    layer_bytes,
)
from megatron_r1.plan.counts import PartCount, ShardCounts
from megatron_r1.plan.memory import Candidate, PlanOptions, plan_layout, stage_layers
from megatron_r1.plan.report import format_sync, parse_size
from megatron_r1.plan.search import step_cost, uneven_split
from megatron_r1.plan.sync import TrainerGrid, node_shares, stage_parts, sync_cost

from procs import REPO, run_python

R1 = "configs/deepseek_v3_671b_r1zero.yaml"


# --- pure arithmetic ------------------------------------------------------------------------

def test_parse_size_units():
    assert parse_size("80GB") == 80e9
    assert parse_size("81559MiB") == 81559 * 2**20
    assert parse_size("1TB") == 1e12
    assert parse_size(" 2.5 GiB ") == 2.5 * 2**30
    assert parse_size("80") == 80e9
    with pytest.raises(ValueError, match="'80XB' is not a size"):
        parse_size("80XB")


def test_uneven_pipeline_split_follows_megatron_first_last_stages():
    assert uneven_split(61, 16) == (3, 2)  # 3 + 14 x 4 + 2
    assert uneven_split(61, 2) == (31, 30)
    assert uneven_split(61, 1) is None
    cand = Candidate(tensor=1, pipeline=16, context=1, expert=1, expert_tensor=1,
                     recompute="none", rollout_tensor=1, first_stage_layers=3,
                     last_stage_layers=2)
    sizes = [len(r) for r in stage_layers(61, cand)]
    assert sizes == [3] + [4] * 14 + [2]
    even = stage_layers(8, Candidate(tensor=1, pipeline=4, context=1, expert=1, expert_tensor=1,
                                     recompute="none", rollout_tensor=1))
    assert even == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]


def test_in_flight_micro_batches_of_1f1b_and_interleaving():
    assert [in_flight_microbatches(4, s, 8, None) for s in range(4)] == [4, 3, 2, 1]
    assert [in_flight_microbatches(4, s, 2, None) for s in range(4)] == [2, 2, 2, 1]
    # interleaved, VP=2: stage 0 warms up (4-0-1)*2 + (2-1)*4 = 10 chunks, holds 11 = 5.5 stages
    assert in_flight_microbatches(4, 0, 8, 2) == 5.5


def _gqa() -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                       num_query_groups=2, kv_channels=16, qk_layernorm=False, num_experts=0)


def _shape(**kw) -> MicroBatchShape:
    base = dict(micro_batch_size=2, seq_length=32, tensor=1, context=1, expert_tensor=1,
                sequence_parallel=False, act_bytes=2, attention="flash")
    return MicroBatchShape(**{**base, **kw})


def test_activation_terms_of_a_dense_gqa_layer_by_hand():
    m, s = _gqa(), _shape()
    T, h, a = 64, 64, 2
    attention = (2 * T * h * a             # input norm in/out
                 + T * (4 + 2 * 2) * 16 * a  # q, k, v
                 + T * 4 * 16 * a            # core output
                 + T * 4 * 4)                # flash log-sum-exp (fp32)
    ffn = 2 * T * h * a + T * 128 * 3 * a    # norm in/out, fc1 out (2f), activation out (f)
    assert layer_bytes(m, s, False, "none") == attention + ffn
    assert layer_bytes(m, s, False, "selective") == attention + ffn - T * 4 * 4
    assert kept_layer_bytes(m, s, False, "full") == T * h * a
    unfused = layer_bytes(m, _shape(attention="unfused"), False, "none")
    assert unfused == attention + ffn - T * 4 * 4 + 2 * 4 * 32 * 32 * a  # probs: b x n x s x s


def test_tensor_and_sequence_parallel_split_every_activation():
    m = _gqa()
    one = layer_bytes(m, _shape(), False, "none")
    two = layer_bytes(m, _shape(tensor=2, sequence_parallel=True), False, "none")
    assert two == one / 2


def _counts(model: ModelConfig) -> ShardCounts:
    layer = PartCount(dense=1000, expert=0, low_precision=800)
    moe = PartCount(dense=500, expert=4000, low_precision=4400)
    return ShardCounts(tensor=1, expert=1, expert_tensor=1,
                       embedding=PartCount(2000, 0, 0), layers={"dense": layer, "moe": moe},
                       final_norm=PartCount(10, 0, 0), output_layer=PartCount(2000, 0, 0),
                       tied_single_stage=False,
                       layer_kinds=("dense",) + ("moe",) * (model.num_layers - 1))


def test_weights_grads_and_sharded_optimizer_bytes():
    cfg = load_config(None, ["model.params_dtype=bf16", "model.num_layers=4",
                             "model.moe_first_dense_layers=1", "train.global_batch_size=64",
                             "train.micro_batch_size=1"])
    cand = Candidate(tensor=1, pipeline=2, context=2, expert=4, expert_tensor=1,
                     recompute="full", rollout_tensor=1)
    options = PlanOptions(gpus=16, gpu_memory=80e9)
    plan = plan_layout(cfg, cand, options, lambda m, tp, ep, etp: _counts(m))
    assert (plan.data, plan.expert_data, plan.num_microbatches) == (4, 2, 16)
    first, last = plan.stages
    assert first.layers == range(0, 2) and last.layers == range(2, 4)
    assert first.params == PartCount(2000 + 1000 + 500, 4000, 800 + 4400)
    assert last.params == PartCount(500 * 2 + 10 + 2000, 8000, 8800)
    p = first.params
    assert first.weights == 2 * p.total  # bf16
    assert first.grads == 4 * p.total  # fp32 main grads
    # fp32 master + 2 Adam moments: dense sharded over DP x CP = 8, experts over EDP = 2
    assert first.optimizer == 12 * (p.dense / 8 + p.expert / 2)
    cfg.parallel.distributed_optimizer = False
    unsharded = plan_layout(cfg, cand, options, lambda m, tp, ep, etp: _counts(m))
    assert unsharded.stages[0].optimizer == 12 * p.total


def test_each_offload_the_planner_counts_is_a_config_switch():
    """Nothing leaves the GPU unless its config field says so, and each field moves exactly
    its own bytes between the GPU phases and the host."""
    base = ["model.params_dtype=bf16", "model.num_layers=4", "model.moe_first_dense_layers=1",
            "train.global_batch_size=64", "train.micro_batch_size=1", "grpo.kl_coef=0.001"]
    cand = Candidate(tensor=1, pipeline=1, context=1, expert=4, expert_tensor=1,
                     recompute="full", rollout_tensor=1)
    options = PlanOptions(gpus=16, gpu_memory=80e9)

    def stage(*extra: str):
        plan = plan_layout(load_config(None, [*base, *extra]), cand, options,
                           lambda m, tp, ep, etp: _counts(m))
        return plan, plan.stages[0]

    plan, off = stage()
    assert plan.offloaded == ()
    # nothing offloaded: the rollout phase keeps gradients, optimizer and reference
    assert off.rollout_residual == off.weights + off.grads + off.optimizer + off.reference + \
        options.reserve
    plan, train_out = stage("rollout.offload_train_state=true")
    assert plan.offloaded == ("optimizer states and gradients (rollout.offload_train_state)",)
    assert off.rollout_residual - train_out.rollout_residual == off.grads + off.optimizer
    assert off.logprob - train_out.logprob == off.grads + off.optimizer
    assert train_out.train == off.train  # training itself needs everything
    # the host holds the optimizer states (gradient buffers are freed, not copied) and the
    # sleeping engine's weights: every pinned buffer is held for the whole run, so the sum
    assert train_out.host == off.optimizer + plan.rollout.weights
    assert off.host == plan.rollout.weights  # sleep_level 1, nothing else offloaded
    # the engine starts after the offloads (grpo_trainer.open_stage): start-up keeps the same
    assert off.startup_residual - train_out.startup_residual == off.grads + off.optimizer
    assert train_out.startup == train_out.startup_residual + 0.5 * 80e9  # the util share
    plan, ref_out = stage("grpo.offload_reference=true")
    assert plan.offloaded == ("reference model (grpo.offload_reference)",)
    assert off.train - ref_out.train == off.reference
    assert off.rollout_residual - ref_out.rollout_residual == off.reference
    assert ref_out.logprob == off.logprob  # the reference is on the GPU for its log-probs
    assert ref_out.host - off.host == off.reference
    _, no_ref = stage("grpo.kl_coef=0", "grpo.offload_reference=true")
    assert no_ref.reference == 0 and no_ref.train == ref_out.train
    _, level2 = stage("rollout.sleep_level=2")
    assert level2.host == 0  # a level-2 engine drops its weights; nothing else offloaded


def test_fp8_training_keeps_its_weight_cache_and_serves_the_policys_dtype():
    """model.fp8: Transformer Engine's FP8 copy of every linear weight (2 bytes per weight
    element, as the train phase counts it) stays on the GPU through the rollout too, but not
    yet when the engine starts (no forward has run). The engine loads what the export writes,
    the policy's bf16 (no quantization_config): `--rollout-weights auto` is bf16."""
    import argparse

    from megatron_r1.plan.command import options_from_args

    fp8 = ["model.params_dtype=bf16", "model.num_layers=4", "model.moe_first_dense_layers=1",
           "train.global_batch_size=64", "train.micro_batch_size=1", "model.fp8=e4m3",
           "model.transformer_impl=transformer_engine", "rollout.offload_train_state=true",
           "grpo.offload_reference=true"]
    cfg = load_config(None, fp8)
    args = argparse.Namespace(
        gpus=16, gpus_per_node=8, gpu_memory=80e9, host_memory=1e12, reserve=6e9,
        moe_imbalance=1.25, attention="auto", rollout_concurrency=1, rollout_weights="auto",
        kv_cache_dtype="bf16", rollout_overhead=3e9, nvlink_bandwidth=160e9, ib_bandwidth=50e9)
    options = options_from_args(cfg, args)
    assert options.rollout_weights == "bf16"
    cand = Candidate(tensor=1, pipeline=1, context=1, expert=4, expert_tensor=1,
                     recompute="full", rollout_tensor=1)
    plan = plan_layout(cfg, cand, options, lambda m, tp, ep, etp: _counts(m))
    s, whole = plan.stages[0], _counts(cfg.model).whole_model()
    assert s.fp8_weight_cache == 2 * s.params.low_precision > 0
    assert s.rollout_residual == s.weights + s.fp8_weight_cache + options.reserve
    assert s.startup_residual == s.weights + options.reserve
    assert plan.rollout.weights == 2 * whole.total  # bf16, linear weights included
    fp8_engine = plan_layout(cfg, cand, replace(options, rollout_weights="fp8"),
                             lambda m, tp, ep, etp: _counts(m))
    assert fp8_engine.rollout.weights == whole.low_precision + 2 * (whole.total -
                                                                     whole.low_precision)


def test_reward_models_are_priced_on_the_gpu_while_scoring_and_on_the_host_always():
    """reward.models (R1 stage 4): each is the backbone with a scalar head instead of the LM
    head, in the trainer's layout, pinned in host memory for the whole run, on the GPU one at a
    time while it scores (the engine asleep); priced as the policy's architecture unless its
    own is given."""
    base = ["model.params_dtype=bf16", "model.num_layers=4", "model.moe_first_dense_layers=1",
            "train.global_batch_size=64", "train.micro_batch_size=1",
            "rollout.offload_train_state=true", "grpo.offload_reference=true"]
    models = ("reward.models=[{name: helpful, checkpoint: x}, {name: safe, checkpoint: y, "
              "scores: response}]")
    cand = Candidate(tensor=1, pipeline=2, context=1, expert=4, expert_tensor=1,
                     recompute="full", rollout_tensor=1)
    options = PlanOptions(gpus=16, gpu_memory=80e9)

    def plan(*extra, opts=options):
        return plan_layout(load_config(None, [*base, *extra]), cand, opts,
                           lambda m, tp, ep, etp: _counts(m))

    without, served = plan(), plan("reward.rule_kinds=[math]", models)
    assert "reward models (always, between their uses)" in served.offloaded
    counts = _counts(load_config(None, base).model)
    first, last = served.stages
    # stage 0: layers 0-1 + embedding; stage 1: layers 2-3 + final norm + a hidden-size head
    backbone0 = counts.stage(range(0, 2), first=True, last=False).total
    backbone1 = counts.stage(range(2, 4), first=False, last=False).total + 10 + 64
    assert first.reward_models == 2 * 2 * backbone0 and last.reward_models == 2 * 2 * backbone1
    for a, b in zip(without.stages, served.stages):
        assert b.host - a.host == b.reward_models  # both pinned for the whole run
        assert b.rollout == a.rollout and b.train == a.train and a.reward == 0
        # one reward model at a time, beside what stays on the GPU after the rollout
        assert b.reward > b.weights + b.reward_models / 2 + options.reserve
    # an architecture of its own (a smaller model) is priced as given
    small = replace(load_config(None, base).model, num_layers=2, hidden_size=32)
    given = plan("reward.rule_kinds=[math]", models,
                 opts=replace(options, reward_architectures=(("safe", small),)))
    assert given.stages[0].reward_models < first.reward_models


def test_mla_kv_cache_is_the_latent_on_every_tensor_rank():
    cfg = load_config(R1)
    options = PlanOptions(gpus=512, gpu_memory=80e9, rollout_weights="fp8",
                          rollout_concurrency=4)
    cand = Candidate(tensor=8, pipeline=1, context=1, expert=256, expert_tensor=1,
                     recompute="full", rollout_tensor=32)
    plan = plan_layout(cfg, cand, options, lambda m, tp, ep, etp: _counts(m))
    per_token = (512 + 64) * 61 * 2  # (kv_lora_rank + rope dim) x layers x bf16
    assert plan.rollout.kv_per_token == per_token
    assert plan.rollout.kv_needed == per_token * 34816 * 4
    assert plan.rollout.engines == 16


def test_step_cost_rule():
    cfg = load_config(None, ["train.global_batch_size=16", "train.micro_batch_size=1"])

    def cost(pp: int, recompute: str) -> float:
        cand = Candidate(tensor=1, pipeline=pp, context=1, expert=1, expert_tensor=1,
                         recompute=recompute, rollout_tensor=1)
        plan = plan_layout(cfg, cand, PlanOptions(gpus=4, gpu_memory=80e9),
                           lambda m, tp, ep, etp: _counts(m))
        return step_cost(plan, attention_flops=1.0, linear_flops=3.0)

    assert cost(1, "none") == 1.0
    assert cost(1, "full") == pytest.approx(4 / 3)
    assert cost(1, "selective") == pytest.approx(1 + 1 / 12)  # attention share 1/4, / 3
    assert cost(2, "none") == pytest.approx(1 / (1 - 1 / 9))  # M=8 per rank: 1/(8+1)


# --- weight sync ------------------------------------------------------------------------------

def _even_counts(model: ModelConfig, tp: int, ep: int, etp: int) -> ShardCounts:
    """A made-up model whose every tensor splits evenly over TP (dense) and EP x ETP (experts):
    per part (dense elements, expert elements, dense linear-weight elements)."""
    def part(dense: int, expert: int, dense_linear: int) -> PartCount:
        experts = expert // (ep * etp)
        return PartCount(dense // tp, experts, dense_linear // tp + experts)

    return ShardCounts(tensor=tp, expert=ep, expert_tensor=etp, embedding=part(4096, 0, 0),
                       layers={"dense": part(1024, 0, 768), "moe": part(512, 8192, 256)},
                       final_norm=part(64, 0, 0), output_layer=part(4096, 0, 0),
                       tied_single_stage=False,
                       layer_kinds=("dense",) + ("moe",) * (model.num_layers - 1))


SYNC_CFG = ["model.num_layers=4", "model.moe_first_dense_layers=1",
            "train.global_batch_size=64", "train.micro_batch_size=1"]
SLOW_LINKS = dict(nvlink_bandwidth=100.0, infiniband_bandwidth=10.0)  # bytes/s


def _sync(cand: Candidate, *overrides: str, gpus: int = 16):
    cfg = load_config(None, [*SYNC_CFG, *overrides])
    options = PlanOptions(gpus=gpus, gpu_memory=80e9, rollout_weights="fp8", **SLOW_LINKS)
    plan = plan_layout(cfg, cand, options, _even_counts)
    return plan, sync_cost(cfg, plan, _even_counts)


def test_sync_bytes_and_seconds_by_hand():
    """16 GPUs, 8 per node, TP=2 PP=2 EP=4: node 0 holds all of stage 0 (layers 0-1 and the
    embedding), node 1 all of stage 1 (layers 2-3, final norm, head). Engines of TP_e=4, one
    group per node (default ranks_per_engine), workers on ranks 0-3 and 8-11."""
    cand = Candidate(tensor=2, pipeline=2, context=1, expert=4, expert_tensor=1,
                     recompute="none", rollout_tensor=4)
    plan, sync = _sync(cand)
    # FP8 engine: linear weights 1 byte, embedding/head/norms 2 bytes
    stage0_dense = (768 + 256) * 1 + (4096 + 1024 + 512 - 768 - 256) * 2  # 10240
    stage0_expert = 8192
    stage1_dense = 2 * 256 * 1 + (2 * 512 - 2 * 256 + 64 + 4096) * 2  # 9856
    stage1_expert = 2 * 8192
    stage0, stage1 = stage0_dense + stage0_expert, stage1_dense + stage1_expert
    full = stage0 + stage1
    assert (stage0, stage1, full) == (18432, 26240, 44672)
    assert (sync.groups, sync.ranks_per_group, sync.workers_per_group) == (2, 8, 4)
    f, s = sync.full, sync.sharded
    # today: each engine's host (ranks 0 and 8) receives whole tensors; the slowest is node
    # 0's: stage 0 over NVLink, stage 1 over InfiniBand. Its node's other three workers read
    # their TP_e slice (full / 4) from it inside the node.
    assert f.per_gpu == pytest.approx(full, rel=1e-9)
    assert (f.in_node, f.cross_node) == pytest.approx((stage0, stage1), rel=1e-9)
    assert f.seconds == pytest.approx(max(stage0 / 100, stage1 / 10), rel=1e-9)
    assert (f.group_in_node, f.group_cross_node) == pytest.approx(
        (stage0 + 3 * full / 4, stage1), rel=1e-9)
    assert f.job_total == pytest.approx(2 * full + 6 * full / 4, rel=1e-9)
    assert f.job_cross_node == pytest.approx(stage1 + stage0, rel=1e-9)
    assert sync.node_share == pytest.approx(stage0 / full, rel=1e-9)
    # the sharded path: each worker receives its TP_e slice, full / TP_e, split alike
    assert (s.per_gpu, s.in_node, s.cross_node, s.seconds) == pytest.approx(
        (full / 4, stage0 / 4, stage1 / 4, f.seconds / 4), rel=1e-9)
    assert (s.group_in_node, s.group_cross_node) == pytest.approx((stage0, stage1), rel=1e-9)
    assert (s.job_total, s.job_cross_node) == pytest.approx((2 * full, full), rel=1e-9)
    assert s.per_gpu == pytest.approx(plan.rollout.weights, rel=1e-9)  # the engine's weights
    text = format_sync(sync)
    assert "weight sync per rollout: 2 engine group(s) of 8 ranks, 4 engine workers" in text
    assert "whole tensors to each node host (today):" in text and "predicted 2624.00 s" in text
    assert "TP_e=4 slices to each worker (not built):" in text and "predicted 656.00 s" in text
    assert "NeMo-RL DeepSeek-V3 refit 2.4-2.8 s (non-colocated)" in text
    assert "checkpoint-engine DeepSeek-V3.1 update 11.3 s (colocated, 256 H20)" in text


def test_a_node_holding_a_full_replica_syncs_inside_the_node():
    # TP=8 PP=1 EP=1 (experts over ETP=8) on 8 GPUs per node: every node holds the model
    replica = Candidate(tensor=8, pipeline=1, context=1, expert=1, expert_tensor=8,
                        recompute="none", rollout_tensor=8)
    _, sync = _sync(replica)
    for path in (sync.full, sync.sharded):
        assert path.cross_node == 0 and path.group_cross_node == 0 and path.job_cross_node == 0
        assert path.in_node == path.per_gpu
        assert path.seconds == pytest.approx(path.per_gpu / 100, rel=1e-9)
    assert sync.node_share == 1.0
    # EP=16 over two nodes: each node holds half the experts, the other half crosses nodes
    _, split = _sync(replace(replica, tensor=2, expert=16, expert_tensor=1))
    assert split.full.cross_node == pytest.approx(3 * 8192 / 2, rel=1e-9)


def test_node_shares_follow_megatrons_rank_order():
    from megatron.core.parallel_state import RankGenerator

    order = "tp-cp-ep-dp-pp"
    for tp, pp, ep, etp in [(2, 2, 4, 1), (2, 2, 2, 2), (4, 1, 8, 1), (1, 4, 2, 2)]:
        world = 16
        grid = TrainerGrid(world=world, tensor=tp, pipeline=pp, expert=ep, expert_tensor=etp)
        dense = RankGenerator(tp=tp, ep=1, dp=world // (tp * pp), pp=pp, cp=1, order=order)
        experts = RankGenerator(tp=etp, ep=ep, dp=world // (etp * ep * pp), pp=pp, cp=1,
                                order=order)
        for group in dense.get_ranks("pp"):
            assert [grid.stage_of(r) for r in group] == list(range(pp))
        for group in dense.get_ranks("tp"):
            assert [grid.tensor_shard(r) for r in group] == list(range(tp))
        for group in experts.get_ranks("ep"):
            assert [grid.expert_shard(r)[1] for r in group] == list(range(ep))
        for group in experts.get_ranks("tp"):
            assert [grid.expert_shard(r)[0] for r in group] == list(range(etp))
    grid = TrainerGrid(world=16, tensor=2, pipeline=1, expert=16, expert_tensor=1)
    assert node_shares(grid, range(0, 8)) == [(1.0, 0.5)]


def test_engine_stage_parts_hold_a_tied_head_once():
    model = ModelConfig(num_layers=4, moe_first_dense_layers=1)
    counts = replace(_even_counts(model, 1, 1, 1), tied_single_stage=True)
    cand = Candidate(tensor=1, pipeline=2, context=1, expert=1, expert_tensor=1,
                     recompute="none", rollout_tensor=1)
    parts = stage_parts(counts, stage_layers(4, cand))
    assert parts[0] + parts[1] == counts.whole_model()
    assert parts[1] == counts.layers["moe"] * 2 + counts.final_norm


def test_engine_groups_that_do_not_fit_are_a_problem():
    cand = Candidate(tensor=2, pipeline=2, context=1, expert=4, expert_tensor=1,
                     recompute="none", rollout_tensor=8)
    cfg = load_config(None, [*SYNC_CFG, "rollout.ranks_per_engine=4"])
    plan = plan_layout(cfg, cand, PlanOptions(gpus=16, gpu_memory=80e9), _even_counts)
    assert ("rollout: rollout.ranks_per_engine=4 is smaller than rollout.tensor_parallel=8: "
            "every engine worker sits on one rank of its group") in plan.problems
    with pytest.raises(ValueError, match="ranks_per_engine=4"):
        sync_cost(cfg, plan, _even_counts)


# --- counts from the real model -------------------------------------------------------------

WORKER = """
import json, sys, torch
from megatron_r1.config import load_config
from megatron_r1.layout import resolve_layout
from megatron_r1.model.build import build_model, count_parameters
from megatron_r1.parallel.init import destroy_parallel, init_parallel
from megatron_r1.parallel.launch_env import discover
from megatron.core import parallel_state

out, cases = sys.argv[1], json.loads(sys.argv[2])
launch, result = discover(), {}
for name, case in cases.items():
    cfg = load_config(case["config"], case["overrides"])
    layout = resolve_layout(cfg.parallel, cfg.model, cfg.train, launch.world_size,
                            cfg.data.seq_length)
    ctx = init_parallel(layout, cfg.parallel, launch, 1234)
    chunks = build_model(cfg.model, cfg.parallel, ctx,
                         device=torch.device("meta") if case["meta"] else None)
    total = count_parameters(chunks, cfg.model, layout.expert).total
    # megatron marks expert parameters allreduce=False (they reduce over expert-DP only)
    expert = sum(p.numel() for c in chunks for p in c.parameters()
                 if not getattr(p, "allreduce", True))
    result[name] = {"pp_rank": ctx.pp_rank, "total": total, "expert": expert,
                    "meta": all(p.is_meta for c in chunks for p in c.parameters())}
    parallel_state.destroy_model_parallel()  # keep the default group for the next case
destroy_parallel()
with open(f"{out}/rank{launch.rank}.json", "w") as f:
    json.dump(result, f)
"""

GLOO_CASES = {
    "tiny": {"config": None, "meta": False, "overrides": [
        "parallel.tensor=2", "parallel.pipeline=2", "parallel.expert=2",
        "parallel.expert_tensor=1"]},
    "tiny-uneven": {"config": None, "meta": False, "overrides": [
        "model.num_layers=3", "model.moe_first_dense_layers=1", "parallel.tensor=2",
        "parallel.pipeline=2", "parallel.first_stage_layers=1", "parallel.expert=2",
        "parallel.expert_tensor=1"]},
    "qwen3": {"config": "configs/qwen3_moe_30b_a3b.yaml", "meta": True, "overrides": [
        "parallel.tensor=2", "parallel.pipeline=2", "parallel.expert=2",
        "parallel.expert_tensor=1"]},
}

PLANNER = """
import json, sys
from megatron_r1.config import load_config
from megatron_r1.plan.memory import Candidate, stage_layers
from megatron_r1.plan.params import shard_counts
cases, out = json.loads(sys.argv[1]), {}
for name, case in cases.items():
    cfg = load_config(case["config"], case["overrides"])
    p = cfg.parallel
    counts = shard_counts(cfg.model, p.tensor, p.expert, p.expert_tensor or p.tensor)
    cand = Candidate(tensor=p.tensor, pipeline=p.pipeline, context=1, expert=p.expert,
                     expert_tensor=p.expert_tensor or p.tensor, recompute="none",
                     rollout_tensor=1, first_stage_layers=p.first_stage_layers,
                     last_stage_layers=p.last_stage_layers)
    stages = stage_layers(cfg.model.num_layers, cand)
    out[name] = [
        {"total": c.total, "expert": c.expert}
        for i, layers in enumerate(stages)
        for c in [counts.stage(layers, first=i == 0, last=i == len(stages) - 1)]]
print(json.dumps(out))
"""


def _planner_stage_counts(cases: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", PLANNER, json.dumps(cases)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_planner_counts_equal_models_built_on_gloo_ranks(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
         str(worker), str(tmp_path), json.dumps(GLOO_CASES)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    planned = _planner_stage_counts(GLOO_CASES)
    for name in GLOO_CASES:
        built = [rank[name] for rank in ranks]
        assert all(b["meta"] == GLOO_CASES[name]["meta"] for b in built)
        assert {b["pp_rank"] for b in built} == {0, 1}
        for b in built:
            assert planned[name][b["pp_rank"]] == {"total": b["total"], "expert": b["expert"]}


FAKE_512 = """
import json, torch
from megatron_r1.config import load_config
from megatron_r1.config.schema import ParallelConfig
from megatron_r1.model.build import build_model, count_parameters
from megatron_r1.layout import resolve_layout
from megatron_r1.parallel.init import destroy_parallel, init_parallel
from megatron_r1.parallel.launch_env import discover
from megatron_r1.plan.memory import Candidate, stage_layers
from megatron_r1.plan.params import build_rank_counts, shard_counts

out = {}
# Qwen3-30B-A3B, 512 ranks, TP=2 PP=4 EP=8: one rank of each stage, built on the fake backend
qwen = load_config("configs/qwen3_moe_30b_a3b.yaml").model
par = ParallelConfig(tensor=2, pipeline=4, expert=8, expert_tensor=1)
counts = shard_counts(qwen, 2, 8, 1)
cand = Candidate(tensor=2, pipeline=4, context=1, expert=8, expert_tensor=1, recompute="none",
                 rollout_tensor=1)
out["qwen3"] = [[build_rank_counts(qwen, par, 512, rank=s * 128).total,
                 counts.stage(layers, first=s == 0, last=s == 3).total]
                for s, layers in enumerate(stage_layers(48, cand))]
# DeepSeek-V3, 512 ranks, TP=8 EP=64: rank 77, all 61 layers
ds = load_config("configs/deepseek_v3_671b.yaml", ["model.fp8=none"]).model
par = ParallelConfig(tensor=8, expert=64, expert_tensor=1)
built = build_rank_counts(ds, par, 512, rank=77)
out["deepseek_rank"] = [[built.dense, built.expert], [shard_counts(ds, 8, 64, 1).whole_model().dense,
                                                       shard_counts(ds, 8, 64, 1).whole_model().expert]]
# DeepSeek-V3 total: the whole model on meta at world size 1 (as tests/model/test_build.py)
cfg = load_config("configs/deepseek_v3_671b.yaml", ["model.fp8=none"])
launch = discover({})
ctx = init_parallel(resolve_layout(cfg.parallel, cfg.model, cfg.train, 1, cfg.data.seq_length),
                    cfg.parallel, launch, 1234)
meta = count_parameters(build_model(cfg.model, cfg.parallel, ctx, device=torch.device("meta")),
                        cfg.model).total
destroy_parallel()
out["deepseek_total"] = [meta, shard_counts(cfg.model, 1, 1, 1).whole_model().total]
print(json.dumps(out))
"""


def test_planner_counts_equal_rank_builds_at_512_and_the_671b_meta_total():
    proc = run_python(FAKE_512, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for built, planned in got["qwen3"]:
        assert built == planned
    assert len({b for b, _ in got["qwen3"]}) > 1  # the stages do differ (embedding, head)
    built, planned = got["deepseek_rank"]
    assert built == planned
    meta, planned_total = got["deepseek_total"]
    assert meta == planned_total
    assert abs(meta - 671e9) < 0.5e9


# --- the command and the shipped config -------------------------------------------------------

def plan_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "megatron_r1.plan", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_r1_zero_config_is_the_planners_first_choice(tmp_path):
    out = tmp_path / "plan.json"
    proc = plan_cli("--config", R1, "--gpus", "512", "--gpu-memory", "80GB", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FITS: peak" in proc.stdout
    plan = json.loads(out.read_text())
    cfg = load_config(R1)
    best = plan["ranked"][0]["layout"]
    p = cfg.parallel
    assert (best["tensor"], best["pipeline"], best["context"], best["expert"],
            best["expert_tensor"], best["recompute"], best["rollout_tensor"],
            best["first_stage_layers"], best["last_stage_layers"]) == (
        p.tensor, p.pipeline, p.context, p.expert, p.expert_tensor, cfg.model.recompute,
        cfg.rollout.tensor_parallel, p.first_stage_layers, p.last_stage_layers)
    # Every suggestion is a layout a training start accepts, uneven 61-layer pipelines included.
    suggested = [r["layout"] for r in plan["ranked"]]
    assert any(s["first_stage_layers"] for s in suggested)
    for s in suggested:
        par = replace(p, tensor=s["tensor"], pipeline=s["pipeline"], context=s["context"],
                      expert=s["expert"], expert_tensor=s["expert_tensor"],
                      first_stage_layers=s["first_stage_layers"],
                      last_stage_layers=s["last_stage_layers"])
        got = resolve_layout(par, cfg.model, cfg.train, 512, cfg.data.seq_length)
        assert got.data == s["data"]
    configured = plan["configured"]
    assert configured["fits"] and configured["peak"] <= 80e9
    assert configured["stages"][0]["params_expert"] * 256 == 653_908_770_816  # 58 x 256 experts
    # weight sync: 8 engine groups of 64 ranks (TP_e=64 over 8 nodes); a TP_e slice is the
    # engine's own weights; each node holds the dense part and 8 of 256 experts per layer
    sync = configured["sync"]
    assert (sync["groups"], sync["ranks_per_group"], sync["workers_per_group"]) == (8, 64, 64)
    assert sync["sharded"]["per_gpu"] == configured["rollout"]["weights"]
    assert sync["full"]["per_gpu"] / 64 < sync["sharded"]["per_gpu"] < \
        1.02 * sync["full"]["per_gpu"] / 64  # vLLM keeps norms and MLA down-projections whole
    assert 0.05 < sync["node_share"] < 0.07
    assert sync["full"]["seconds"] == sync["full"]["cross_node"] / 50e9  # InfiniBand-bound
    # The figures the README quotes (GB = 1e9 bytes), as the code runs: the engine loads bf16
    # (42.1 GB for the whole model per TP_e=32 GPU, 21.2 at 64), the trainer keeps weights,
    # TE's FP8 cache and the reserve through the rollout, the host holds every pinned buffer.
    stage = configured["stages"][0]
    gb = pytest.approx
    assert configured["rollout"]["weights"] / 1e9 == gb(21.18, abs=0.01)
    assert sync["full"]["per_gpu"] / 1e9 == gb(1342.05, abs=0.01)  # whole model, bf16
    assert sync["full"]["seconds"] == gb(25.34, abs=0.01)
    # 64 node hosts receive the whole model, the 448 other workers their slice in node
    assert sync["full"]["job_total"] / 1e12 == gb(95.4, abs=0.05)
    assert stage["fp8_weight_cache"] / 1e9 == gb(8.90, abs=0.01)
    assert stage["rollout_residual"] / 1e9 == gb(9.58 + 8.90 + 6.0, abs=0.01)
    assert stage["startup_residual"] / 1e9 == gb(9.58 + 6.0, abs=0.01)
    assert stage["rollout"] / 1e9 == gb(79.68, abs=0.01) and configured["peak"] <= 80e9
    assert stage["host"] * 8 / 1e9 == gb(372.0, abs=0.1)  # optimizer + engine + reference
    assert configured["rollout"]["full_length_capacity"] == 12


def test_plan_exit_codes(tmp_path):
    small = plan_cli("--config", R1, "--gpus", "512", "--gpu-memory", "40GB", "--no-search")
    assert small.returncode == 3
    assert "DOES NOT FIT:" in small.stdout and "stage 0: train phase needs" in small.stdout
    bad = plan_cli("--config", R1, "--gpus", "512", "--set", "parallel.tensor=3", "--no-search")
    assert bad.returncode == 2
    assert "parallel.tensor=3" in bad.stderr
    tiny = plan_cli("--gpus", "2", "--set", "parallel.expert=2", "--top", "3")
    assert tiny.returncode == 0, tiny.stderr[-3000:]
    assert "FITS" in tiny.stdout and "layouts that fit, best first" in tiny.stdout
    assert "weight sync per rollout: 1 engine group(s) of 2 ranks" in tiny.stdout


def test_r1_zero_config_carries_the_recipe():
    cfg = load_config(R1)
    # the model is the DeepSeek-V3 config's (its `base`), with the planner's recompute
    assert cfg.model == replace(load_config("configs/deepseek_v3_671b.yaml").model,
                                recompute=cfg.model.recompute)
    assert (cfg.optim.lr, cfg.optim.lr_decay_style, cfg.optim.lr_warmup_steps) == (
        3e-6, "constant", 0)
    assert (cfg.grpo.kl_coef, cfg.grpo.group_size, cfg.grpo.ref_update_interval) == (
        0.001, 16, 400)
    outputs = cfg.grpo.prompts_per_rollout * cfg.grpo.group_size
    assert outputs == 8192 and outputs // cfg.train.global_batch_size == 16
    assert cfg.train.global_batch_size // cfg.grpo.group_size == 32  # questions per step
    assert (cfg.rollout.temperature, cfg.rollout.max_new_tokens) == (1.0, 32768)
    assert cfg.data.seq_length >= cfg.rollout.max_new_tokens

