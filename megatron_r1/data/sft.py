"""SFT data: (prompt, completion) examples, fixed-length Megatron samples, per-step batches.

Layer L1 (torch + transformers). Key decisions:
- Megatron's input/label convention: a sample holds S + 1 ids, `bos prompt completion eos pad...`;
  `tokens = ids[:-1]`, `labels = ids[1:]`, and the loss mask is 1 exactly where the label is a
  completion token or the eos. Prompt and completion are tokenized separately, as at rollout
  time (the engine tokenizes the prompt and generates completion ids after it), so the mask
  boundary is exact and SFT sees the ids the policy will see in GRPO.
- The batch order is a function of (seed, epoch, position in the epoch) only. A step's global
  batch is the next `global_batch_size` samples of the epoch's permutation whatever the
  data-parallel size; megatron_r1.batching deals them to ranks and micro-batches (megatron's
  slices, or a token budget), each micro-batch padded only to its own longest sample or
  packed. Resuming needs two numbers (epoch, samples consumed in it), identical on every rank
  and valid under another DP size.
- The permutation is a Fisher-Yates shuffle driven by `random.Random.random()`, whose output
  Python guarantees across versions, so a resume after an upgrade sees the same order.

Shapes: N samples in a data set, S = seq_length, B = micro_batch_size, G = global_batch_size.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from megatron_r1.batching import (
    MicroBatching,
    MicroBatchPlan,
    build_microbatch,
    padding_fraction,
    plan_microbatches,
)
from megatron_r1.config.schema import DataConfig
from megatron_r1.data.arithmetic import (
    VALUE_RANGE_FACTOR,
    Problem,
    arithmetic_splits,
    write_solution,
    wrong_answer,
)
from megatron_r1.data.jsonl import jsonl_splits, read_jsonl_records
from megatron_r1.data.template import render_prompt

logger = logging.getLogger(__name__)

MicroBatch = dict[str, torch.Tensor]
"""`tokens`, `labels`, `position_ids` int64 [B, L]; `loss_mask` float32 [B, L]; `rows` and
`lengths` int64 [B] (samples of the data set and the positions each uses); packed: [1, T]
plus `cu_seqlens` and `max_seqlen` (megatron_r1.batching)."""


@dataclass(frozen=True, slots=True)
class SFTExample:
    """One supervised example: the full prompt text and the completion to learn."""

    prompt: str
    completion: str


# ----------------------------------------------------------------------------- examples


def read_jsonl(path: str | Path) -> list[SFTExample]:
    """`{"prompt": str, "completion": str}` examples of a JSONL file (prompts as written, no
    template applied); errors as read_jsonl_records."""
    return [SFTExample(prompt=r["prompt"], completion=r["completion"])
            for r in read_jsonl_records(path, ("prompt", "completion"))]


def arithmetic_examples(data: DataConfig, *,
                        seed: int) -> tuple[list[SFTExample], list[SFTExample]]:
    """Solver-written train and eval examples of the arithmetic task.

    Args:
        data: Uses the sample counts, the arithmetic_* ranges and the template.
        seed: Seed of the problem stream.

    Returns:
        (train, eval): prompts rendered with data.template, completions from the solver.
    """
    splits = arithmetic_splits(data, seed=seed)
    noise = random.Random(f"answer-noise:{seed}")
    max_value = VALUE_RANGE_FACTOR * data.arithmetic_max_operand

    def example(problem: Problem, noisy: bool = False) -> SFTExample:
        answer = wrong_answer(problem, noise, max_value) if noisy else None
        return SFTExample(prompt=render_prompt(problem.question, data.template),
                          completion=write_solution(problem, answer))

    train = [example(p, noise.random() < data.arithmetic_answer_noise) for p in splits.train]
    return train, [example(p) for p in splits.eval]


def sft_examples(data: DataConfig, *, seed: int) -> tuple[list[SFTExample], list[SFTExample]]:
    """The (train, eval) examples data.source names; a JSONL source's eval split is
    data.eval_path or a data.eval_fraction of data.path (none without either).

    Args:
        data: The data config.
        seed: Seed of the generated problems (arithmetic source).

    Returns:
        (train, eval) with data.template applied to every prompt.
    """
    if data.source == "arithmetic":
        return arithmetic_examples(data, seed=seed)
    train, held_out = jsonl_splits(data, read_jsonl)

    def templated(examples: list[SFTExample]) -> list[SFTExample]:
        return [SFTExample(render_prompt(e.prompt, data.template), e.completion)
                for e in examples]

    return templated(train), templated(held_out)


# ----------------------------------------------------------------------------- tokenisation


@dataclass(frozen=True)
class SFTDataset:
    """Tokenized examples as fixed-length Megatron samples."""

    tokens_NS: torch.Tensor
    """int64 [N, S]: model input, ids[:-1]."""
    labels_NS: torch.Tensor
    """int64 [N, S]: next token, ids[1:] (pad where masked)."""
    loss_mask_NS: torch.Tensor
    """float32 [N, S]: 1 where the label is a completion token or eos."""
    length_N: torch.Tensor
    """int64 [N]: positions each sample uses (its ids minus one); the rest is padding."""
    num_dropped: int
    """Examples dropped for being longer than S + 1 tokens."""

    def __len__(self) -> int:
        return self.tokens_NS.shape[0]

    @property
    def seq_length(self) -> int:
        return self.tokens_NS.shape[1]

    def batch(self, plan: MicroBatchPlan) -> MicroBatch:
        """The micro-batch of the plan's samples, padded to its length or packed."""
        return build_microbatch(plan, self.length_N, per_token={
            "tokens": self.tokens_NS, "labels": self.labels_NS, "loss_mask": self.loss_mask_NS})


