"""SFT data: (prompt, completion) examples, tokenized samples, per-step batches.

Layer L1 (torch + transformers). Key decisions:
- Megatron's input/label convention: a sample holds at most S + 1 ids, `bos prompt completion
  eos`; `tokens = ids[:-1]`, `labels = ids[1:]`, and the loss mask is 1 exactly where the label
  is a completion token or the eos. Prompt and completion are tokenized separately, as at
  rollout time (the engine tokenizes the prompt and generates completion ids after it), so the
  mask boundary is exact and SFT sees the ids the policy will see in GRPO.
- A data set is indices into compact token stores (megatron_r1.data.token_store: one flat id
  array with offsets, built once per source and tokenizer, memory-mapped from data.cache_dir
  by every rank); a rank pads only the rows of its own micro-batches, each to the
  micro-batch's longest row, or packs them. Memory per rank follows the batch, not the data
  set: no [N, S] tensor exists anywhere.
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

import itertools
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
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
from megatron_r1.data.jsonl import (
    held_out_rows,
    iter_jsonl_records,
    read_jsonl_records,
)
from megatron_r1.data.template import TemplateName, render_prompt
from megatron_r1.data.token_store import (
    TokenStore,
    cached_store,
    file_identity,
    tokenize_pairs,
)

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


# ----------------------------------------------------------------------------- tokenisation


@dataclass(frozen=True)
class SFTDataset:
    """Samples cut from token stores (megatron_r1.data.token_store): sample i is example
    record_N[i] of stores[store_N[i]]. Nothing is padded until a micro-batch is built, and
    then only that micro-batch's rows (`batch`)."""

    stores: tuple[TokenStore, ...]
    store_N: np.ndarray
    """int32 [N]: the store of each sample."""
    record_N: np.ndarray
    """int64 [N]: each sample's example in its store."""
    length_N: torch.Tensor
    """int64 [N]: positions each sample uses (its ids minus one)."""
    loss_tokens_N: torch.Tensor
    """int64 [N]: loss positions of each sample (completion tokens and the eos)."""
    seq_length: int
    """S: samples use at most S positions (S + 1 ids)."""
    num_dropped: int
    """Examples dropped for being longer than S + 1 tokens."""

    def __len__(self) -> int:
        return len(self.record_N)

    def ids(self, sample: int) -> np.ndarray:
        """int32 [length + 1]: sample i's ids (`bos prompt completion eos`)."""
        return self.stores[int(self.store_N[sample])].ids(int(self.record_N[sample]))

    def batch(self, plan: MicroBatchPlan) -> MicroBatch:
        """The micro-batch of the plan's samples, padded to its length or packed: only these
        rows are read from the stores.

        Padding as in a dense layout of S + 1 ids per sample (`ids pad...`, tokens its first
        S, labels its last S) cut by megatron_r1.batching: the first padded token position
        holds the eos (the last id), the other padded positions of tokens and labels the pad
        id up to S and zeros beyond (a length rounded up past S); the loss mask is 0 there.
        """
        rows = list(plan.rows)
        n_B = self.length_N[rows]
        width = int(n_B.max()) if plan.packed else plan.length
        filled = min(width, self.seq_length)
        tokens = torch.zeros(len(rows), width, dtype=torch.int64)
        labels = torch.zeros(len(rows), width, dtype=torch.int64)
        loss_mask = torch.zeros(len(rows), width, dtype=torch.float32)
        for b, row in enumerate(rows):
            store = self.stores[int(self.store_N[row])]
            record = int(self.record_N[row])
            ids = torch.from_numpy(store.ids(record).astype(np.int64))
            n, start = len(ids) - 1, int(store.loss_start_M[record])
            tokens[b, n:filled] = store.pad_id
            labels[b, n:filled] = store.pad_id
            shown = min(n + 1, filled)  # tokens are ids[:S]: the eos too where it fits
            tokens[b, :shown], labels[b, :n] = ids[:shown], ids[1:]
            loss_mask[b, start:n] = 1.0
        local = MicroBatchPlan(tuple(range(len(rows))), plan.length, plan.packed)
        batch = build_microbatch(local, n_B, per_token={
            "tokens": tokens, "labels": labels, "loss_mask": loss_mask})
        batch["rows"] = torch.tensor(rows, dtype=torch.int64)
        return batch


def cut_dataset(store: TokenStore, records: Sequence[int] | np.ndarray,
                seq_length: int) -> SFTDataset:
    """The data set of a store's `records` (in that order) that fit S + 1 ids.

    Raises:
        ValueError: for no records, a bad seq_length, or when every record is too long.
    """
    if not len(records):
        raise ValueError("no SFT examples to tokenize")
    if seq_length < 1:
        raise ValueError(f"seq_length={seq_length}: must be >= 1")
    record_M = np.asarray(records, dtype=np.int64)
    size_M = store.offsets_M[record_M + 1] - store.offsets_M[record_M]
    fits = size_M <= seq_length + 1
    num_dropped = int((~fits).sum())
    if not fits.any():
        raise ValueError(
            f"all {len(record_M)} examples are longer than seq_length={seq_length} allows "
            f"({seq_length + 1} ids with bos and eos; the shortest needs {int(size_M.min())}): "
            "raise data.seq_length")
    if num_dropped:
        logger.warning("dropped %d of %d SFT examples longer than seq_length + 1 = %d tokens",
                       num_dropped, len(record_M), seq_length + 1)
    record_N = record_M[fits]
    length_N = torch.from_numpy(size_M[fits] - 1)
    start_N = torch.from_numpy(np.asarray(store.loss_start_M[record_N], dtype=np.int64))
    return SFTDataset(stores=(store,), store_N=np.zeros(len(record_N), dtype=np.int32),
                      record_N=record_N, length_N=length_N, loss_tokens_N=length_N - start_N,
                      seq_length=seq_length, num_dropped=num_dropped)


