"""The per-token GRPO loss in plain PyTorch: the executable spec of every fused path.

R1_RECIPE.md section 1, per token t of a completion (mask selects completion tokens):

    logp    = log_softmax(logits / temperature)[target]
    ratio   = exp(logp - old_logp)
    surr    = min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
    d       = ref_logp - logp
    kl      = k1: -d  |  k2: d^2 / 2  |  k3: exp(d) - d - 1   (k3 evaluated as expm1(d) - d)
    loss    = mask * -(surr - kl_coef * kl)
    clipped = clip(ratio) * A < ratio * A   (the clipped branch is strictly the min, so the
              ratio gets no gradient: A > 0 and ratio > 1 + clip_high, or A < 0 and
              ratio < 1 - clip_low)
    entropy = -sum_v p_v log p_v  of softmax(logits / temperature)

Masked tokens (mask == 0) have loss 0, kl 0, clipped False and zero gradient whatever their
other inputs hold (padding may carry target -100 or NaN log-probs); logp and entropy are
reported for every token. A target outside [0, V) gives logp = NaN (and NaN loss if unmasked).
The loss is differentiable w.r.t. the logits; logp, kl, clipped and entropy are detached
metrics. Aggregating the per-token losses (seq-mean-token-mean, token-mean, ...) is the loss
module's job, not this one's.

Corrected forms (grpo.tis_imp_ratio_cap, grpo.seq_mask_low/high; off by default). The engine
that sampled the tokens computes pi_sampler, slightly off pi_old; per completion i and token t,
with d_it = old_logp - sampler_logp:

    tis_it  = min(exp(d_it), cap)                              (token-level TIS)
    keep_i  = low <= exp(mean_t d_it) <= high                  (sequence masking)
    loss_it = tis_it * keep_i * mask * -(surr - kl_coef * kl)

The factor is a weight on the per-token loss and its gradient, applied outside this op (as
the loss aggregation's weights are: `rollout_correction_reference` below computes it the
obvious way; megatron_r1.grpo.mismatch is the production path).

Tensor suffixes: N = tokens (any leading shape), V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]
# Index = the estimator's code in the kernels (csrc/grpo_loss_math.h).
KL_ESTIMATORS: tuple[KLEstimator, ...] = ("k1", "k2", "k3")


@dataclass(frozen=True, slots=True)
class GRPOTokenLoss:
    """Per-token outputs, each of the logits' leading shape ([N] or e.g. [B, L])."""

    loss: Tensor
    """float32 (float64 for float64 logits): mask * -(surr - kl_coef * kl); carries the grad."""
    logp: Tensor
    """log pi_theta(target) at the temperature, detached."""
    kl: Tensor
    """The chosen KL estimator (0 on masked tokens), detached."""
    clipped: Tensor
    """bool: the clipped surrogate was strictly the smaller branch (False on masked tokens)."""
    entropy: Tensor
    """Entropy of softmax(logits / temperature), detached."""


@dataclass(frozen=True, slots=True)
class TokenTerms:
    """The GRPO terms given logp (the [N] part of the loss, shared with the vocab-parallel path)."""

    loss_N: Tensor
    kl_N: Tensor
    clipped_N: Tensor
    dlogp_N: Tensor
    """d loss / d logp, mask included (detached)."""


def check_loss_args(
    *,
    clip_low: float,
    clip_high: float,
    kl_coef: float,
    kl_estimator: str,
    temperature: float,
    ref_logp: Tensor | None,
) -> None:
    """Raise ValueError naming the argument for anything a caller (or a config) can get wrong."""
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={kl_estimator!r}: must be one of {KL_ESTIMATORS}")
    if not clip_low >= 0.0:  # >= 1: no lower clip (ratios are positive)
        raise ValueError(f"clip_low={clip_low!r}: must be >= 0")
    if not clip_high >= 0.0:
        raise ValueError(f"clip_high={clip_high!r}: must be >= 0")
    if not kl_coef >= 0.0:
        raise ValueError(f"kl_coef={kl_coef!r}: must be >= 0")
    if not (temperature > 0.0 and temperature != float("inf")):
        raise ValueError(f"temperature={temperature!r}: must be finite and > 0")
    if ref_logp is None and kl_coef != 0.0:
        raise ValueError(f"ref_logp is None but kl_coef={kl_coef!r}: the KL term needs the "
                         "reference log-probs (pass them, or set kl_coef=0)")


def check_token_shapes(logits: Tensor, **per_token: Tensor | None) -> None:
    """Every per-token tensor must have the logits' leading shape."""
    if logits.dim() < 1:
        raise ValueError(f"logits must be [..., V], got shape {tuple(logits.shape)}")
    lead = logits.shape[:-1]
    for name, t in per_token.items():
        if t is not None and t.shape != lead:
            raise ValueError(f"{name} must have the logits' leading shape {tuple(lead)} "
                             f"(logits {tuple(logits.shape)}), got {tuple(t.shape)}")