def tokenize_sft(examples: Sequence[SFTExample], tokenizer: PreTrainedTokenizerBase,
                 seq_length: int) -> SFTDataset:
    """Tokenize examples into `bos prompt completion eos` samples, padded to S + 1 ids.

    The bos is left out for a tokenizer without one (e.g. Qwen's); the pad token is eos for a
    tokenizer without one (padding is never in the loss).

    Args:
        examples: The examples, prompts already templated.
        tokenizer: A tokenizer with an eos token.
        seq_length: S, the model's sequence length.

    Returns:
        The data set, without the examples that need more than S + 1 ids (counted in
        `num_dropped` and logged).

    Raises:
        ValueError: for no examples, a tokenizer without eos, or when every example is too long.
    """
    if not examples:
        raise ValueError("no SFT examples to tokenize")
    if seq_length < 1:
        raise ValueError(f"seq_length={seq_length}: must be >= 1")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token; SFT needs one "
                         "to end completions")
    head = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    completions = tokenizer([e.completion for e in examples], add_special_tokens=False)[
        "input_ids"]

    rows, masks, lengths, shortest = [], [], [], None
    for prompt_ids, completion_ids in zip(prompts, completions):
        ids = head + prompt_ids + completion_ids + [eos]
        if len(ids) > seq_length + 1:
            shortest = len(ids) if shortest is None else min(shortest, len(ids))
            continue
        lengths.append(len(ids) - 1)
        # Label j is ids[j + 1]: the first completion id is the label at position start - 1.
        start = max(len(head) + len(prompt_ids) - 1, 0)
        rows.append(ids + [pad] * (seq_length + 1 - len(ids)))
        masks.append([0.0] * start + [1.0] * (len(ids) - 1 - start)
                     + [0.0] * (seq_length + 1 - len(ids)))
    num_dropped = len(examples) - len(rows)
    if not rows:
        raise ValueError(
            f"all {len(examples)} examples are longer than seq_length={seq_length} allows "
            f"({seq_length + 1} ids with bos and eos; the shortest needs {shortest}): raise "
            "data.seq_length")
    if num_dropped:
        logger.warning("dropped %d of %d SFT examples longer than seq_length + 1 = %d tokens",
                       num_dropped, len(examples), seq_length + 1)
    ids_NL = torch.tensor(rows, dtype=torch.int64)  # L = S + 1
    return SFTDataset(tokens_NS=ids_NL[:, :-1].contiguous(), labels_NS=ids_NL[:, 1:].contiguous(),
                      loss_mask_NS=torch.tensor(masks, dtype=torch.float32),
                      length_N=torch.tensor(lengths, dtype=torch.int64), num_dropped=num_dropped)


