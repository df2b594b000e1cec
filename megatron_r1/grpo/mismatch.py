"""Train/rollout mismatch: how far the trainer's log-probs of the sampled tokens lie from the
engine's, and the importance-sampling corrections for the gap.

Layer L1. The engine (vLLM) samples with its own kernels, precision and, for MoE models, its
own routing decisions; the trainer recomputes the same policy, pi_old, and the two disagree a
little on every token (more in bf16/FP8, and a flipped expert moves a token a lot). GRPO's
importance ratio pi_theta / pi_old assumes pi_old sampled the tokens; pi_sampler did. Per token
t of a completion, with d_t = log pi_old(t) - log pi_sampler(t):

    ratio_t   = exp(d_t)                                    pi_old / pi_sampler
    k3_t      = ratio_t - 1 - d_t                           k3 estimate of KL(sampler || old),
                                                            unbiased under the sampler's tokens
    tis_t     = min(ratio_t, cap)                           token-level truncated IS (TIS)
    keep_i    = low <= exp(mean_t d_t) <= high              sequence masking (geometric mean)
    weight_t  = tis_t * keep_i                              multiplies the token's loss

The weight multiplies the aggregation weight of grpo/loss.py, i.e. the per-token loss and its
gradient (the fused kernels' grad_scale), outside the kernels. A masked sequence contributes no
loss but keeps its share of the aggregation's denominator, as a truncated token does: a step in
which many sequences are masked is a smaller step, not a renormalised one, and a step in which
all are masked is a zero update rather than a division by zero. With pi_sampler = pi_old every
weight is 1 and nothing changes.

The engine's log-probs are vLLM's processed ones: after temperature and, when rollout.top_p < 1,
after the nucleus truncation and renormalisation. The sampler then really is the truncated
policy and pi_sampler >= pi_old on every sampled token by construction: the mismatch metrics
include that deliberate gap (mismatch/sampler_top_p is logged beside them to say so).

Shapes: R rows, S positions; per-token tensors hold values on completion labels (mask 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RATIO_BAND = (0.5, 2.0)
"""mismatch/ratio_outside_fraction counts tokens whose pi_old / pi_sampler leaves this band."""

SUM_KEYS = ("tokens", "abs_diff", "k3", "above", "ratio", "outside", "tis_weight",
            "tis_truncated", "sequences", "masked_sequences")
"""The additive partials of `mismatch_partials` (summed over ranks)."""
MAX_KEYS = ("abs_diff_max", "ratio_max", "neg_ratio_min")
"""The partials reduced by maximum (the minimum travels negated)."""


@dataclass(frozen=True, slots=True)
class Correction:
    """The importance-sampling correction of the GRPO loss (grpo.* fields; None = off)."""

    tis_cap: float | None = None
    seq_low: float | None = None
    seq_high: float | None = None

    @property
    def enabled(self) -> bool:
        return self.tis_cap is not None or self.seq_low is not None


def log_ratio(old_logp_RS: torch.Tensor, sampler_logp_RS: torch.Tensor,
              mask_RS: torch.Tensor) -> torch.Tensor:
    """d = log pi_old - log pi_sampler on completion labels, 0 elsewhere (float64)."""
    active = mask_RS != 0
    d = old_logp_RS.double() - sampler_logp_RS.double()
    return torch.where(active, d, torch.zeros((), dtype=torch.float64))


def correction_weights(old_logp_RS: torch.Tensor, sampler_logp_RS: torch.Tensor,
                       mask_RS: torch.Tensor, correction: Correction
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's TIS factor [R, S] (float32, 1 where off or masked) and whether each row
    is kept [R] (bool; a row without completion tokens is kept)."""
    active = mask_RS != 0
    d = log_ratio(old_logp_RS, sampler_logp_RS, mask_RS)
    factor = torch.ones_like(d)
    if correction.tis_cap is not None:
        factor = torch.where(active, d.exp().clamp(max=correction.tis_cap), factor)
    keep = torch.ones(d.shape[0], dtype=torch.bool)
    if correction.seq_low is not None and correction.seq_high is not None:
        tokens = active.sum(dim=1)
        geo = (d.sum(dim=1) / tokens.clamp(min=1)).exp()
        inside = (geo >= correction.seq_low) & (geo <= correction.seq_high)
        keep = inside | (tokens == 0)
    return factor.float(), keep


def mismatch_partials(old_logp_RS: torch.Tensor, sampler_logp_RS: torch.Tensor,
                      mask_RS: torch.Tensor, *, threshold: float,
                      correction: Correction) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's partial sums (float64 [len(SUM_KEYS)]) and maxima (float64
    [len(MAX_KEYS)]) of the mismatch over its rows; reduce them over the ranks that hold
    disjoint rows (sum, max), then `mismatch_metrics`."""
    active = mask_RS != 0
    d = log_ratio(old_logp_RS, sampler_logp_RS, mask_RS)
    ratio = d.exp()
    low, high = RATIO_BAND
    factor, keep = correction_weights(old_logp_RS, sampler_logp_RS, mask_RS, correction)
    has_tokens = active.any(dim=1)
    truncated = ratio > correction.tis_cap if correction.tis_cap is not None \
        else torch.zeros_like(active)

    def total(values: torch.Tensor) -> float:
        return float(torch.where(active, values.double(), 0.0).sum())

    sums = torch.tensor([
        float(active.sum()), total(d.abs()), total(torch.expm1(d) - d),
        total((d.abs() > threshold).double()), total(ratio),
        total(((ratio < low) | (ratio > high)).double()), total(factor),
        total(truncated),
        float(has_tokens.sum()), float((~keep & has_tokens).sum())], dtype=torch.float64)
    maxima = torch.full((len(MAX_KEYS),), -torch.inf, dtype=torch.float64)
    if active.any():
        maxima[:] = torch.stack([d.abs()[active].max(), ratio[active].max(),
                                 -ratio[active].min()])
    return sums, maxima


def no_partials() -> tuple[torch.Tensor, torch.Tensor]:
    """What a rank without rows of its own contributes to the reductions."""
    return (torch.zeros(len(SUM_KEYS), dtype=torch.float64),
            torch.full((len(MAX_KEYS),), -torch.inf, dtype=torch.float64))


def mismatch_metrics(sums: torch.Tensor, maxima: torch.Tensor, *, top_p: float,
                     correction: Correction) -> dict[str, float]:
    """The logged metrics from reduced partials (empty when no rank held a token)."""
    s = dict(zip(SUM_KEYS, sums.tolist()))
    m = dict(zip(MAX_KEYS, maxima.tolist()))
    n = s["tokens"]
    if not n:
        return {}
    metrics = {
        "mismatch/logp_abs_diff_mean": s["abs_diff"] / n,
        "mismatch/logp_abs_diff_max": m["abs_diff_max"],
        "mismatch/k3_kl_sampler_trainer": s["k3"] / n,
        "mismatch/above_threshold_fraction": s["above"] / n,
        "mismatch/ratio_mean": s["ratio"] / n,
        "mismatch/ratio_min": -m["neg_ratio_min"],
        "mismatch/ratio_max": m["ratio_max"],
        "mismatch/ratio_outside_fraction": s["outside"] / n,
        "mismatch/sampler_top_p": top_p,
    }
    if correction.tis_cap is not None:
        metrics["correction/tis_weight_mean"] = s["tis_weight"] / n
        metrics["correction/tis_truncated_fraction"] = s["tis_truncated"] / n
    if correction.seq_low is not None:
        metrics["correction/masked_sequence_fraction"] = \
            s["masked_sequences"] / max(s["sequences"], 1.0)
    return metrics
