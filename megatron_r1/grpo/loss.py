"""From per-token GRPO losses to the number megatron backpropagates.

Layer L1. megatron's per-token-loss contract is a micro-batch returning (loss_sum, count);
the step's loss is sum over all micro-batches and data-parallel ranks of loss_sum divided by
the sum of count (megatron sums the counts and scales the gradients: the denominator is
global). Each aggregation mode is a choice of per-token weight and count:

- token_mean (DAPO):               weight = mask,          count = valid tokens
- seq_mean_token_mean (R1):        weight = mask / T_i,    count = sequences
- seq_mean_token_sum_norm (Dr. GRPO): weight = mask / L_max, count = sequences

so loss = sum_{i,t} weight_it * loss_it / sum count, exactly the formula of each mode over
the whole step. Weights and counts belong to rows (a row's count is 1, its tokens, or 0 for an
empty row), so they follow the rows into any micro-batch, padded or packed. The weights are also the upstream gradient of each token's loss, which the
fused kernel uses to write the logits' gradient during the forward (grad_scale).

Shapes: B sequences of a micro-batch, S positions.
"""

from __future__ import annotations

from typing import Literal

import torch

LossAggregation = Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"]


def token_weights(loss_mask_BS: torch.Tensor, aggregation: LossAggregation,
                  max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights [B, S] and each row's share of the count ([B], int64): a
    micro-batch's count is the sum over its rows.

    Args:
        loss_mask_BS: 1 on completion tokens, 0 on prompt and padding.
        aggregation: the mode (see the module docstring).
        max_length: L_max of seq_mean_token_sum_norm (the longest allowed completion).
    """
    mask = loss_mask_BS.to(torch.float32)
    lengths_B = mask.sum(dim=1)
    has_tokens_B = (lengths_B > 0).to(torch.int64)
    if aggregation == "token_mean":
        return mask, lengths_B.to(torch.int64)
    if aggregation == "seq_mean_token_mean":
        weights = mask / lengths_B.clamp(min=1).unsqueeze(1)
    elif aggregation == "seq_mean_token_sum_norm":
        weights = mask / float(max_length)
    else:
        raise ValueError(f"grpo.loss_aggregation={aggregation!r} is not a known mode")
    return weights, has_tokens_B