def sft_datasets(data: DataConfig, tokenizer: PreTrainedTokenizerBase, *,
                 seed: int) -> tuple[SFTDataset, SFTDataset | None]:
    """The train and (if any) eval data sets a data config describes.

    Args:
        data: Source, template and seq_length.
        tokenizer: See `tokenize_sft`.
        seed: Seed of the generated problems (arithmetic source).

    Returns:
        (train, eval); eval is None for a source without an eval split.
    """
    train, evaluation = sft_examples(data, seed=seed)
    eval_set = tokenize_sft(evaluation, tokenizer, data.seq_length) if evaluation else None
    return tokenize_sft(train, tokenizer, data.seq_length), eval_set


# ----------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class StepBatch:
    """What one rank trains on in one optimizer step."""

    micro_batches: list[MicroBatch]
    """This rank's micro-batches, in order (see `MicroBatch`)."""
    global_loss_tokens: int
    """Sum of the loss mask over the whole global batch (every micro-batch of every
    data-parallel rank): the loss denominator, known without a collective."""
    epoch: int
    """Epoch the step's samples come from."""
    padding_fraction: float
    """Share of the step's computed positions (all ranks) that are padding."""
    global_positions: int
    """Positions of the step's samples over all ranks, padding excluded."""
    source_samples: dict[str, int] = field(default_factory=dict)
    """A data.sources mix: samples of the step's global batch drawn from each source."""
    source_consumed: dict[str, int] = field(default_factory=dict)
    """A data.sources mix: samples drawn from each source since the run began, this step's
    included."""


class BatchSource(Protocol):
    """A resumable stream of per-step batches (one source, or a data.sources mix)."""

    def next_step(self) -> StepBatch:
        """This rank's micro-batches for the next optimizer step; advances the state."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The position in the stream, the same on every rank and for any DP size."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`, possibly saved under another DP size."""
        ...


def check_batch_layout(global_batch_size: int, micro_batching: MicroBatching, dp_rank: int,
                       dp_size: int) -> None:
    """Raise a ValueError for a bad rank or G not a multiple of B x D."""
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank}, dp_size={dp_size}: need 0 <= dp_rank < dp_size")
    micro_batch_size = micro_batching.micro_batch_size
    if micro_batch_size < 1:
        raise ValueError(f"train.micro_batch_size={micro_batch_size}: must be >= 1")
    per_round = micro_batch_size * dp_size
    if global_batch_size < 1 or global_batch_size % per_round != 0:
        raise ValueError(
            f"train.global_batch_size={global_batch_size}: must be a positive multiple of "
            f"train.micro_batch_size x data-parallel size = {micro_batch_size} x {dp_size}")


def step_batch(dataset: SFTDataset, index_G: torch.Tensor, *, micro_batching: MicroBatching,
               dp_rank: int, dp_size: int, epoch: int) -> StepBatch:
    """Rank dp_rank's share of the global batch `index_G` (int64 [G], rows of `dataset`),
    dealt by megatron_r1.batching; rows may repeat."""
    lengths_G = dataset.length_N[index_G].tolist()
    plans = plan_microbatches(index_G.tolist(), lengths_G, dp_size, micro_batching)
    lengths = dict(zip(index_G.tolist(), lengths_G))
    return StepBatch(micro_batches=[dataset.batch(plan) for plan in plans[dp_rank]],
                     global_loss_tokens=int(dataset.loss_mask_NS[index_G].sum().item()),
                     epoch=epoch, padding_fraction=padding_fraction(plans, lengths),
                     global_positions=sum(dataset.length_N[index_G].tolist()))


def epoch_permutation(num_samples: int, seed: int, epoch: int,
                      stream: str = "sft-order") -> list[int]:
    """The sample order of one epoch: a permutation of range(num_samples).

    A Fisher-Yates shuffle driven by `random.Random.random()` (stable across Python versions),
    seeded by a string naming (stream, seed, epoch); a data.sources mix gives each source its
    own stream.
    """
    rng = random.Random(f"{stream}:{seed}:{epoch}")
    order = list(range(num_samples))
    for i in range(num_samples - 1, 0, -1):
        j = min(int(rng.random() * (i + 1)), i)
        order[i], order[j] = order[j], order[i]
    return order


