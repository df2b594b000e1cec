"""Test support: MoE routing record and replay on a fixed synthetic rollout, at any layout.

The rollout (tokens, completion lengths, advantages, old and reference log-probs) and a
"foreign" routing table (every token's top-k drawn at random, as an engine that routes
differently would give) come from fixed seeds, so every layout sees the same numbers. Prints
as JSON on rank 0: every row's log-probs routed naturally, while recording (R2's old pass),
replaying the recorded ids, and replaying the foreign ids; the recorded ids merged over all
ranks; and one GRPO optimizer step replaying the foreign ids (loss, KL, grad norm), or with
STEP_ROUTING=natural in the environment routed naturally."""

import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist
from grpo_step_worker import synthetic_rollout

from megatron_r1.batching import plan_microbatches
from megatron_r1.config import load_config
from megatron_r1.grpo import forward
from megatron_r1.grpo.rollout_batch import train_inputs, train_microbatch
from megatron_r1.logprobs import collect_on_rank0, score_rows
from megatron_r1.model.routing_replay import RoutingReplay
from megatron_r1.model.transformer_config import moe_layer_pattern
from megatron_r1.session import end_session, micro_batching, start_session
from megatron_r1.train_step import train_step


def rows_json(scores):
    return {r: v.tolist() for r, v in sorted(scores.items())}


if __name__ == "__main__":
    cfg = load_config(None, sys.argv[1:])
    session = start_session(cfg)
    ctx = session.ctx
    rollout, adv, old, ref = synthetic_rollout(cfg.data.seq_length)
    g = torch.Generator().manual_seed(8)
    pattern = moe_layer_pattern(cfg.model)
    experts, top_k = cfg.model.num_experts, cfg.model.moe_router_topk
    rows, width = rollout.tokens_RS.shape
    foreign = torch.rand(rows, width, sum(pattern), experts, generator=g).argsort(-1)[..., :top_k]
    foreign = foreign.to(torch.int16)

    routing = RoutingReplay(session.model, pattern, tp_group=ctx.tp_group,
                            sequence_parallel=ctx.layout.sequence_parallel,
                            recompute_full=cfg.model.recompute == "full")
    how = micro_batching(cfg, ctx.layout)
    plans = plan_microbatches(range(rows), rollout.length_R.tolist(), ctx.layout.data, how)
    mine = plans[ctx.dp_rank]

    def score(**kwargs):
        return collect_on_rank0(score_rows(session.model, rollout, mine, session, 1.0,
                                           routing=routing, **kwargs), session)

    natural = score()
    with routing.recording():
        recorded_pass = score()
    recorded = routing.recorded_table(rows, width)
    local = torch.zeros_like(recorded)
    local[:, :, routing.local_moe_layers] = recorded[:, :, routing.local_moe_layers]
    # every (row, layer) is recorded by one data-parallel rank (and identically by its TP
    # peers); elsewhere the table holds zeros, so the maximum over ranks merges them
    merged = local.to(torch.int32)
    dist.all_reduce(merged, op=dist.ReduceOp.MAX)
    with routing.replaying():
        replayed = score(routing_RSLK=merged.to(torch.int16))
        replayed_foreign = score(routing_RSLK=foreign)

    natural_step = os.environ.get("STEP_ROUTING") == "natural"
    inputs = train_inputs(rollout, adv, old, ref, cfg.grpo.loss_aggregation, max_new_tokens=40,
                          routing_RSLK=None if natural_step else foreign)
    batches = [train_microbatch(rollout, plan, inputs) for plan in mine]
    with contextlib.nullcontext() if natural_step else routing.replaying():
        out = train_step(session.model, session.optimizer, session.scheduler, batches,
                         forward.loss_step(cfg.grpo, 1.0, ctx.tp_group, routing),
                         forward.LOSS_METRICS, ctx)
    result = {k: out.metrics[k] for k in ("loss", "kl", "grad_norm")}
    result.update(natural=rows_json(natural), recorded_pass=rows_json(recorded_pass),
                  replayed=rows_json(replayed), replayed_foreign=rows_json(replayed_foreign),
                  recorded=[merged[r, :n].tolist() for r, n in
                            enumerate(rollout.length_R.tolist())],
                  foreign=[foreign[r, :n].tolist() for r, n in
                           enumerate(rollout.length_R.tolist())])
    if ctx.rank == 0:
        print("RESULT " + json.dumps(result))
    end_session(session)
