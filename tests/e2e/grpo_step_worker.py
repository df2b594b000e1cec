"""Test support: one GRPO optimizer step on a fixed synthetic rollout, at any layout.

The rollout (tokens, completion lengths, advantages, old and reference log-probs) is drawn
from a fixed seed, so every layout and micro-batch split trains on the same numbers; prints
the step's loss, KL and grad norm as JSON (rank 0)."""

import json
import sys

import torch

from megatron_r1.batching import rank_microbatches
from megatron_r1.config import load_config
from megatron_r1.grpo import forward
from megatron_r1.grpo.rollout_batch import microbatch, pack_rollout
from megatron_r1.rollout.types import Completion
from megatron_r1.session import end_session, start_session
from megatron_r1.train_step import train_step

ROWS, PROMPT = 16, 6

if __name__ == "__main__":
    cfg = load_config(None, sys.argv[1:])
    session = start_session(cfg)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 500, (PROMPT,), generator=g).tolist() for _ in range(ROWS)]
    lengths = torch.randint(1, 20, (ROWS,), generator=g).tolist()
    groups = [[Completion(tuple(torch.randint(3, 500, (n,), generator=g).tolist()),
                          (0.0,) * n, "", "stop")] for n in lengths]
    rollout = pack_rollout(prompts, groups, cfg.data.seq_length, pad_id=0)
    adv = torch.randn(ROWS, generator=g)
    old = -3 + 0.5 * torch.randn(rollout.tokens_RS.shape, generator=g)
    ref = old + 0.1 * torch.randn(rollout.tokens_RS.shape, generator=g)
    ctx = session.ctx
    batches = [microbatch(rollout, idx, advantages_R=adv, old_logp_RS=old, ref_logp_RS=ref,
                          aggregation=cfg.grpo.loss_aggregation, max_new_tokens=20)
               for idx in rank_microbatches(torch.arange(ROWS), cfg.train.micro_batch_size,
                                            ctx.dp_rank, ctx.layout.data)]
    step = forward.loss_step(cfg.grpo, 1.0, ctx.tp_group)
    result = train_step(session.model, session.optimizer, session.scheduler, batches, step,
                        forward.LOSS_METRICS, ctx, seq_length=cfg.data.seq_length)
    if ctx.rank == 0:
        print("RESULT " + json.dumps({k: result.metrics[k] for k in ("loss", "kl", "grad_norm")}))
    end_session(session)
