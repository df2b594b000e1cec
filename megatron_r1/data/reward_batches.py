"""Reward-model samples and per-step batches in which a pair never splits.

Layer L1 (torch + a tokenizer). Each example becomes `reward_input_ids` sequences (one per
response: a pair's chosen at row 2i and rejected at row 2i + 1); steps take whole examples in
a seeded per-epoch order (SFT's permutation, so the same two numbers resume it under any DP
size) and megatron's micro-batch layout over the rows: a micro-batch of B examples holds rows
[c0, r0, c1, r1, ...], so a pair's two sequences always share a micro-batch and the loss
function pairs them by position. Token budgets and packing would reorder rows; they are
refused by the stage.

Shapes: N sequences, S = seq_length, E examples, G examples per step, B per micro-batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from megatron_r1.batching import (
    MicroBatching,
    MicroBatchPlan,
    build_microbatch,
    padding_fraction,
    plan_microbatches,
)
from megatron_r1.data.preference import LabelledResponse, PreferencePair, reward_input_ids
from megatron_r1.data.sft import epoch_permutation

log = logging.getLogger(__name__)

MicroBatch = dict[str, torch.Tensor]
"""`tokens`, `position_ids` int64 [b, L]; `rows`, `lengths` int64 [b]; `label` float32 [b]
(b = B, or 2B rows for pairs: chosen and rejected alternating)."""


@dataclass(frozen=True)
class RewardDataset:
    """Tokenized reward-model examples."""

    tokens_NS: torch.Tensor
    """int64 [N, S]: `reward_input_ids` of each response, padded with the pad id."""
    length_N: torch.Tensor
    """int64 [N]: ids of each sequence; its score is read at position length - 1."""
    label_N: torch.Tensor
    """float32 [N]: the label (pointwise); pairs: 1 for chosen, 0 for rejected."""
    rows_per_example: int
    """2 for pairs, 1 for labelled responses."""

    def __len__(self) -> int:
        return self.tokens_NS.shape[0] // self.rows_per_example

    def rows(self, examples: Sequence[int]) -> list[int]:
        """The sequence rows of `examples`, each example's rows together, in order."""
        k = self.rows_per_example
        return [e * k + j for e in examples for j in range(k)]

    def batch(self, plan: MicroBatchPlan) -> MicroBatch:
        """The micro-batch of the plan's rows, padded to its length."""
        batch = build_microbatch(plan, self.length_N, per_token={"tokens": self.tokens_NS})
        batch["label"] = self.label_N[batch["rows"]]
        return batch