def concat_datasets(datasets: Sequence[SFTDataset]) -> SFTDataset:
    """The samples of every data set, in order (same seq_length), as one data set: indices
    only, the stores are shared."""
    widths = {d.seq_length for d in datasets}
    assert len(widths) == 1, f"data sets of different seq_length {sorted(widths)}"
    first = list(itertools.accumulate([len(d.stores) for d in datasets], initial=0))
    return SFTDataset(stores=tuple(s for d in datasets for s in d.stores),
                      store_N=np.concatenate([d.store_N + k for d, k in zip(datasets, first)]),
                      record_N=np.concatenate([d.record_N for d in datasets]),
                      length_N=torch.cat([d.length_N for d in datasets]),
                      loss_tokens_N=torch.cat([d.loss_tokens_N for d in datasets]),
                      seq_length=widths.pop(), num_dropped=sum(d.num_dropped for d in datasets))


def tokenize_sft(examples: Sequence[SFTExample], tokenizer: PreTrainedTokenizerBase,
                 seq_length: int) -> SFTDataset:
    """Tokenize examples in memory into `bos prompt completion eos` samples (see `cut_dataset`
    for what is dropped; the bos is left out for a tokenizer without one, e.g. Qwen's).

    Raises:
        ValueError: for no examples, a tokenizer without eos, or when every example is too long.
    """
    if not examples:
        raise ValueError("no SFT examples to tokenize")
    store = tokenize_pairs(((e.prompt, e.completion) for e in examples), tokenizer)
    return cut_dataset(store, range(len(store)), seq_length)


def _arithmetic_identity(data: DataConfig, seed: int) -> dict[str, Any]:
    """What decides the arithmetic task's examples (train, then eval)."""
    return {"source": "arithmetic", "seed": seed, "template": data.template,
            **{key: getattr(data, key) for key in (
                "num_train_samples", "num_eval_samples", "arithmetic_min_ops",
                "arithmetic_max_ops", "arithmetic_max_operand", "arithmetic_answer_noise")}}


def _file_pairs(path: str, template: TemplateName) -> Iterator[tuple[str, str]]:
    for r in iter_jsonl_records(path, ("prompt", "completion")):
        yield render_prompt(r["prompt"], template), r["completion"]


def _file_store(path: str, data: DataConfig, tokenizer: PreTrainedTokenizerBase,
                cache_dir: Path | None) -> TokenStore:
    """Every record of a JSONL file, templated and tokenized (cached when cache_dir is set)."""
    if cache_dir is None:
        return tokenize_pairs(_file_pairs(path, data.template), tokenizer)
    return cached_store(cache_dir, Path(path).stem,
                        {"source": "jsonl", **file_identity(path), "template": data.template},
                        lambda: _file_pairs(path, data.template), tokenizer)


def sft_datasets(data: DataConfig, tokenizer: PreTrainedTokenizerBase, *, seed: int,
                 cache_dir: str | os.PathLike[str] | None = None
                 ) -> tuple[SFTDataset, SFTDataset | None]:
    """The train and (if any) eval data sets a data config describes.

    Args:
        data: Source, template and seq_length; a JSONL source's eval split is data.eval_path
            or a data.eval_fraction of data.path's records (none without either).
        tokenizer: See `tokenize_sft`.
        seed: Seed of the generated problems (arithmetic source).
        cache_dir: Where the token stores live (built there on first use, memory-mapped
            after: megatron_r1.data.token_store); None tokenizes into memory.

    Returns:
        (train, eval); eval is None for a source without an eval split.
    """
    cache = None if cache_dir is None else Path(cache_dir)
    seq = data.seq_length
    if data.source == "arithmetic":
        def pairs() -> Iterator[tuple[str, str]]:
            train, held_out = arithmetic_examples(data, seed=seed)
            return ((e.prompt, e.completion) for e in [*train, *held_out])

        store = tokenize_pairs(pairs(), tokenizer) if cache is None else cached_store(
            cache, "arithmetic", _arithmetic_identity(data, seed), pairs, tokenizer)
        n = data.num_train_samples
        return (cut_dataset(store, range(n), seq),
                cut_dataset(store, range(n, len(store)), seq) if len(store) > n else None)
    assert data.path is not None  # DataConfig checks it for source=jsonl
    store = _file_store(data.path, data, tokenizer, cache)
    if data.eval_path:
        held_out = _file_store(data.eval_path, data, tokenizer, cache)
        return (cut_dataset(store, range(len(store)), seq),
                cut_dataset(held_out, range(len(held_out)), seq))
    if not data.eval_fraction:
        return cut_dataset(store, range(len(store)), seq), None
    held = held_out_rows(data, len(store))
    train = np.ones(len(store), dtype=bool)
    train[held] = False
    return cut_dataset(store, np.flatnonzero(train), seq), cut_dataset(store, held, seq)


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
                     global_loss_tokens=int(dataset.loss_tokens_N[index_G].sum()),
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
