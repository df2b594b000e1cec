"""Enumerate the layouts megatron can run on N GPUs, plan each, and rank those that fit.

Layer L0 (pure, given a counts function). Searched: TP (powers of two up to a node),
PP (even splits, and megatron's first/last-stage splits where the layer count does not
divide unless `allow_uneven` is off), EP, expert TP (1 or TP), the recompute setting, and for
each of these the inference TP (up to 8 nodes per engine) whose engines hold the most full-length
sequences in their KV caches together (the smaller TP on a tie).

Ranking rule (best first), among layouts that fit:
1. estimated step time relative to an ideal pipeline without recompute,
   (1 + recompute overhead) / (1 - pipeline bubble), where the bubble of 1F1B is
   (PP - 1) / (M x VP + PP - 1) with M micro-batches per step, and the recompute overhead
   is the share of a step's FLOPs spent re-running the forward: full = 1/3 of fwd+bwd;
   selective = attention-core FLOPs / (3 x forward FLOPs);
2. then fewer GPUs in a tensor x context group (their collectives run in every layer);
3. then fewer nodes spanned by an expert-parallel group (all-to-all off the node);
4. then more full-length sequences in the KV caches of all engines together (rollout
   throughput), then the smaller inference TP;
5. then more memory headroom.
Communication time itself is not modelled: the rule prefers layouts that need less of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from megatron_r1.config.schema import Config, ModelConfig
from megatron_r1.plan.activations import Recompute
from megatron_r1.plan.memory import Candidate, CountsFn, Plan, PlanOptions, plan_layout

RECOMPUTE: tuple[Recompute, ...] = ("none", "selective", "full")
# Context parallelism is planned by the memory model but not offered: the trainer does not
# split sequences over CP ranks yet (megatron_r1.layout refuses parallel.context > 1).
CONTEXT_PARALLEL = (1,)


@dataclass(frozen=True, slots=True)
class Ranked:
    plan: Plan
    step_cost: float
    """(1 + recompute overhead) / (1 - bubble): 1.0 is ideal."""


def _powers_of_two(limit: int) -> list[int]:
    out, p = [], 1
    while p <= limit:
        out.append(p)
        p *= 2
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def uneven_split(num_layers: int, pipeline: int) -> tuple[int, int] | None:
    """(first, last) stage layers for a pipeline that does not divide the layers: the middle
    stages take ceil(L / PP) each and the two end stages (which also hold the embedding and
    the output head) share the rest, the last taking the smaller half. None if impossible."""
    if pipeline < 2:
        return None
    per = -(-num_layers // pipeline)
    while per > 0:
        rest = num_layers - (pipeline - 2) * per
        if rest >= 2:
            last = rest // 2
            return rest - last, last
        per -= 1
    return None


def _tensor_ok(model: ModelConfig, tp: int) -> bool:
    values = [model.num_attention_heads, model.num_query_groups, model.ffn_hidden_size,
              model.moe_shared_expert_size or None]
    return all(v is None or v % tp == 0 for v in values)


def candidates(cfg: Config, gpus: int, gpus_per_node: int,
               recompute: tuple[Recompute, ...] = RECOMPUTE,
               allow_uneven: bool = True) -> Iterator[Candidate]:
    """Every trainer layout the divisibility rules allow (rollout TP still to be chosen)."""
    model, seq = cfg.model, cfg.data.seq_length
    for tp in _powers_of_two(gpus_per_node):
        if gpus % tp or not _tensor_ok(model, tp) or (tp > 1 and seq % tp):
            continue
        for cp in CONTEXT_PARALLEL:
            if gpus % (tp * cp) or (cp > 1 and seq % (2 * cp)):
                continue
            for pp in _divisors(gpus // (tp * cp)):
                if pp > model.num_layers:
                    break
                split = None
                if model.num_layers % pp:
                    split = uneven_split(model.num_layers, pp) if allow_uneven else None
                    if split is None:
                        continue
                dp = gpus // (tp * cp * pp)
                if cfg.train.global_batch_size % (cfg.train.micro_batch_size * dp):
                    continue
                for etp, ep in _expert_options(model, gpus, tp, pp):
                    for rc in recompute:
                        yield Candidate(
                            tensor=tp, pipeline=pp, context=cp, expert=ep, expert_tensor=etp,
                            recompute=rc, rollout_tensor=cfg.rollout.tensor_parallel,
                            first_stage_layers=split[0] if split else None,
                            last_stage_layers=split[1] if split else None)


def _expert_options(model: ModelConfig, gpus: int, tp: int, pp: int) -> list[tuple[int, int]]:
    if not model.is_moe:
        return [(tp, 1)]
    out = []
    for etp in sorted({1, tp}):
        if (model.moe_ffn_hidden_size or 0) % etp:
            continue
        for ep in _divisors(model.num_experts):
            if gpus % (etp * ep * pp) == 0:
                out.append((etp, ep))
    return out


def _flops_per_token(cfg: Config, counts_fn: CountsFn) -> tuple[float, float]:
    """(attention-core FLOPs, linear-layer FLOPs) of one token's forward."""
    model = cfg.model
    whole = counts_fn(model, 1, 1, 1).whole_model()
    activated = whole.dense
    if model.is_moe:
        activated += whole.expert * model.moe_router_topk // model.num_experts
    if model.multi_latent_attention:
        head_dims = model.qk_head_dim + model.qk_pos_emb_head_dim + model.v_head_dim
    else:
        head_dims = 2 * (model.kv_channels or model.hidden_size // model.num_attention_heads)
    # causal: each token attends to half the sequence on average; 2 FLOPs per multiply-add
    attention = 2 * (cfg.data.seq_length / 2) * model.num_attention_heads * head_dims
    return attention * model.num_layers, 2.0 * activated


def step_cost(plan: Plan, attention_flops: float, linear_flops: float) -> float:
    c = plan.candidate
    v = c.virtual_pipeline or 1
    bubble = (c.pipeline - 1) / (plan.num_microbatches * v + c.pipeline - 1)
    overhead = {"none": 0.0, "full": 1.0 / 3.0,
                "selective": attention_flops / (3.0 * (attention_flops + linear_flops))}
    return (1.0 + overhead[c.recompute]) / (1.0 - bubble)


def rollout_tensor_options(cfg: Config, gpus: int, gpus_per_node: int) -> list[int]:
    """Inference TP sizes the engines start with (rollout/placement.py): up to eight nodes,
    and an engine wider than a node spans whole nodes."""
    heads = cfg.model.num_attention_heads
    return [t for t in _powers_of_two(min(gpus, 8 * gpus_per_node))
            if heads % t == 0 and (t <= gpus_per_node or t % gpus_per_node == 0)]


def rollout_capacity(plan: Plan) -> int:
    """Full-length sequences all engines hold in their KV caches together."""
    return plan.rollout.engines * plan.rollout.full_length_capacity


def search(cfg: Config, options: PlanOptions, counts_fn: CountsFn,
           recompute: tuple[Recompute, ...] = RECOMPUTE,
           allow_uneven: bool = True) -> list[Ranked]:
    """Plans that fit, best first (see the module docstring for the rule)."""
    attention_flops, linear_flops = _flops_per_token(cfg, counts_fn)
    rollout_tps = []
    for tp in rollout_tensor_options(cfg, options.gpus, options.gpus_per_node):
        try:
            counts_fn(cfg.model, tp, 1, tp)
            rollout_tps.append(tp)
        except ValueError:
            continue  # megatron cannot shard the model this way (e.g. MLA's latent at TP 128)
    fitting: list[Ranked] = []
    for cand in candidates(cfg, options.gpus, options.gpus_per_node, recompute, allow_uneven):
        try:
            counts_fn(cfg.model, cand.tensor, cand.expert, cand.expert_tensor)
        except ValueError:
            continue
        best: Plan | None = None
        for rtp in rollout_tps:
            plan = plan_layout(cfg, replace(cand, rollout_tensor=rtp), options, counts_fn)
            if any(p.startswith("stage") for p in plan.problems):
                break  # the trainer itself does not fit: no inference TP can help
            if plan.fits and (best is None or rollout_capacity(plan) > rollout_capacity(best)):
                best = plan
        if best is not None:
            fitting.append(Ranked(best, step_cost(best, attention_flops, linear_flops)))
    fitting.sort(key=lambda r: rank_key(r, options.gpus_per_node))
    return fitting


def rank_key(r: Ranked, gpus_per_node: int) -> tuple[float, int, int, int, int, float]:
    c = r.plan.candidate
    ep_nodes = -(-(c.expert * c.expert_tensor) // gpus_per_node)
    return (round(r.step_cost, 2), c.tensor * c.context, ep_nodes, -rollout_capacity(r.plan),
            c.rollout_tensor, -r.plan.headroom)

