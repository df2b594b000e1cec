"""Text and JSON renderings of a plan: the per-GPU table, the verdict, the ranked layouts.

Layer L0 (pure formatting). Sizes print in GB (10^9 bytes), the unit of `--gpu-memory 80GB`;
`parse_size` reads them back.
"""

from __future__ import annotations

import re
from typing import Any

from megatron_r1.plan.memory import Plan
from megatron_r1.plan.search import Ranked, rollout_capacity
from megatron_r1.plan.sync import (
    CHECKPOINT_ENGINE_DSV31_UPDATE_S,
    NEMO_RL_DSV3_REFIT_S,
    SyncCost,
    SyncPath,
)

_UNITS = {"": 1e9, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> float:
    """`80GB` -> 8e10 bytes; GB/TB are powers of ten, GiB/TiB powers of two; a bare number
    is GB.

    Raises:
        ValueError: naming the text.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 80GB, 81559MiB, 1TB)")
    return float(match.group(1)) * _UNITS[unit]


def gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e7 else f"{n:,}"


def _layers(r: range) -> str:
    return f"{r.start}-{r.stop - 1}" if len(r) > 1 else str(r.start) if len(r) else "-"


def format_plan(plan: Plan, title: str) -> str:
    """The per-GPU table of one layout (one row per pipeline stage) and its verdict."""
    c, o, r = plan.candidate, plan.options, plan.rollout
    lines = [title,
             f"layout: {c.describe()}",
             f"        DP={plan.data}, expert-DP={plan.expert_data}, "
             f"{plan.num_microbatches} micro-batch(es) per step per DP rank",
             "",
             "trainer, per GPU of each pipeline stage (GB; every TP/CP/EP/DP rank of a stage "
             "holds the same)",
             f"{'stage':>5} {'layers':>7} {'params dense+expert':>22} {'weights':>8} "
             f"{'grads':>6} {'optim':>6} {'activ':>6} {'ref':>5} | {'startup':>7} "
             f"{'train':>6} {'logprob':>7} {'reward':>6} {'rollout':>7} | {'peak':>6}"]
    for s in plan.stages:
        params = f"{_billions(s.params.dense)}+{_billions(s.params.expert)}"
        reward = gb(s.reward) if s.reward else "-"
        lines.append(
            f"{s.stage:>5} {_layers(s.layers):>7} {params:>22} "
            f"{gb(s.weights + s.fp8_weight_cache):>8} {gb(s.grads):>6} {gb(s.optimizer):>6} "
            f"{gb(s.activations):>6} {gb(s.reference):>5} | {gb(s.startup):>7} "
            f"{gb(s.train):>6} {gb(s.logprob):>7} {reward:>6} {gb(s.rollout):>7} | "
            f"{gb(s.peak):>6}")
    lines += [
        f"  phases include the {gb(o.reserve)} GB reserve; weights include the FP8 weight "
        "cache when model.fp8 is set (every phase after the first forward: all but startup); "
        "ref = reference model; startup = the engine starting beside the trainer; reward = "
        "scoring with reward.models; offloaded between phases: "
        + (", ".join(plan.offloaded) or "nothing (rollout.offload_train_state and "
                                         "grpo.offload_reference are off)"),
        f"  activations: micro-batches of {plan.micro_batch_size} x {plan.seq_length} tokens, "
        f"{min(plan.num_microbatches, c.pipeline)} in flight on stage 0, recompute={c.recompute}, "
        f"attention={o.attention}, MoE imbalance x{o.moe_imbalance}",
    ]
    if c.expert > 1:
        lines.append(f"  expert parallel: {c.expert} EP ranks per stage, each with the same "
                     f"share of every MoE layer's experts")
    lines += [
        "",
        f"rollout engine, per GPU: TP={r.tensor} ({r.engines} engines, {r.outputs_per_engine} "
        f"outputs each per rollout); weights {gb(r.weights)} GB ({o.rollout_weights}); "
        f"KV {r.kv_per_token / 1e3:.1f} KB/token",
        f"  KV for {r.concurrency} x {r.seq_length} tokens: {gb(r.kv_needed)} GB of the "
        f"{gb(max(r.kv_budget, 0))} GB the engine has left; holds {r.full_length_capacity} "
        f"sequences at full length ({r.engines * r.full_length_capacity} in all engines)",
        f"  the trainer leaves room for rollout.gpu_memory_utilization up to "
        f"{(o.gpu_memory - max(s.rollout_residual for s in plan.stages)) / o.gpu_memory:.2f}"
        f" (at start-up {(o.gpu_memory - max(s.startup_residual for s in plan.stages)) / o.gpu_memory:.2f})",
        f"host memory per node (offloaded state, pinned for the whole run): "
        f"{gb(max(s.host for s in plan.stages) * o.gpus_per_node)} GB of {gb(o.host_memory)} GB",
        "",
    ]
    if any(s.reward_models for s in plan.stages):
        named = {name for name, _ in o.reward_architectures}
        lines.insert(-1, f"reward models: {gb(max(s.reward_models for s in plan.stages))} GB "
                     "per GPU in host memory, one at a time on the GPU while scoring; "
                     + ("priced as the policy's architecture unless given"
                        if not named else f"architectures given for {sorted(named)}, others "
                                          "priced as the policy's"))
    if plan.fits:
        lines.append(f"FITS: peak {gb(plan.peak)} GB of {gb(o.gpu_memory)} GB "
                     f"(headroom {gb(plan.headroom)} GB)")
    else:
        lines.append("DOES NOT FIT:")
        lines += [f"  - {p}" for p in plan.problems]
    return "\n".join(lines)


def _volume(x: float) -> str:
    return f"{x / 1e12:.1f} TB" if x >= 1e12 else f"{x / 1e9:.1f} GB"


def format_sync(sync: SyncCost) -> str:
    """The weight sync of one layout: bytes per GPU of both paths, where they come from, the
    predicted seconds, and the published anchors to read them against."""
    lines = [
        f"weight sync per rollout: {sync.groups} engine group(s) of {sync.ranks_per_group} "
        f"ranks, {sync.workers_per_group} engine workers each, {sync.weights} weights; per GPU "
        f"and direction NVLink {gb(sync.nvlink)} GB/s, InfiniBand {gb(sync.infiniband)} GB/s",
        f"  the trainer ranks of a worker's node hold {sync.node_share:.1%} of the engine's "
        "bytes (the least of any worker node); the rest crosses nodes"]
    paths: list[tuple[str, SyncPath]] = [
        ("whole tensors to each node host (today)", sync.full),
        (f"TP_e={sync.workers_per_group} slices to each worker (not built)", sync.sharded)]
    for name, p in paths:
        lines += [
            f"  {name}: {gb(p.per_gpu)} GB on the busiest GPU ({gb(p.in_node)} in node, "
            f"{gb(p.cross_node)} across nodes) -> predicted {p.seconds:.2f} s",
            f"  {'':<22} per engine group {_volume(p.group_in_node)} in node, "
            f"{_volume(p.group_cross_node)} across; whole job {_volume(p.job_total)} "
            f"({_volume(p.job_cross_node)} across nodes)"]
    low, high = NEMO_RL_DSV3_REFIT_S
    lines += [
        f"  published: NeMo-RL DeepSeek-V3 refit {low}-{high} s (non-colocated); "
        f"checkpoint-engine DeepSeek-V3.1 update {CHECKPOINT_ENGINE_DSV31_UPDATE_S:.1f} s "
        "(colocated, 256 H20)",
        "  predicted = link time only (max of NVLink and InfiniBand per worker): no gather, "
        "FP8 quantisation or vLLM loading"]
    return "\n".join(lines)


def sync_to_dict(sync: SyncCost) -> dict[str, Any]:
    """Machine-readable weight sync (bytes, bytes/s, seconds)."""

    def path(p: SyncPath) -> dict[str, float]:
        return {"per_gpu": p.per_gpu, "in_node": p.in_node, "cross_node": p.cross_node,
                "group_in_node": p.group_in_node, "group_cross_node": p.group_cross_node,
                "job_total": p.job_total, "job_cross_node": p.job_cross_node,
                "seconds": p.seconds}

    return {"groups": sync.groups, "ranks_per_group": sync.ranks_per_group,
            "workers_per_group": sync.workers_per_group, "weights": sync.weights,
            "node_share": sync.node_share, "nvlink_bandwidth": sync.nvlink,
            "infiniband_bandwidth": sync.infiniband, "full": path(sync.full),
            "sharded": path(sync.sharded)}


def format_ranking(ranked: list[Ranked], top: int) -> str:
    if not ranked:
        return "no layout fits: try more GPUs, a shorter data.seq_length or FP8 rollout weights"
    lines = [f"layouts that fit, best first ({len(ranked)} found). Rule: estimated step cost "
             "(1 + recompute overhead) / (1 - pipeline bubble), then smaller TP x CP, then "
             "fewer nodes per EP group, then more full-length sequences in all KV caches "
             "(rollTP chosen for that), then more headroom",
             f"{'#':>3} {'TP':>3} {'PP':>3} {'CP':>3} {'EP':>4} {'ETP':>3} {'recompute':>9} "
             f"{'rollTP':>6} {'DP':>4} {'M':>4} {'cost':>5} {'KV seqs':>7} {'peak GB':>7}  "
             "stages"]
    for i, r in enumerate(ranked[:top], 1):
        c, p = r.plan.candidate, r.plan
        pp = f"{c.pipeline}*" if c.uneven else str(c.pipeline)
        lines.append(f"{i:>3} {c.tensor:>3} {pp:>3} {c.context:>3} {c.expert:>4} "
                     f"{c.expert_tensor:>3} {c.recompute:>9} {c.rollout_tensor:>6} {p.data:>4} "
                     f"{p.num_microbatches:>4} {r.step_cost:>5.2f} "
                     f"{rollout_capacity(p):>7} {gb(p.peak):>7}  "
                     + (f"parallel.first_stage_layers={c.first_stage_layers} "
                        f"parallel.last_stage_layers={c.last_stage_layers}" if c.uneven else ""))
    return "\n".join(lines)


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """Machine-readable plan (for --json)."""
    c = plan.candidate
    return {
        "layout": {"tensor": c.tensor, "pipeline": c.pipeline, "context": c.context,
                   "expert": c.expert, "expert_tensor": c.expert_tensor,
                   "virtual_pipeline": c.virtual_pipeline, "recompute": c.recompute,
                   "rollout_tensor": c.rollout_tensor,
                   "first_stage_layers": c.first_stage_layers,
                   "last_stage_layers": c.last_stage_layers,
                   "data": plan.data, "expert_data": plan.expert_data,
                   "num_microbatches": plan.num_microbatches},
        "stages": [{"stage": s.stage, "layers": [s.layers.start, s.layers.stop],
                    "params_dense": s.params.dense, "params_expert": s.params.expert,
                    "weights": s.weights, "fp8_weight_cache": s.fp8_weight_cache,
                    "grads": s.grads, "optimizer": s.optimizer, "activations": s.activations,
                    "reference": s.reference, "train": s.train, "logprob": s.logprob,
                    "rollout": s.rollout, "startup": s.startup, "reward": s.reward,
                    "reward_models": s.reward_models, "rollout_residual": s.rollout_residual,
                    "startup_residual": s.startup_residual, "host": s.host, "peak": s.peak}
                   for s in plan.stages],
        "rollout": {"tensor": plan.rollout.tensor, "engines": plan.rollout.engines,
                    "weights": plan.rollout.weights,
                    "kv_per_token": plan.rollout.kv_per_token,
                    "kv_needed": plan.rollout.kv_needed, "kv_budget": plan.rollout.kv_budget,
                    "full_length_capacity": plan.rollout.full_length_capacity},
        "fits": plan.fits, "problems": plan.problems,
        "peak": plan.peak, "gpu_memory": plan.options.gpu_memory,
    }