def token_terms(
    logp_N: Tensor,
    old_logp_N: Tensor | None,
    ref_logp_N: Tensor | None,
    adv_N: Tensor,
    mask_N: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    kl_coef: float,
    kl_estimator: KLEstimator,
) -> TokenTerms:
    """GRPO loss terms from log-probs (differentiable w.r.t. logp_N).

    All inputs share one float dtype and shape. Inactive tokens get their inputs replaced by
    zeros before any arithmetic, so NaN/inf padding cannot leak into values or gradients.
    """
    active = mask_N != 0
    zero = torch.zeros((), dtype=logp_N.dtype, device=logp_N.device)
    logp = torch.where(active, logp_N, zero)
    old = logp.detach() if old_logp_N is None else torch.where(active, old_logp_N, zero)
    adv = torch.where(active, adv_N, zero)
    ratio = torch.exp(logp - old)
    surr1 = ratio * adv
    surr2 = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    clipped = (surr2 < surr1) & active
    surr = torch.minimum(surr1, surr2)
    if ref_logp_N is None:
        kl = torch.zeros_like(logp)
        dkl = torch.zeros_like(logp)
    else:
        d = torch.where(active, ref_logp_N, zero) - logp
        if kl_estimator == "k1":
            kl, dkl = -d, torch.ones_like(d)
        elif kl_estimator == "k2":
            kl, dkl = 0.5 * d * d, -d
        else:
            em1 = torch.expm1(d)
            kl, dkl = em1 - d, -em1
    mask = mask_N.to(logp.dtype)
    loss = torch.where(active, mask * -(surr - kl_coef * kl), zero)
    dsurr = torch.where(clipped, zero, surr1)
    dlogp = torch.where(active, mask * (kl_coef * dkl - dsurr), zero)
    return TokenTerms(loss_N=loss, kl_N=torch.where(active, kl, zero).detach(),
                      clipped_N=clipped, dlogp_N=dlogp.detach())


def grpo_token_loss_reference(
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
) -> GRPOTokenLoss:
    """The per-token GRPO loss, computed the obvious way (see the module docstring).

    Args:
        logits: [..., V] float logits of the full vocabulary (not divided by temperature).
        target: [...] integer token ids.
        old_logp: [...] log-probs of the sampling policy, or None for ratio = 1.
        ref_logp: [...] log-probs of the reference policy, or None (requires kl_coef = 0).
        advantages: [...] per-token advantages (broadcast per-sequence ones before the call).
        mask: [...] bool or float weights; 0 marks tokens that do not count.
        clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high] (no lower
            clip from clip_low >= 1 on).
        kl_coef: beta, the KL weight.
        kl_estimator: "k1", "k2" or "k3".
        temperature: logits are divided by it.

    Returns:
        GRPOTokenLoss in float32 (float64 for float64 logits). Half-precision logits are
        upcast to float32 first, as every eager implementation does.
    """
    check_loss_args(clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef,
                    kl_estimator=kl_estimator, temperature=temperature, ref_logp=ref_logp)
    check_token_shapes(logits, target=target, old_logp=old_logp, ref_logp=ref_logp,
                       advantages=advantages, mask=mask)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    vocab = logits.shape[-1]
    logsm = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    valid = (target >= 0) & (target < vocab)
    picked = logsm.gather(-1, torch.where(valid, target, 0).long().unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, picked, torch.full_like(picked, float("nan")))
    probs = logsm.detach().exp()
    entropy = -torch.where(probs > 0, probs * logsm.detach(), 0.0).sum(-1)

    def cast(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(dtype)

    terms = token_terms(logp, cast(old_logp), cast(ref_logp), advantages.to(dtype),
                        mask.to(dtype), clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef,
                        kl_estimator=kl_estimator)
    return GRPOTokenLoss(loss=terms.loss_N, logp=logp.detach(), kl=terms.kl_N,
                         clipped=terms.clipped_N, entropy=entropy)


def rollout_correction_reference(old_logp: list[Tensor], sampler_logp: list[Tensor], *,
                                 tis_cap: float | None, seq_low: float | None,
                                 seq_high: float | None) -> list[Tensor]:
    """Each completion's per-token factor tis_it * keep_i (see the module docstring), one
    sequence at a time in float64; None switches a part off.

    Args:
        old_logp, sampler_logp: per completion, [T_i] log-probs of its tokens under the
            trainer's pi_old and under the engine that sampled them.
    """
    factors = []
    for old, sampler in zip(old_logp, sampler_logp):
        d = old.double() - sampler.double()
        factor = torch.ones_like(d)
        if tis_cap is not None:
            factor = torch.minimum(d.exp(), torch.tensor(tis_cap, dtype=torch.float64))
        if seq_low is not None and seq_high is not None and d.numel():
            geometric_mean_ratio = float(d.mean().exp())
            if not seq_low <= geometric_mean_ratio <= seq_high:
                factor = torch.zeros_like(d)
        factors.append(factor)
    return factors
