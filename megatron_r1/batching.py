"""How a step's global batch is split over data-parallel ranks and micro-batches.

Layer L1. Megatron's layout: micro-batch m of data-parallel rank r holds the global batch's
positions [m*B*D + r*B, m*B*D + (r+1)*B), with B the micro-batch size and D the DP size, so
the global batch (and therefore the loss and its gradient) does not depend on D.
"""

from __future__ import annotations

import torch


def rank_microbatches(index_G: torch.Tensor, micro_batch_size: int, dp_rank: int,
                      dp_size: int) -> list[torch.Tensor]:
    """This rank's micro-batches of a global batch, as index tensors [B] into `index_G`'s
    values.

    Raises:
        ValueError: if the global batch is not a multiple of B x D.
    """
    per_round = micro_batch_size * dp_size
    if index_G.numel() % per_round:
        raise ValueError(f"global batch of {index_G.numel()} is not a multiple of "
                         f"micro_batch_size x data-parallel size = {micro_batch_size} x {dp_size}")
    b = micro_batch_size
    return [index_G[m * per_round + dp_rank * b:m * per_round + (dp_rank + 1) * b]
            for m in range(index_G.numel() // per_round)]
