"""A rollout as training tensors, its random split into mini-batches, and micro-batch dicts.

Layer L1. Sequence layout is Megatron's (the same as SFT): ids = prompt + completion, model
input `tokens = ids[:-1]`, `labels = ids[1:]`, padded to S; label position t holds the
log-probs of token t + 1, and `loss_mask` is 1 exactly on labels that are completion tokens
(including the end-of-sequence id the engine sampled). The sampler's log-probs are placed on
the same positions.

The rollout of R = P x G outputs is permuted at random (seeded by the run seed and the rollout
index) and cut into R / global_batch_size mini-batches, one optimizer step each (R1's
schedule); within a mini-batch, ranks take Megatron's slices (megatron_r1.batching).

Shapes: R rollout rows, S positions, B micro-batch rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_r1.grpo.loss import LossAggregation, token_weights
from megatron_r1.rollout.types import Completion


@dataclass(frozen=True)
class RolloutTensors:
    tokens_RS: torch.Tensor
    """int64: model input ids (prompt, completion, padding)."""
    labels_RS: torch.Tensor
    """int64: the next id at every position (padding where masked)."""
    loss_mask_RS: torch.Tensor
    """float32: 1 on completion labels."""
    sampler_logp_RS: torch.Tensor
    """float32: the engine's log-prob of each completion label (0 elsewhere)."""
    prompt_len_R: torch.Tensor
    completion_len_R: torch.Tensor
    prompt_index_R: torch.Tensor
    """Which prompt of the rollout each row answers (rows are grouped by prompt)."""

    def __len__(self) -> int:
        return int(self.tokens_RS.shape[0])


def pack_rollout(prompts: Sequence[Sequence[int]], groups: Sequence[Sequence[Completion]],
                 seq_length: int, pad_id: int) -> RolloutTensors:
    """Lay out every (prompt, completion) pair as one row, group by group.

    Raises:
        ValueError: if a prompt plus its completion needs more than seq_length + 1 ids (the
            caller sizes max_new_tokens so that this cannot happen).
    """
    rows = sum(len(g) for g in groups)
    tokens = torch.full((rows, seq_length), pad_id, dtype=torch.int64)
    labels = torch.full((rows, seq_length), pad_id, dtype=torch.int64)
    mask = torch.zeros(rows, seq_length, dtype=torch.float32)
    sampler = torch.zeros(rows, seq_length, dtype=torch.float32)
    prompt_len = torch.zeros(rows, dtype=torch.int64)
    completion_len = torch.zeros(rows, dtype=torch.int64)
    prompt_index = torch.zeros(rows, dtype=torch.int64)
    r = 0
    for p, (prompt, group) in enumerate(zip(prompts, groups)):
        for completion in group:
            ids = [*prompt, *completion.token_ids]
            if len(ids) > seq_length + 1:
                raise ValueError(f"prompt ({len(prompt)} ids) + completion "
                                 f"({len(completion.token_ids)} ids) exceed data.seq_length + 1 "
                                 f"= {seq_length + 1}")
            n = len(ids) - 1
            tokens[r, :n] = torch.tensor(ids[:-1])
            labels[r, :n] = torch.tensor(ids[1:])
            start, stop = len(prompt) - 1, len(prompt) - 1 + len(completion.token_ids)
            mask[r, start:stop] = 1.0
            sampler[r, start:stop] = torch.tensor(completion.logprobs, dtype=torch.float32)
            prompt_len[r], completion_len[r], prompt_index[r] = (len(prompt),
                                                                 len(completion.token_ids), p)
            r += 1
    return RolloutTensors(tokens_RS=tokens, labels_RS=labels, loss_mask_RS=mask,
                          sampler_logp_RS=sampler, prompt_len_R=prompt_len,
                          completion_len_R=completion_len, prompt_index_R=prompt_index)


def minibatch_order(rows: int, global_batch_size: int, *, seed: int,
                    rollout_index: int) -> list[torch.Tensor]:
    """The rollout's rows in random order, cut into mini-batches of global_batch_size."""
    if rows % global_batch_size:
        raise ValueError(f"rollout of {rows} rows is not a multiple of train.global_batch_size="
                         f"{global_batch_size}")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rollout_index)
    return list(torch.randperm(rows, generator=generator).split(global_batch_size))


def microbatch(rollout: RolloutTensors, index_B: torch.Tensor, *,
               advantages_R: torch.Tensor | None = None,
               old_logp_RS: torch.Tensor | None = None, ref_logp_RS: torch.Tensor | None = None,
               aggregation: LossAggregation = "seq_mean_token_mean",
               max_new_tokens: int = 1) -> dict[str, torch.Tensor]:
    """The tensors of rows `index_B` a forward step needs ([B, S] each, plus `count`).

    Without advantages this is a scoring micro-batch (log-probs only); with them, a training
    one, whose `weights` and `count` implement the loss aggregation (grpo/loss.py).
    """
    seq = rollout.tokens_RS.shape[1]
    batch = {
        "tokens": rollout.tokens_RS[index_B],
        "labels": rollout.labels_RS[index_B],
        "loss_mask": rollout.loss_mask_RS[index_B],
        "position_ids": torch.arange(seq).repeat(index_B.numel(), 1),
        "sampler_logp": rollout.sampler_logp_RS[index_B],
        "rows": index_B,
    }
    if advantages_R is not None:
        assert old_logp_RS is not None and ref_logp_RS is not None
        weights, count = token_weights(batch["loss_mask"], aggregation, max_new_tokens)
        batch.update(
            advantages=advantages_R[index_B].unsqueeze(1).expand(-1, seq).contiguous(),
            old_logp=old_logp_RS[index_B], ref_logp=ref_logp_RS[index_B],
            weights=weights, count=count)
    return batch