class SFTBatchSource:
    """Deterministic, resumable per-step batches of one data-parallel rank.

    Each epoch is a fresh permutation of the data set; a step takes the next G samples of it
    (the last N mod G samples of an epoch are skipped, as Megatron's random sampler does).
    Micro-batch m of rank r holds global positions [m B D + r B, m B D + (r + 1) B) of the step
    (D = dp_size), Megatron's layout, so the global batch does not depend on D.
    """

    def __init__(self, dataset: SFTDataset, *, global_batch_size: int,
                 micro_batching: MicroBatching, dp_rank: int, dp_size: int, seed: int) -> None:
        """Args:
            dataset: The tokenized samples.
            global_batch_size: G, samples per optimizer step over all ranks.
            micro_batching: B (samples per forward/backward on one rank) or a token budget,
                packing, and the length multiple.
            dp_rank: This rank's data-parallel index in [0, dp_size).
            dp_size: D, the data-parallel size.
            seed: Seed of the sample order (the same on every rank).

        Raises:
            ValueError: for a bad rank, G not a multiple of B x D, or G > N.
        """
        check_batch_layout(global_batch_size, micro_batching, dp_rank, dp_size)
        if global_batch_size > len(dataset):
            raise ValueError(f"train.global_batch_size={global_batch_size}: larger than the "
                             f"{len(dataset)} samples of the data set")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batching = micro_batching
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self._epoch = 0
        self._epoch_consumed = 0
        self._consumed = 0
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, permutation [N])

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            order = epoch_permutation(len(self.dataset), self.seed, epoch)
            self._order = (epoch, torch.tensor(order, dtype=torch.int64))
        return self._order[1]

    def next_step(self) -> StepBatch:
        """This rank's micro-batches for the next optimizer step; advances the state."""
        if self._epoch_consumed + self.global_batch_size > len(self.dataset):
            self._epoch += 1
            self._epoch_consumed = 0
        start = self._epoch_consumed
        index_G = self._permutation(self._epoch)[start:start + self.global_batch_size]
        self._epoch_consumed += self.global_batch_size
        self._consumed += self.global_batch_size
        return step_batch(self.dataset, index_G, micro_batching=self.micro_batching,
                          dp_rank=self.dp_rank, dp_size=self.dp_size, epoch=self._epoch)

    def __iter__(self) -> Iterator[StepBatch]:
        while True:
            yield self.next_step()

    def state_dict(self) -> dict[str, int]:
        """The position in the sample stream; the same on every rank and for any DP size.

        Returns:
            `epoch`, `epoch_consumed_samples` (samples of that epoch already trained on),
            `consumed_samples` (total, for logging), and `seed` and `num_samples` (checked on
            load: a different order or data set cannot continue the same stream).
        """
        return {"epoch": self._epoch, "epoch_consumed_samples": self._epoch_consumed,
                "consumed_samples": self._consumed, "seed": self.seed,
                "num_samples": len(self.dataset)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`, possibly saved under another DP size.

        Raises:
            ValueError: for a missing key, or a state from another seed or data set size.
        """
        if "sources" in state:
            raise ValueError("data state: saved by a data.sources mix of "
                             f"{sorted(state['sources'])}; this run reads one source (data.path "
                             "or the arithmetic task), which cannot continue it")
        for key in ("epoch", "epoch_consumed_samples", "consumed_samples", "seed",
                    "num_samples"):
            if key not in state:
                raise ValueError(f"data state: missing key {key!r} (got {sorted(state)})")
        for key, mine in (("seed", self.seed), ("num_samples", len(self.dataset))):
            if state[key] != mine:
                raise ValueError(
                    f"data state: saved {key}={state[key]} differs from this run's {key}={mine}; "
                    "the sample order could not continue")
        if not 0 <= state["epoch_consumed_samples"] <= len(self.dataset):
            raise ValueError(f"data state: epoch_consumed_samples={state['epoch_consumed_samples']}"
                             f" is outside 0..{len(self.dataset)}")
        self._epoch = state["epoch"]
        self._epoch_consumed = state["epoch_consumed_samples"]
        self._consumed = state["consumed_samples"]
