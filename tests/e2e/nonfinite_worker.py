"""Test support: non-finite steps are skipped, counted and named, never written to a
checkpoint. One process per rank (any layout); prints RESULT (rank 0).

On a fixed synthetic rollout: a clean step; a step whose loss is NaN (one advantage NaN); a
step whose loss is finite but whose gradients are not (a hook poisons the logits' gradient);
the guard stopping the run at train.max_consecutive_nonfinite; and a save refused while a
weight holds a NaN, leaving the last finite checkpoint as `latest`."""

import json
import math
import sys

import torch

from megatron_r1.batching import plan_microbatches
from megatron_r1.checkpoint.dist_ckpt import latest_checkpoint
from megatron_r1.config import load_config
from megatron_r1.grpo import forward
from megatron_r1.grpo.rollout_batch import pack_rollout, train_inputs, train_microbatch
from megatron_r1.rollout.types import Completion
from megatron_r1.session import end_session, micro_batching, start_session
from megatron_r1.train_step import NonFiniteGuard, train_step

ROWS = 8


def weights_sum(model):
    return sum(float(p.detach().double().sum()) for chunk in model for p in chunk.parameters())


def poisoned_gradients(step):
    """The loss step, with the logits' gradient of every micro-batch turned into NaN."""
    def wrapped(batch, model):
        logits, loss_fn = step(batch, model)
        if logits.requires_grad:
            logits.register_hook(lambda g: torch.full_like(g, math.nan))
        return logits, loss_fn
    return wrapped


if __name__ == "__main__":
    cfg = load_config(None, sys.argv[1:])
    session = start_session(cfg)
    ctx = session.ctx
    g = torch.Generator().manual_seed(3)
    groups = [[Completion(tuple(torch.randint(3, 500, (n,), generator=g).tolist()), (0.0,) * n,
                          "", "stop")] for n in torch.randint(2, 20, (ROWS,), generator=g)]
    rollout = pack_rollout([[1, 5, 9]] * ROWS, groups, cfg.data.seq_length, pad_id=0)
    plans = plan_microbatches(range(ROWS), rollout.length_R.tolist(), ctx.layout.data,
                              micro_batching(cfg, ctx.layout))[ctx.dp_rank]
    old = torch.full(rollout.tokens_RS.shape, -3.0)

    def step(advantages, fwd=None):
        inputs = train_inputs(rollout, advantages, old, old, cfg.grpo.loss_aggregation, 20)
        batches = [train_microbatch(rollout, p, inputs) for p in plans]
        fwd = fwd or forward.loss_step(cfg.grpo, 1.0, ctx.tp_group)
        return train_step(session.model, session.optimizer, session.scheduler, batches, fwd,
                          forward.LOSS_METRICS, ctx)

    adv = torch.randn(ROWS, generator=g)
    report = {}
    guard = NonFiniteGuard(3)
    clean = step(adv)
    report["clean"] = [clean.updated, clean.nonfinite, guard.observe(1, clean)]
    session.save(1, {})
    before = weights_sum(session.model)
    nan_adv = adv.clone()
    nan_adv[0] = math.nan
    skipped = step(nan_adv)
    report["nan_loss"] = [skipped.updated, skipped.nonfinite, guard.observe(2, skipped),
                          weights_sum(session.model) == before, "grad_norm" in skipped.metrics]
    poisoned = step(adv, poisoned_gradients(forward.loss_step(cfg.grpo, 1.0, ctx.tp_group)))
    report["nan_grad"] = [poisoned.updated, poisoned.nonfinite, guard.observe(3, poisoned),
                          math.isfinite(poisoned.metrics["loss"]),
                          weights_sum(session.model) == before]
    try:
        guard.observe(4, step(nan_adv))
        report["stopped"] = None
    except FloatingPointError as err:
        report["stopped"] = str(err)
    with torch.no_grad():
        next(session.model[0].parameters()).view(-1)[0] = math.nan
    try:
        session.save(5, {})
        report["saved_nan"] = True
    except FloatingPointError as err:
        report["saved_nan"] = str(err)
    report["latest"] = latest_checkpoint(session.checkpoint_dir).name
    report["left_behind"] = sorted(p.name for p in session.checkpoint_dir.iterdir()
                                   if p.name.startswith("."))
    if ctx.rank == 0:
        print("RESULT " + json.dumps(report))
    end_session(session)
