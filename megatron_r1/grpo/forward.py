"""Forward steps of the GRPO stage, in megatron's `forward_step(batch, model)` contract.

Layer L1 (the model is any module called as GPTModel is). Two steps:
- `score_step`: per-token log-probs (and entropy) of the labels at the sampling temperature,
  for the old-policy and reference log-probs and for the weight-sync check;
- `loss_step`: the GRPO loss through `grpo_token_loss` (fused kernel where built), whose
  per-token output is aggregated with the weights of grpo/loss.py. A micro-batch of the
  rollout's first mini-batch may take its old log-probs from its own forward
  (`OLD_FROM_FORWARD`): the policy has not moved since it sampled, so a separate old pass
  over those rows would compute the same numbers.
Under tensor parallelism the logits are this rank's vocabulary shard; the op all-reduces its
per-row statistics over the TP group (and only those). Batches arrive on the model's device
(megatron_r1.schedule moves them), padded [B, L] or packed [1, T] with `packed_seq_params`.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import torch
import torch.distributed as dist

from megatron_r1.config.schema import GRPOConfig
from megatron_r1.ops import grpo_token_loss

Batch = dict[str, Any]


class RoutingHook(Protocol):
    """MoE routing record/replay around each model call (model/routing_replay.py)."""

    def before_forward(self, batch: Batch, chunk: torch.nn.Module) -> None: ...

    def after_forward(self, batch: Batch, chunk: torch.nn.Module) -> None: ...


def _logits(batch: Batch, model: torch.nn.Module, routing: RoutingHook | None) -> torch.Tensor:
    if routing is not None:
        routing.before_forward(batch, model)
    output = model(batch["tokens"], batch["position_ids"], None,
                   packed_seq_params=batch.get("packed_seq_params"))
    if routing is not None:
        routing.after_forward(batch, model)
    return output


def _vocab_start(logits_BSV: torch.Tensor, tp_group: dist.ProcessGroup | None) -> int:
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return 0
    return dist.get_rank(tp_group) * logits_BSV.shape[-1]


def _score_loss(batch: Batch, temperature: float, fused: str, tp_group: Any,
                logits_BSV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    zeros = torch.zeros_like(batch["loss_mask"])
    out = grpo_token_loss(
        logits_BSV.detach(), batch["labels"], zeros, zeros, zeros, batch["loss_mask"],
        kl_coef=0.0, temperature=temperature, fused=fused,  # type: ignore[arg-type]
        tp_group=tp_group, vocab_start=_vocab_start(logits_BSV, tp_group))
    mask = batch["loss_mask"]
    return (torch.zeros((), device=logits_BSV.device), mask.sum().to(torch.int),
            {"logp": out.logp.float() * mask})


def score_step(temperature: float, fused: str, tp_group: Any,
               routing: RoutingHook | None = None) -> Any:
    """forward_step returning each label's log-prob (masked positions 0) per micro-batch, in
    the micro-batch's own layout (batching.split_rows gives it back per row)."""
    def step(batch: Batch, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        return _logits(batch, model, routing), functools.partial(_score_loss, batch,
                                                                 temperature, fused, tp_group)
    return step


def _grpo_loss(batch: Batch, grpo: GRPOConfig, temperature: float, tp_group: Any,
               logits_BSV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    mask, weights = batch["loss_mask"], batch["weights"]
    own_old = bool(batch.get(OLD_FROM_FORWARD))
    # pi_old is the policy computing these logits (nothing was updated since it sampled): no
    # old log-probs make the op take this forward's own, detached (ratio 1 with its gradient;
    # ops/grpo_loss_reference.py), and without a reference model (kl_coef 0) no reference ones
    ref_logp = None if own_old and batch.get(REF_IS_OLD) else batch["ref_logp"]
    out = grpo_token_loss(
        logits_BSV, batch["labels"], None if own_old else batch["old_logp"], ref_logp,
        batch["advantages"],
        mask, clip_low=grpo.clip_low, clip_high=grpo.clip_high, kl_coef=grpo.kl_coef,
        kl_estimator=grpo.kl_estimator, temperature=temperature, grad_scale=weights,
        inplace_grad=True, fused=grpo.fused_loss, tp_group=tp_group,
        vocab_start=_vocab_start(logits_BSV, tp_group))
    old_logp = out.logp.detach() if own_old else batch["old_logp"]
    loss_sum = (out.loss * weights).sum()
    tokens = mask.sum()

    def pair(value_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        return torch.stack([value_sum.detach().float(), count.float()])

    ratio = torch.exp(out.logp - old_logp) * mask
    metrics: dict[str, Any] = {
        "loss": pair(loss_sum, batch["count"]),
        "kl": pair((out.kl * mask).sum(), tokens),
        "clip_fraction": pair((out.clipped.float() * mask).sum(), tokens),
        "entropy": pair((out.entropy * mask).sum(), tokens),
        "ratio_mean": pair(ratio.sum(), tokens),
        # trainer vs engine: the same policy should give the same log-probs (at the first
        # mini-batch of a rollout the policy is still the sampling one)
        "sampler_logp_abs_diff": pair(((out.logp - batch["sampler_logp"]).abs() * mask).sum(),
                                      tokens),
    }
    if own_old:
        metrics["old_logp"] = old_logp.float() * mask  # per token, for the rollout's record
    return loss_sum, batch["count"], metrics


LOSS_METRICS = ["loss", "kl", "clip_fraction", "entropy", "ratio_mean", "sampler_logp_abs_diff"]

OLD_FROM_FORWARD = "old_from_forward"
"""A training micro-batch flag: take the old log-probs from this forward's logits (the first
mini-batch of a rollout, whose policy is still the sampling one) instead of `old_logp`; the
loss then also returns them per token as `old_logp`."""

REF_IS_OLD = "ref_is_old"
"""With OLD_FROM_FORWARD: the run has no reference model (grpo.kl_coef 0), whose log-probs
stand in for the reference ones; use this forward's for both."""


def loss_step(grpo: GRPOConfig, temperature: float, tp_group: Any,
              routing: RoutingHook | None = None) -> Any:
    """forward_step of one GRPO training micro-batch."""
    def step(batch: Batch, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        return _logits(batch, model, routing), functools.partial(_grpo_loss, batch, grpo,
                                                                 temperature, tp_group)
    return step
