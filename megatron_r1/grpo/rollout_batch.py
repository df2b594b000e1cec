"""A rollout as training tensors, its random split into mini-batches, and micro-batch dicts.

Layer L1. Sequence layout is Megatron's (the same as SFT): ids = prompt + completion, model
input `tokens = ids[:-1]`, `labels = ids[1:]`; label position t holds the log-probs of token
t + 1, and `loss_mask` is 1 exactly on labels that are completion tokens (including the
end-of-sequence id the engine sampled). The sampler's log-probs are placed on the same
positions. Rows are padded only to the rollout's longest row (`length_R` says how many
positions each uses); micro-batches then take their own longest row, or pack
(megatron_r1.batching).

The rollout of R = P x G outputs is permuted at random (seeded by the run seed and the rollout
index) and cut into R / global_batch_size mini-batches, one optimizer step each (R1's
schedule); within a mini-batch, megatron_r1.batching plans each rank's micro-batches.

Shapes: R rollout rows, S positions of the longest row, B micro-batch rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megatron_r1.batching import Batch, MicroBatchPlan, build_microbatch
from megatron_r1.grpo.loss import LossAggregation, token_weights
from megatron_r1.grpo.mismatch import Correction, correction_weights
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
    length_R: torch.Tensor
    """Positions each row uses: prompt + completion - 1 (the rest is padding)."""
    prompt_len_R: torch.Tensor
    completion_len_R: torch.Tensor
    prompt_index_R: torch.Tensor
    """Which prompt of the rollout each row answers (rows are grouped by prompt)."""

    def __len__(self) -> int:
        return int(self.tokens_RS.shape[0])


def pack_rollout(prompts: Sequence[Sequence[int]], groups: Sequence[Sequence[Completion]],
                 seq_length: int, pad_id: int) -> RolloutTensors:
    """Lay out every (prompt, completion) pair as one row, group by group, padded to the
    longest row.

    Raises:
        ValueError: if a prompt plus its completion needs more than seq_length + 1 ids (the
            caller sizes max_new_tokens so that this cannot happen).
    """
    pairs = [(p, prompt, c) for p, (prompt, group) in enumerate(zip(prompts, groups))
             for c in group]
    for _, prompt, completion in pairs:
        if len(prompt) + len(completion.token_ids) > seq_length + 1:
            raise ValueError(f"prompt ({len(prompt)} ids) + completion "
                             f"({len(completion.token_ids)} ids) exceed data.seq_length + 1 "
                             f"= {seq_length + 1}")
    width = max((len(prompt) + len(c.token_ids) - 1 for _, prompt, c in pairs), default=1)
    return pack_sequences(
        [torch.tensor([*prompt, *c.token_ids], dtype=torch.int64) for _, prompt, c in pairs],
        [len(prompt) for _, prompt, _ in pairs],
        [torch.tensor(c.logprobs, dtype=torch.float32) for _, _, c in pairs],
        [p for p, _, _ in pairs], width=width, pad_id=pad_id)


def pack_sequences(ids: Sequence[torch.Tensor], prompt_lens: Sequence[int],
                   sampler_logps: Sequence[torch.Tensor], prompt_index: Sequence[int], *,
                   width: int, pad_id: int) -> RolloutTensors:
    """Rows from whole sequences (prompt + completion ids), each with its prompt length, the
    sampler's log-probs of its completion and its prompt's index, padded to `width` positions
    (at least each row's own)."""
    rows = len(ids)
    width = max(width, *(len(x) - 1 for x in ids), 1) if rows else max(width, 1)
    tokens = torch.full((rows, width), pad_id, dtype=torch.int64)
    labels = torch.full((rows, width), pad_id, dtype=torch.int64)
    mask = torch.zeros(rows, width, dtype=torch.float32)
    sampler = torch.zeros(rows, width, dtype=torch.float32)
    length = torch.zeros(rows, dtype=torch.int64)
    prompt_len = torch.tensor(list(prompt_lens), dtype=torch.int64)
    completion_len = torch.tensor([len(x) - p for x, p in zip(ids, prompt_lens)],
                                  dtype=torch.int64)
    for r, (seq, p, logp) in enumerate(zip(ids, prompt_lens, sampler_logps)):
        n = len(seq) - 1
        tokens[r, :n] = seq[:-1]
        labels[r, :n] = seq[1:]
        start, stop = p - 1, len(seq) - 1
        mask[r, start:stop] = 1.0
        sampler[r, start:stop] = logp
        length[r] = max(n, 1)
    return RolloutTensors(tokens_RS=tokens, labels_RS=labels, loss_mask_RS=mask,
                          sampler_logp_RS=sampler, length_R=length, prompt_len_R=prompt_len,
                          completion_len_R=completion_len,
                          prompt_index_R=torch.tensor(list(prompt_index), dtype=torch.int64))


def stored_rollout(columns: Mapping[str, np.ndarray]
                   ) -> tuple[RolloutTensors, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A rollout read back from the experience store (megatron_r1.experience), with its
    advantages [R] and old and reference log-probs [R, S]: what a training step needs."""
    def t(name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(columns[name])).to(dtype)

    prompt_len, completion_len = t("prompt_len", torch.int64), t("completion_len", torch.int64)
    rollout = RolloutTensors(
        tokens_RS=t("tokens", torch.int64), labels_RS=t("labels", torch.int64),
        loss_mask_RS=t("loss_mask", torch.float32),
        sampler_logp_RS=t("sampler_logp", torch.float32),
        length_R=(prompt_len + completion_len - 1).clamp(min=1), prompt_len_R=prompt_len,
        completion_len_R=completion_len, prompt_index_R=t("prompt_index", torch.int64))
    return (rollout, t("advantage", torch.float32), t("old_logp", torch.float32),
            t("ref_logp", torch.float32))


def minibatch_order(rows: int, global_batch_size: int, *, seed: int,
                    rollout_index: int) -> list[torch.Tensor]:
    """The rollout's rows in random order, cut into mini-batches of global_batch_size."""
    if rows % global_batch_size:
        raise ValueError(f"rollout of {rows} rows is not a multiple of train.global_batch_size="
                         f"{global_batch_size}")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rollout_index)
    return list(torch.randperm(rows, generator=generator).split(global_batch_size))


def score_microbatch(rollout: RolloutTensors, plan: MicroBatchPlan,
                     routing_RSLK: torch.Tensor | None = None) -> Batch:
    """A scoring micro-batch (log-probs only) of the plan's rows; with `routing_RSLK` (MoE
    expert ids to replay, [R, S, moe_layers, top_k]) also their ids as `routing`."""
    return build_microbatch(plan, rollout.length_R, per_token={
        "tokens": rollout.tokens_RS, "labels": rollout.labels_RS,
        "loss_mask": rollout.loss_mask_RS, "sampler_logp": rollout.sampler_logp_RS,
        **_routing(routing_RSLK)})


def _routing(routing_RSLK: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {} if routing_RSLK is None else {"routing": routing_RSLK}


@dataclass(frozen=True)
class TrainInputs:
    """What a training micro-batch adds to a scoring one, for every row of the rollout."""

    advantages_R: torch.Tensor
    old_logp_RS: torch.Tensor
    ref_logp_RS: torch.Tensor
    weights_RS: torch.Tensor
    """Each token's weight in the loss aggregation (grpo/loss.py)."""
    counts_R: torch.Tensor
    """Each row's share of the aggregation's denominator."""
    routing_RSLK: torch.Tensor | None = None
    """MoE expert ids the training passes replay (grpo.routing_replay), or None."""


def train_inputs(rollout: RolloutTensors, advantages_R: torch.Tensor, old_logp_RS: torch.Tensor,
                 ref_logp_RS: torch.Tensor, aggregation: LossAggregation,
                 max_new_tokens: int, correction: Correction | None = None,
                 routing_RSLK: torch.Tensor | None = None) -> TrainInputs:
    """The per-row training tensors, with the loss aggregation's weights and counts; an
    enabled importance-sampling `correction` (grpo/mismatch.py) multiplies the weights by each
    token's TIS factor and zeroes the masked rows' weights (their counts stay)."""
    weights, counts = token_weights(rollout.loss_mask_RS, aggregation, max_new_tokens)
    if correction is not None and correction.enabled:
        factor_RS, keep_R = correction_weights(old_logp_RS, rollout.sampler_logp_RS,
                                               rollout.loss_mask_RS, correction)
        weights = weights * factor_RS * keep_R.unsqueeze(1).to(weights.dtype)
    return TrainInputs(advantages_R=advantages_R, old_logp_RS=old_logp_RS,
                       ref_logp_RS=ref_logp_RS, weights_RS=weights, counts_R=counts,
                       routing_RSLK=routing_RSLK)


def train_microbatch(rollout: RolloutTensors, plan: MicroBatchPlan, inputs: TrainInputs) -> Batch:
    """A training micro-batch: the scoring tensors plus advantages (broadcast over each row's
    positions), old/reference log-probs, the aggregation's `weights` and the rows' `count`."""
    batch = build_microbatch(
        plan, rollout.length_R,
        per_token={"tokens": rollout.tokens_RS, "labels": rollout.labels_RS,
                   "loss_mask": rollout.loss_mask_RS, "sampler_logp": rollout.sampler_logp_RS,
                   "old_logp": inputs.old_logp_RS, "ref_logp": inputs.ref_logp_RS,
                   "weights": inputs.weights_RS, **_routing(inputs.routing_RSLK)},
        per_row={"advantages": inputs.advantages_R})
    batch["count"] = inputs.counts_R[batch["rows"]].sum()
    return batch
