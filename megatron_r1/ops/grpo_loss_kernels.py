"""The csrc/ GRPO loss kernels as torch.library custom ops (schema + fake implementation).

Each op allocates its outputs and calls the out-style binding in megatron_r1._C, whose C++
checks name the offending tensor. Ops ending in ``_`` write over their first argument. The
fake implementations let torch.compile and FakeTensor tracing see shapes without the
extension. Autograd lives one layer up (grpo_loss.py, grpo_loss_vocab_parallel.py).

Shapes: N rows (tokens), V vocabulary columns of this rank. Per-row tensors are contiguous
float32 [N] (target: int64 [N]); logits [N, V] float32/bfloat16/float16 with contiguous rows.
The 8 forward outputs are (loss, logp, kl, clipped, entropy, row_max, log_norm, dlogp):
row_max and log_norm (logsumexp(x / T) = row_max / T + log_norm) and dlogp = d loss / d logp
are what the backward needs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_r1.ops import _extension

FwdOut = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
FwdGradOut = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
StatsOut = tuple[Tensor, Tensor, Tensor, Tensor]


def _ext():  # the pybind11 module
    ext = _extension.load()
    if ext is None:
        raise RuntimeError(f"megatron_r1 GRPO kernels: {_extension.why_unsupported(torch.device('cpu'))}")
    return ext


def _fwd_outputs(logits: Tensor) -> FwdOut:
    n = logits.shape[0]

    def f32() -> Tensor:
        return logits.new_empty(n, dtype=torch.float32)

    return (f32(), f32(), f32(), logits.new_empty(n, dtype=torch.bool), f32(), f32(), f32(), f32())


# ---- unsharded forward ---------------------------------------------------------------------
@torch.library.custom_op("megatron_r1::grpo_fwd", mutates_args=())
def grpo_fwd(logits: Tensor, target: Tensor, old_logp: Tensor | None, ref_logp: Tensor | None,
             advantages: Tensor, mask: Tensor, clip_low: float, clip_high: float, kl_coef: float,
             kl_estimator: int, temperature: float) -> FwdOut:
    """Forward only: statistics and per-token outputs, one read of the logits."""
    outs = _fwd_outputs(logits)
    _ext().grpo_fwd(logits, target, old_logp, ref_logp, advantages, mask, None, None, *outs,
                    clip_low, clip_high, kl_coef, kl_estimator, temperature)
    return outs


@grpo_fwd.register_fake
def _(logits, target, old_logp, ref_logp, advantages, mask, clip_low, clip_high, kl_coef,
      kl_estimator, temperature):
    return _fwd_outputs(logits)


@torch.library.custom_op("megatron_r1::grpo_fwd_grad", mutates_args=())
def grpo_fwd_grad(logits: Tensor, target: Tensor, old_logp: Tensor | None,
                  ref_logp: Tensor | None, advantages: Tensor, mask: Tensor, grad_scale: Tensor,
                  clip_low: float, clip_high: float, kl_coef: float, kl_estimator: int,
                  temperature: float) -> FwdGradOut:
    """Forward plus the gradient for upstream grad_scale, into a new [N, V] tensor."""
    outs = _fwd_outputs(logits)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _ext().grpo_fwd(logits, target, old_logp, ref_logp, advantages, mask, grad_scale, grad,
                    *outs, clip_low, clip_high, kl_coef, kl_estimator, temperature)
    return (*outs, grad)


@grpo_fwd_grad.register_fake
def _(logits, target, old_logp, ref_logp, advantages, mask, grad_scale, clip_low, clip_high,
      kl_coef, kl_estimator, temperature):
    return (*_fwd_outputs(logits), torch.empty_like(logits, memory_format=torch.contiguous_format))


@torch.library.custom_op("megatron_r1::grpo_fwd_grad_", mutates_args=("logits",))
def grpo_fwd_grad_(logits: Tensor, target: Tensor, old_logp: Tensor | None,
                   ref_logp: Tensor | None, advantages: Tensor, mask: Tensor, grad_scale: Tensor,
                   clip_low: float, clip_high: float, kl_coef: float, kl_estimator: int,
                   temperature: float) -> FwdOut:
    """Forward plus the gradient for upstream grad_scale, written over the logits."""
    outs = _fwd_outputs(logits)
    _ext().grpo_fwd(logits, target, old_logp, ref_logp, advantages, mask, grad_scale, logits,
                    *outs, clip_low, clip_high, kl_coef, kl_estimator, temperature)
    return outs


@grpo_fwd_grad_.register_fake
def _(logits, target, old_logp, ref_logp, advantages, mask, grad_scale, clip_low, clip_high,
      kl_coef, kl_estimator, temperature):
    return _fwd_outputs(logits)


# ---- vocab-parallel phase 1 ----------------------------------------------------------------
@torch.library.custom_op("megatron_r1::grpo_stats", mutates_args=())
def grpo_stats(logits: Tensor, target: Tensor, temperature: float, vocab_start: int) -> StatsOut:
    """(row_max, sum_exp, sum_exp_x, target_logit) of the shard, see csrc/grpo_loss.h."""
    n = logits.shape[0]
    outs = tuple(logits.new_empty(n, dtype=torch.float32) for _ in range(4))
    _ext().grpo_stats(logits, target, *outs, temperature, vocab_start)
    return outs  # type: ignore[return-value]


@grpo_stats.register_fake
def _(logits, target, temperature, vocab_start):
    return tuple(logits.new_empty(logits.shape[0], dtype=torch.float32) for _ in range(4))


# ---- gradient ------------------------------------------------------------------------------
@torch.library.custom_op("megatron_r1::grpo_grad", mutates_args=())
def grpo_grad(logits: Tensor, target: Tensor, row_max: Tensor, log_norm: Tensor, coef: Tensor,
              temperature: float, vocab_start: int) -> Tensor:
    """coef / T * (onehot(target - vocab_start) - softmax(logits / T)) into a new tensor."""
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _ext().grpo_grad(logits, target, row_max, log_norm, coef, grad, temperature, vocab_start)
    return grad


@grpo_grad.register_fake
def _(logits, target, row_max, log_norm, coef, temperature, vocab_start):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("megatron_r1::grpo_grad_", mutates_args=("logits",))
def grpo_grad_(logits: Tensor, target: Tensor, row_max: Tensor, log_norm: Tensor, coef: Tensor,
               temperature: float, vocab_start: int) -> None:
    """grpo_grad written over the logits."""
    _ext().grpo_grad(logits, target, row_max, log_norm, coef, logits, temperature, vocab_start)


@grpo_grad_.register_fake
def _(logits, target, row_max, log_norm, coef, temperature, vocab_start):
    return None


@torch.library.custom_op("megatron_r1::grpo_scale_rows_", mutates_args=("grad",))
def grpo_scale_rows_(grad: Tensor, ratio: Tensor) -> None:
    """grad[i] *= ratio[i]; rows with ratio exactly 1 are not touched."""
    _ext().grpo_scale_rows(grad, ratio)


@grpo_scale_rows_.register_fake
def _(grad, ratio):
    return None


def precomputed_grad_ratio(upstream_N: Tensor, grad_scale_N: Tensor, dlogp_N: Tensor) -> Tensor:
    """Row factors turning a gradient computed for upstream grad_scale into one for upstream.

    Exactly 1 where upstream == grad_scale (those rows are left alone). A row whose
    grad_scale was 0 holds a zero gradient that cannot be rescaled: its factor is NaN when
    the true gradient is non-zero (so the error shows as NaN gradients, no host sync), else 0.
    """
    up = upstream_N.to(torch.float32)
    lost = (up * dlogp_N) != 0
    nan = torch.full_like(up, float("nan"))
    safe = torch.where(grad_scale_N != 0, grad_scale_N, torch.ones_like(grad_scale_N))
    ratio = torch.where(grad_scale_N != 0, up / safe, torch.where(lost, nan, torch.zeros_like(up)))
    return ratio.contiguous()
