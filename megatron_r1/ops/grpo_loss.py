"""The per-token GRPO loss on [tokens, vocab] logits: fused kernels behind one public function.

`grpo_token_loss` computes, per token, the loss, log-prob, KL, clipped flag and entropy of
R1_RECIPE.md section 1 (the spec: grpo_loss_reference.py) and the gradient w.r.t. the
logits, without the [N, V] float32 temporaries of the eager code. `fused` picks the path:
"off" runs the PyTorch reference, "on" the csrc/ kernels (error if not built for the
device), "auto" the CPU kernel where built and the reference otherwise (warning once); on
CUDA "auto" is the reference until the CUDA kernel passes the GPU checks (`uses_kernels`).

Key decision: the gradient can be computed in the forward. The loss module knows, before
the forward, the weight each per-token loss gets in the scalar it backpropagates (mask /
denominator, times 1/num_microbatches); passing it as `grad_scale` lets the kernel write
d(sum_t grad_scale_t * loss_t)/d logits while the row is on chip (one read and one write of
the logits instead of three passes), optionally over the logits themselves
(`inplace_grad=True`: no [N, V] allocation at all). The backward then only rescales rows
whose upstream gradient differs from grad_scale (none, when it was right), so the result is
exact for any upstream; a row with grad_scale 0 but a non-zero true gradient comes out NaN.

With `tp_group` (world size > 1) the logits are this rank's vocabulary shard and the
statistics are all-reduced over that group (grpo_loss_vocab_parallel.py).

Tensor suffixes: N tokens (the flattened leading shape), V vocabulary columns.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_r1.ops import _extension
from megatron_r1.ops import grpo_loss_kernels as kernels
from megatron_r1.ops.grpo_loss_reference import (
    KL_ESTIMATORS,
    GRPOTokenLoss,
    KLEstimator,
    check_loss_args,
    check_token_shapes,
    grpo_token_loss_reference,
)
from megatron_r1.ops.grpo_loss_vocab_parallel import vocab_parallel_token_loss

FusedMode = Literal["auto", "on", "off"]
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OP = "grpo_token_loss"


def fused_kernels_available(device: torch.device | str = "cpu") -> bool:
    """Whether grpo_token_loss(fused="on") can run on `device` in this installation."""
    return _extension.supports(torch.device(device))


def uses_kernels(fused: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether grpo_token_loss runs the csrc kernels for logits of `dtype` on `device`.

    "auto" never picks the CUDA kernel: it has not passed the standing GPU checks yet
    (csrc/NOTES.md), so on CUDA auto means the PyTorch reference, with a one-time message on
    how to opt in (grpo.fused_loss: on). On CPU auto picks the C++ kernel where built.

    Raises:
        ValueError: an unknown mode, or "on" with a dtype the kernels do not take.
        RuntimeError: "on" where the kernels are not built for `device`.
    """
    if fused not in ("auto", "on", "off"):
        raise ValueError(f"fused={fused!r}: must be 'auto', 'on' or 'off'")
    if fused == "off":
        return False
    if dtype not in KERNEL_DTYPES:
        if fused == "on":
            raise ValueError(f"fused='on': the kernels take float32, bfloat16 or float16 "
                             f"logits, got {dtype}")
        return False
    if fused == "auto" and device.type == "cuda":
        _extension.warn_once(
            f"{_OP}:cuda-auto", f"{_OP}: using the PyTorch reference on CUDA: the CUDA kernel "
            "has not passed the GPU checks yet (csrc/NOTES.md); set grpo.fused_loss=on "
            "(fused='on') to opt in")
        return False
    if _extension.supports(device):
        return True
    if fused == "on":
        raise RuntimeError(f"fused='on' but {_extension.why_unsupported(device)}")
    _extension.warn_fallback_once(_OP, device)
    return False


def _as_rows(logits: Tensor) -> Tensor:
    """[..., V] -> [N, V] without a copy (a 2-D input may have any row stride)."""
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        raise ValueError(f"logits must be contiguous along the vocabulary (stride(-1) == 1), "
                         f"got strides {logits.stride()}")
    if logits.dim() == 2:
        return logits
    try:
        return logits.view(-1, logits.shape[-1])
    except RuntimeError as exc:
        raise ValueError(f"logits of shape {tuple(logits.shape)} and strides {logits.stride()} "
                         "cannot be viewed as [N, V] rows without a copy; pass a 2-D [N, V] "
                         "view (any row stride) or a contiguous tensor") from exc


