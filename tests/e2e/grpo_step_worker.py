"""Test support: one GRPO optimizer step on a fixed synthetic rollout, at any layout.

The rollout (tokens, completion lengths, advantages, old and reference log-probs) is drawn
from a fixed seed, so every layout, micro-batch split, token budget and packing trains on the
same numbers; prints the step's loss, KL, grad norm and the padding fraction as JSON (rank
0), whether start_session drew random numbers (it must not: the checkpoint supplies every
weight), and, with SCORE=1 in the environment, every row's log-probs under the initial
weights."""

import dataclasses
import json
import os
import sys

import torch

from megatron_r1.batching import padding_fraction, plan_microbatches
from megatron_r1.config import load_config
from megatron_r1.grpo import forward
from megatron_r1.grpo.rollout_batch import pack_rollout, train_inputs, train_microbatch
from megatron_r1.logprobs import collect_on_rank0, score_rows
from megatron_r1.rollout.types import Completion
from megatron_r1.session import end_session, micro_batching, start_session
from megatron_r1.train_step import train_step

ROWS, PROMPT = 16, 6


def synthetic_rollout(seq_length):
    """The fixed rollout (also tests/e2e/routing_replay_worker.py's): (rollout, advantages,
    old log-probs, reference log-probs), the same numbers on every rank and layout."""
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 500, (PROMPT,), generator=g).tolist() for _ in range(ROWS)]
    lengths = torch.randint(1, 20, (ROWS,), generator=g).tolist()
    lengths[3] = 40  # one long row, as in R1's long-tailed responses
    groups = [[Completion(tuple(torch.randint(3, 500, (n,), generator=g).tolist()),
                          (0.0,) * n, "", "stop")] for n in lengths]
    rollout = pack_rollout(prompts, groups, seq_length, pad_id=0)
    adv = torch.randn(ROWS, generator=g)
    old = -3 + 0.5 * torch.randn(rollout.tokens_RS.shape, generator=g)
    ref = old + 0.1 * torch.randn(rollout.tokens_RS.shape, generator=g)
    return rollout, adv, old, ref


def drew_random_numbers(seed):
    """Whether the global generator moved since init_parallel seeded it, i.e. whether
    start_session drew random weights (the generator is left as it was)."""
    now = torch.get_rng_state()
    torch.manual_seed(seed)
    seeded = torch.get_rng_state()
    torch.set_rng_state(now)
    return not torch.equal(now, seeded)


if __name__ == "__main__":
    cfg = load_config(None, sys.argv[1:])
    session = start_session(cfg)
    # checkpoint.load_dir supplies every weight (weights only: no RNG state restored), so the
    # policy is built without a random draw (session.py)
    drew = drew_random_numbers(cfg.train.seed)
    rollout, adv, old, ref = synthetic_rollout(cfg.data.seq_length)
    ctx = session.ctx
    how = micro_batching(cfg, ctx.layout)
    plans = plan_microbatches(range(ROWS), rollout.length_R.tolist(), ctx.layout.data, how)
    result = {"padding_fraction": padding_fraction(plans, dict(enumerate(
        rollout.length_R.tolist()))), "microbatches": len(plans[ctx.dp_rank]),
        "drew_random_weights": drew}
    if os.environ.get("SCORE"):
        scores = collect_on_rank0(score_rows(session.model, rollout, plans[ctx.dp_rank],
                                             session, 1.0), session)
        result["logp"] = {r: v.tolist() for r, v in sorted(scores.items())}
    # AGGREGATIONS (comma list): one step per loss aggregation, each from the same initial
    # weights (put back after every step: fp32 weights are the optimizer's master weights, so
    # the next step starts exactly where the first did); results keyed by aggregation
    aggregations = os.environ.get("AGGREGATIONS", "").split(",") if os.environ.get(
        "AGGREGATIONS") else [cfg.grpo.loss_aggregation]
    if len(aggregations) > 1 and cfg.model.params_dtype != "fp32":
        raise SystemExit("AGGREGATIONS: fp32 only (16-bit steps keep separate master weights)")
    params = [p for chunk in session.model for p in chunk.parameters()]
    initial = [p.detach().clone() for p in params]
    for aggregation in aggregations:
        grpo_cfg = dataclasses.replace(cfg.grpo, loss_aggregation=aggregation)
        inputs = train_inputs(rollout, adv, old, ref, aggregation, max_new_tokens=40)
        batches = [train_microbatch(rollout, plan, inputs) for plan in plans[ctx.dp_rank]]
        step = forward.loss_step(grpo_cfg, 1.0, ctx.tp_group)
        out = train_step(session.model, session.optimizer, session.scheduler, batches, step,
                         forward.LOSS_METRICS, ctx)
        metrics = {k: out.metrics[k] for k in ("loss", "kl", "grad_norm")}
        if len(aggregations) > 1:
            result[aggregation] = metrics
            with torch.no_grad():
                for p, p0 in zip(params, initial):
                    p.copy_(p0)
        else:
            result.update(metrics)
    if ctx.rank == 0:
        print("RESULT " + json.dumps(result))
    end_session(session)