def tokenize_rewards(examples: Sequence[PreferencePair] | Sequence[LabelledResponse],
                     tokenizer: PreTrainedTokenizerBase, seq_length: int) -> RewardDataset:
    """Every response of `examples` as `reward_input_ids(..., max_length=seq_length)`.

    Raises:
        ValueError: for no examples (and as reward_input_ids).
    """
    if not examples:
        raise ValueError("no reward-model examples to tokenize")
    pairwise = isinstance(examples[0], PreferencePair)
    sequences: list[tuple[str, str, float]] = []
    for e in examples:
        if isinstance(e, PreferencePair):
            sequences += [(e.prompt, e.chosen, 1.0), (e.prompt, e.rejected, 0.0)]
        else:
            sequences.append((e.prompt, e.response, float(e.label)))
    ids = [reward_input_ids(tokenizer, prompt, response, seq_length)
           for prompt, response, _ in sequences]
    cut = sum(len(i) == seq_length for i in ids)
    if cut:
        log.warning("%d of %d reward-model sequences fill data.seq_length=%d (longer ones are "
                    "cut from the prompt's start)", cut, len(ids), seq_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return RewardDataset(
        tokens_NS=torch.tensor([i + [pad] * (seq_length - len(i)) for i in ids],
                               dtype=torch.int64),
        length_N=torch.tensor([len(i) for i in ids], dtype=torch.int64),
        label_N=torch.tensor([label for _, _, label in sequences], dtype=torch.float32),
        rows_per_example=2 if pairwise else 1)


def _row_batching(dataset: RewardDataset, how: MicroBatching) -> MicroBatching:
    """Micro-batches of `how.micro_batch_size` examples: that many times the rows."""
    if how.max_tokens is not None or how.pack:
        raise ValueError("train.max_tokens_per_microbatch and train.pack_sequences: not "
                         "supported by the reward-model stage (a pair's two sequences must "
                         "share a micro-batch)")
    return dataclasses.replace(how, micro_batch_size=how.micro_batch_size
                               * dataset.rows_per_example)


def _plans(dataset: RewardDataset, examples: Sequence[int], how: MicroBatching,
           dp_size: int) -> tuple[list[list[MicroBatchPlan]], dict[int, int]]:
    rows = dataset.rows(examples)
    lengths = dataset.length_N[rows].tolist()
    return (plan_microbatches(rows, lengths, dp_size, _row_batching(dataset, how)),
            dict(zip(rows, lengths)))


def eval_microbatches(dataset: RewardDataset, how: MicroBatching, dp_rank: int,
                      dp_size: int) -> list[MicroBatch]:
    """This rank's share of the whole eval set in fixed order (whole rounds of B x D
    examples; the remainder is left out, as SFT's held-out loss does)."""
    per_round = how.micro_batch_size * dp_size
    usable = len(dataset) // per_round * per_round
    if not usable:
        return []
    plans, _ = _plans(dataset, range(usable), how, dp_size)
    return [dataset.batch(plan) for plan in plans[dp_rank]]


@dataclass(frozen=True)
class RewardStep:
    """What one rank trains on in one optimizer step."""

    micro_batches: list[MicroBatch]
    epoch: int
    padding_fraction: float
    """Share of the step's computed positions (all ranks) that are padding."""
    global_positions: int
    """Positions of the step's sequences over all ranks, padding excluded."""


class RewardBatchSource:
    """Deterministic, resumable per-step batches of whole examples for one data-parallel rank.

    A step takes the next G examples of the epoch's permutation (the last E mod G examples of
    an epoch are skipped); micro-batch m of rank r holds examples [m B D + r B, m B D + (r + 1)
    B) of the step (megatron's layout), so the global batch does not depend on D.
    """

    def __init__(self, dataset: RewardDataset, *, global_batch_size: int,
                 micro_batching: MicroBatching, dp_rank: int, dp_size: int, seed: int) -> None:
        """Raises:
            ValueError: for G not a positive multiple of B x D, G > E, or a token budget."""
        per_round = micro_batching.micro_batch_size * dp_size
        if global_batch_size < 1 or global_batch_size % per_round:
            raise ValueError(
                f"train.global_batch_size={global_batch_size}: must be a positive multiple of "
                f"train.micro_batch_size x data-parallel size = "
                f"{micro_batching.micro_batch_size} x {dp_size}")
        if global_batch_size > len(dataset):
            raise ValueError(f"train.global_batch_size={global_batch_size}: larger than the "
                             f"{len(dataset)} examples of the data set")
        _row_batching(dataset, micro_batching)  # refuses budgets and packing now
        self.dataset, self.micro_batching = dataset, micro_batching
        self.global_batch_size, self.dp_rank, self.dp_size = global_batch_size, dp_rank, dp_size
        self.seed = seed
        self._epoch = self._epoch_consumed = self._consumed = 0

    def next_step(self) -> RewardStep:
        """This rank's micro-batches for the next optimizer step; advances the state."""
        if self._epoch_consumed + self.global_batch_size > len(self.dataset):
            self._epoch, self._epoch_consumed = self._epoch + 1, 0
        order = epoch_permutation(len(self.dataset), self.seed, self._epoch)
        examples = order[self._epoch_consumed:self._epoch_consumed + self.global_batch_size]
        plans, lengths = _plans(self.dataset, examples, self.micro_batching, self.dp_size)
        self._epoch_consumed += self.global_batch_size
        self._consumed += self.global_batch_size
        return RewardStep(micro_batches=[self.dataset.batch(p) for p in plans[self.dp_rank]],
                          epoch=self._epoch, padding_fraction=padding_fraction(plans, lengths),
                          global_positions=sum(lengths.values()))

    def state_dict(self) -> dict[str, int]:
        """The position in the example stream (the same on every rank)."""
        return {"epoch": self._epoch, "epoch_consumed_samples": self._epoch_consumed,
                "consumed_samples": self._consumed, "seed": self.seed,
                "num_samples": len(self.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a `state_dict()`, possibly saved under another DP size.

        Raises:
            ValueError: for a missing key, or a state of another seed or data set size.
        """
        for key in ("epoch", "epoch_consumed_samples", "consumed_samples", "seed",
                    "num_samples"):
            if key not in state:
                raise ValueError(f"data state: missing key {key!r} (got {sorted(state)})")
        for key, mine in (("seed", self.seed), ("num_samples", len(self.dataset))):
            if state[key] != mine:
                raise ValueError(f"data state: saved {key}={state[key]} differs from this run's "
                                 f"{key}={mine}; the example order could not continue")
        self._epoch = state["epoch"]
        self._epoch_consumed = state["epoch_consumed_samples"]
        self._consumed = state["consumed_samples"]