def _rows(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.reshape(-1).to(dtype).contiguous()


def _opt_rows(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else _rows(t, dtype)


class _FusedGRPO(torch.autograd.Function):
    """Unsharded kernels: forward (optionally with the gradient) + backward."""

    @staticmethod
    def forward(ctx: Any, logits_NV: Tensor, target_N: Tensor, old_N: Tensor | None,
                ref_N: Tensor | None, adv_N: Tensor, mask_N: Tensor, grad_scale_N: Tensor | None,
                params: tuple[float, float, float, int, float], inplace: bool,
                want_grad: bool) -> tuple[Tensor, ...]:
        logits_NV = logits_NV.detach()  # the ops may write over it; autograd never sees that
        args = (target_N, old_N, ref_N, adv_N, mask_N)
        ctx.precomputed = want_grad and grad_scale_N is not None
        ctx.inplace = inplace
        ctx.temperature = params[4]
        if ctx.precomputed:
            if inplace:
                outs = kernels.grpo_fwd_grad_(logits_NV, *args, grad_scale_N, *params)
                grad_NV = logits_NV
            else:
                *outs, grad_NV = kernels.grpo_fwd_grad(logits_NV, *args, grad_scale_N, *params)
            ctx.save_for_backward(grad_NV, grad_scale_N, outs[7])
        else:
            outs = kernels.grpo_fwd(logits_NV, *args, *params)
            if want_grad:
                ctx.save_for_backward(logits_NV, target_N, outs[5], outs[6], outs[7])
        loss_N, logp_N, kl_N, clipped_N, entropy_N = outs[:5]
        ctx.mark_non_differentiable(logp_N, kl_N, clipped_N, entropy_N)
        return loss_N, logp_N, kl_N, clipped_N, entropy_N

    @staticmethod
    def backward(ctx: Any, g_loss_N: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.precomputed:
            grad_NV, grad_scale_N, dlogp_N = ctx.saved_tensors
            kernels.grpo_scale_rows_(grad_NV, kernels.precomputed_grad_ratio(
                g_loss_N, grad_scale_N, dlogp_N))
        else:
            logits_NV, target_N, row_max_N, log_norm_N, dlogp_N = ctx.saved_tensors
            args = (target_N, row_max_N, log_norm_N, (g_loss_N.float() * dlogp_N).contiguous(),
                    ctx.temperature, 0)
            if ctx.inplace:
                kernels.grpo_grad_(logits_NV, *args)
                grad_NV = logits_NV
            else:
                grad_NV = kernels.grpo_grad(logits_NV, *args)
        return grad_NV, None, None, None, None, None, None, None, None, None


def grpo_token_loss(
    logits: Tensor,
    target: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    temperature: float = 1.0,
    grad_scale: Tensor | None = None,
    inplace_grad: bool = False,
    fused: FusedMode = "auto",
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
) -> GRPOTokenLoss:
    """Per-token GRPO loss and metrics; the loss is differentiable w.r.t. `logits`.

    Args:
        logits: [..., V] float32/bfloat16/float16 logits, not divided by temperature; with
            tp_group, this rank's vocabulary shard. Must be viewable as [N, V] rows.
        target: [...] token ids in the full vocabulary (masked tokens may hold anything).
        old_logp: [...] sampling-policy log-probs, or None (ratio = 1).
        ref_logp: [...] reference-policy log-probs, or None (needs kl_coef = 0).
        advantages: [...] per-token advantages.
        mask: [...] bool or float weight; 0 = token does not count (loss and grad 0).
        clip_low, clip_high, kl_coef, kl_estimator, temperature: GRPOConfig's fields.
        grad_scale: [...] optional upstream gradient of each per-token loss, known before the
            forward (e.g. mask / denominator / num_microbatches). Lets the kernel compute the
            gradient in the forward pass; the gradient is exact for any actual upstream
            (rows that differ are rescaled in the backward), fastest when it matches.
        inplace_grad: write the logits' gradient over the logits (no [N, V] allocation). The
            logits' values are then gone after the forward (with grad_scale) or backward:
            nothing else may read them. Only the kernels honour it.
        fused: "auto", "on" or "off" (GRPOConfig.fused_loss), see the module docstring.
        tp_group: tensor-parallel group over which the vocabulary is split, or None.
        vocab_start: first vocabulary id of this shard (default rank * V_local).

    Returns:
        GRPOTokenLoss with tensors of the leading shape of `logits`; loss, logp, kl and
        entropy are float32 (float64 for float64 logits), clipped is bool.
    """
    check_loss_args(clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef,
                    kl_estimator=kl_estimator, temperature=temperature, ref_logp=ref_logp)
    check_token_shapes(logits, target=target, old_logp=old_logp, ref_logp=ref_logp,
                       advantages=advantages, mask=mask, grad_scale=grad_scale)
    use_kernels = uses_kernels(fused, logits.dtype, logits.device)
    sharded = tp_group is not None and dist.get_world_size(tp_group) > 1
    if not sharded and vocab_start not in (None, 0):
        raise ValueError(f"vocab_start={vocab_start!r} needs a tp_group of world size > 1")
    if not use_kernels and not sharded:
        return grpo_token_loss_reference(
            logits, target, old_logp, ref_logp, advantages, mask, clip_low=clip_low,
            clip_high=clip_high, kl_coef=kl_coef, kl_estimator=kl_estimator,
            temperature=temperature)

    lead = logits.shape[:-1]
    logits_NV = _as_rows(logits)
    f32 = torch.float32
    rows = (_rows(target, torch.int64), _opt_rows(old_logp, f32), _opt_rows(ref_logp, f32),
            _rows(advantages, f32), _rows(mask, f32), _opt_rows(grad_scale, f32))
    if sharded:
        assert tp_group is not None
        res = vocab_parallel_token_loss(
            logits_NV, *rows, clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef,
            kl_estimator=kl_estimator, temperature=temperature, inplace_grad=inplace_grad,
            tp_group=tp_group, vocab_start=vocab_start, use_kernels=use_kernels)
        outs: tuple[Tensor, ...] = (res.loss, res.logp, res.kl, res.clipped, res.entropy)
    else:
        params = (float(clip_low), float(clip_high), float(kl_coef),
                  KL_ESTIMATORS.index(kl_estimator), float(temperature))
        want_grad = torch.is_grad_enabled() and logits.requires_grad
        outs = _FusedGRPO.apply(logits_NV, *rows, params, inplace_grad, want_grad)
    loss, logp, kl, clipped, entropy = (t.view(lead) for t in outs)
    return GRPOTokenLoss(loss=loss, logp=logp, kl=kl, clipped=clipped, entropy=entropy)
