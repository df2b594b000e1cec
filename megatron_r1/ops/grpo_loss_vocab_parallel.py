"""The per-token GRPO loss over a vocabulary split across a tensor-parallel group.

Each rank holds logits[:, vocab_start : vocab_start + V_local]. Phase 1 reduces the local
shard to per-row statistics (max, sum of exponentials, sum of p * log p terms, target logit);
the only communication is two all-reduces of those [N] statistics over the TP group passed in
(MAX of the row max, then SUM of the rescaled sums stacked into one [4, N] tensor); every
rank then finishes the [N]-sized GRPO math itself and computes the gradient of its shard
without further communication. The result equals the unsharded one (tests/ops check it at
world sizes 2 and 4 with gloo). Shards may have different widths: target validity is
counted across ranks rather than derived from a global vocabulary size.

The per-row work runs through a backend: the csrc/ kernels (grpo_loss_kernels) or the plain
PyTorch functions below, so the same collective code serves fused="on" and fused="off".

Tensor suffixes: N rows (tokens), V this rank's vocabulary columns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_r1.ops import grpo_loss_kernels as kernels
from megatron_r1.ops.grpo_loss_reference import KL_ESTIMATORS, GRPOTokenLoss, token_terms


@dataclass(frozen=True, slots=True)
class RowBackend:
    """Per-row primitives of the vocab-parallel loss (signatures of grpo_loss_kernels)."""

    stats: Callable[[Tensor, Tensor, float, int], tuple[Tensor, Tensor, Tensor, Tensor]]
    grad: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, float, int], Tensor]
    grad_: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, float, int], None]
    scale_rows_: Callable[[Tensor, Tensor], None]


def _local_target(target_N: Tensor, vocab_start: int, vocab: int) -> tuple[Tensor, Tensor]:
    local = target_N - vocab_start
    inside = (local >= 0) & (local < vocab)
    return torch.where(inside, local, torch.zeros_like(local)), inside


def _torch_stats(logits_NV: Tensor, target_N: Tensor, temperature: float,
                 vocab_start: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x_NV = logits_NV.float()
    row_max_N = x_NV.amax(-1)
    d_NV = (x_NV - row_max_N[:, None]) / temperature
    e_NV = d_NV.exp()
    local_N, inside_N = _local_target(target_N, vocab_start, x_NV.shape[1])
    picked_N = x_NV.gather(-1, local_N[:, None]).squeeze(-1)
    return (row_max_N, e_NV.sum(-1), torch.where(e_NV > 0, e_NV * d_NV, 0.0).sum(-1),
            torch.where(inside_N, picked_N, 0.0))


def _torch_grad(logits_NV: Tensor, target_N: Tensor, row_max_N: Tensor, log_norm_N: Tensor,
                coef_N: Tensor, temperature: float, vocab_start: int) -> Tensor:
    x_NV = logits_NV.float()
    p_NV = torch.exp((x_NV - row_max_N[:, None]) / temperature - log_norm_N[:, None])
    c_N = coef_N / temperature
    local_N, inside_N = _local_target(target_N, vocab_start, x_NV.shape[1])
    onehot_NV = torch.zeros_like(p_NV).scatter_(-1, local_N[:, None], inside_N[:, None].float())
    return (c_N[:, None] * (onehot_NV - p_NV)).to(logits_NV.dtype)


def _torch_grad_(logits_NV: Tensor, *args: Any) -> None:
    logits_NV.copy_(_torch_grad(logits_NV, *args))


def _torch_scale_rows_(grad_NV: Tensor, ratio_N: Tensor) -> None:
    rows = (ratio_N != 1).nonzero().squeeze(1)
    grad_NV[rows] = (grad_NV[rows].float() * ratio_N[rows, None]).to(grad_NV.dtype)


KERNEL_BACKEND = RowBackend(stats=kernels.grpo_stats, grad=kernels.grpo_grad,
                            grad_=kernels.grpo_grad_, scale_rows_=kernels.grpo_scale_rows_)
TORCH_BACKEND = RowBackend(stats=_torch_stats, grad=_torch_grad, grad_=_torch_grad_,
                           scale_rows_=_torch_scale_rows_)


@dataclass(frozen=True, slots=True)
class _Setup:
    group: dist.ProcessGroup
    vocab_start: int
    backend: RowBackend
    clip_low: float
    clip_high: float
    kl_coef: float
    kl_estimator: str
    temperature: float
    inplace: bool
    want_grad: bool


def _global_stats(setup: _Setup, logits_NV: Tensor, target_N: Tensor) -> tuple[Tensor, ...]:
    """(row_max, log_norm, entropy, logp) of the full vocabulary: the only communication."""
    t = setup.temperature
    row_max_N, sum_exp_N, sum_exp_x_N, target_logit_N = setup.backend.stats(
        logits_NV, target_N, t, setup.vocab_start)
    _, inside_N = _local_target(target_N, setup.vocab_start, logits_NV.shape[1])
    global_max_N = row_max_N.clone()
    dist.all_reduce(global_max_N, op=dist.ReduceOp.MAX, group=setup.group)
    # Rescale this shard's sums to the global max: exp((m - M) / T), guarding empty shards
    # (all -inf logits: sum 0) against -inf * 0.
    delta_N = (row_max_N - global_max_N) / t
    f_N = torch.exp(delta_N)
    has_N = sum_exp_N > 0
    packed_4N = torch.stack([
        torch.where(has_N, sum_exp_N * f_N, 0.0),
        torch.where(has_N, f_N * (sum_exp_x_N + delta_N * sum_exp_N), 0.0),
        target_logit_N,
        inside_N.float(),
    ])
    dist.all_reduce(packed_4N, op=dist.ReduceOp.SUM, group=setup.group)
    sum_exp_N, sum_exp_x_N, target_logit_N, found_N = packed_4N.unbind(0)
    log_norm_N = sum_exp_N.log()
    entropy_N = log_norm_N - sum_exp_x_N / sum_exp_N
    logp_N = torch.where(found_N == 1, (target_logit_N - global_max_N) / t - log_norm_N,
                         float("nan"))
    return global_max_N, log_norm_N.contiguous(), entropy_N, logp_N


class _VocabParallelGRPO(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits_NV: Tensor, target_N: Tensor, old_N: Tensor | None,
                ref_N: Tensor | None, adv_N: Tensor, mask_N: Tensor, grad_scale_N: Tensor | None,
                setup: _Setup) -> tuple[Tensor, ...]:
        logits_NV = logits_NV.detach()
        row_max_N, log_norm_N, entropy_N, logp_N = _global_stats(setup, logits_NV, target_N)
        terms = token_terms(logp_N, old_N, ref_N, adv_N, mask_N, clip_low=setup.clip_low,
                            clip_high=setup.clip_high, kl_coef=setup.kl_coef,
                            kl_estimator=setup.kl_estimator)  # type: ignore[arg-type]
        dlogp_N = terms.dlogp_N.contiguous()
        ctx.setup = setup
        ctx.precomputed = setup.want_grad and grad_scale_N is not None
        if ctx.precomputed:
            assert grad_scale_N is not None
            args = (target_N, row_max_N, log_norm_N, (grad_scale_N * dlogp_N).contiguous(),
                    setup.temperature, setup.vocab_start)
            if setup.inplace:
                setup.backend.grad_(logits_NV, *args)
                grad_NV = logits_NV
            else:
                grad_NV = setup.backend.grad(logits_NV, *args)
            ctx.save_for_backward(grad_NV, grad_scale_N, dlogp_N)
        elif setup.want_grad:
            ctx.save_for_backward(logits_NV, target_N, row_max_N, log_norm_N, dlogp_N)
        ctx.mark_non_differentiable(logp_N, terms.kl_N, terms.clipped_N, entropy_N)
        return terms.loss_N.detach(), logp_N, terms.kl_N, terms.clipped_N, entropy_N

    @staticmethod
    def backward(ctx: Any, g_loss_N: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        setup: _Setup = ctx.setup
        if ctx.precomputed:
            grad_NV, grad_scale_N, dlogp_N = ctx.saved_tensors
            setup.backend.scale_rows_(grad_NV, kernels.precomputed_grad_ratio(
                g_loss_N, grad_scale_N, dlogp_N))
        else:
            logits_NV, target_N, row_max_N, log_norm_N, dlogp_N = ctx.saved_tensors
            args = (target_N, row_max_N, log_norm_N, (g_loss_N.float() * dlogp_N).contiguous(),
                    setup.temperature, setup.vocab_start)
            if setup.inplace:
                setup.backend.grad_(logits_NV, *args)
                grad_NV = logits_NV
            else:
                grad_NV = setup.backend.grad(logits_NV, *args)
        return grad_NV, None, None, None, None, None, None, None


def vocab_parallel_token_loss(
    logits_NV: Tensor,
    target_N: Tensor,
    old_logp_N: Tensor | None,
    ref_logp_N: Tensor | None,
    adv_N: Tensor,
    mask_N: Tensor,
    grad_scale_N: Tensor | None,
    *,
    clip_low: float,
    clip_high: float,
    kl_coef: float,
    kl_estimator: str,
    temperature: float,
    inplace_grad: bool,
    tp_group: dist.ProcessGroup,
    vocab_start: int | None,
    use_kernels: bool,
) -> GRPOTokenLoss:
    """Vocab-parallel per-token loss on prepared [N] rows (see grpo_loss.grpo_token_loss).

    Per-row inputs are contiguous float32 [N] (target int64); logits_NV is this rank's shard.
    vocab_start defaults to rank * V_local (equal shards, Megatron's layout).
    """
    assert kl_estimator in KL_ESTIMATORS
    start = dist.get_rank(tp_group) * logits_NV.shape[1] if vocab_start is None else vocab_start
    if start < 0:
        raise ValueError(f"vocab_start={vocab_start!r}: must be >= 0")
    setup = _Setup(group=tp_group, vocab_start=int(start),
                   backend=KERNEL_BACKEND if use_kernels else TORCH_BACKEND,
                   clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef,
                   kl_estimator=kl_estimator, temperature=temperature, inplace=inplace_grad,
                   want_grad=torch.is_grad_enabled() and logits_NV.requires_grad)
    loss, logp, kl, clipped, entropy = _VocabParallelGRPO.apply(
        logits_NV, target_N, old_logp_N, ref_logp_N, adv_N, mask_N, grad_scale_N, setup)
    return GRPOTokenLoss(loss=loss, logp=logp, kl=kl, clipped=clipped, entropy=entropy)
