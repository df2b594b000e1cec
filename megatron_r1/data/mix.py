"""The SFT data mix: several JSONL sources drawn by weight into one deterministic stream.

Layer L1 (torch + transformers). R1's stage-3 SFT mixes ~600k rejection-sampled reasoning
samples with ~200k non-reasoning ones (writing, QA, ...); `data.sources` lists such files with
relative weights. Key decisions:
- Sample k of the run (k counts over all steps, whole global batches) comes from source i
  with probability w_i / sum(w): the draw is u_k < cumulative weight, u_k the k-th uniform of
  `random.Random.random()` (stable across Python versions) in blocks of DRAW_BLOCK seeded by
  (data.seed, k // DRAW_BLOCK). The source of sample k is thus a function of (seed, weights,
  k) only: not of the data-parallel size, the global batch size or where a run stopped.
- Each source is walked in its own permutation (epoch_permutation with the source's name as
  stream); when a source runs out it starts a new epoch in a new order, independently of the
  others, and no sample is skipped. A global batch may therefore repeat a row of a small
  source.
- The sources' train sets are concatenated into one SFTDataset (rows offset per source; only
  indices are concatenated, each source's token store is shared, not copied), so micro-batches
  are cut and padded exactly as for one source (megatron_r1.batching).
- Resuming needs, per source, (epoch, samples consumed in it), plus the stream position k:
  small, identical on every rank, and valid under another DP size.

Shapes: N rows, S = seq_length, G = global_batch_size.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from megatron_r1.batching import MicroBatching
from megatron_r1.config.schema import DataConfig, DataSourceConfig
from megatron_r1.data.sft import (
    BatchSource,
    SFTBatchSource,
    SFTDataset,
    StepBatch,
    check_batch_layout,
    concat_datasets,
    epoch_permutation,
    sft_datasets,
    step_batch,
)

DRAW_BLOCK = 4096
"""Uniform draws per seeded block: one Random per block, so reaching sample k costs at most
one block of draws (no replay of the whole run on resume)."""


@dataclass(frozen=True)
class MixSource:
    """One tokenized source of the mix."""

    name: str
    weight: float
    train: SFTDataset
    eval: SFTDataset | None
    """Held-out samples (its eval_path or a data.eval_fraction of its file), or None."""


def mix_sources(data: DataConfig, tokenizer: PreTrainedTokenizerBase, *,
                cache_dir: str | os.PathLike[str] | None = None) -> list[MixSource]:
    """Read, template and tokenize each of data.sources (train and held-out splits), into
    token stores in `cache_dir` (megatron_r1.data.sft.sft_datasets; None: in memory).

    Raises:
        ValueError: naming `data.sources[i]` and its file for a source whose every example
            is too long, besides the reader's file:line errors.
    """
    sources = []
    for i, entry in enumerate(data.sources):
        try:
            train_set, eval_set = sft_datasets(_single_source(data, entry), tokenizer,
                                               seed=data.seed, cache_dir=cache_dir)
        except ValueError as err:
            files = [str(Path(p)) for p in (entry.path, entry.eval_path) if p]
            if str(err).startswith(tuple(files)):  # a reader's error names its file already
                raise
            raise ValueError(f"data.sources[{i}] ({entry.path}): {err}") from None
        sources.append(MixSource(entry.name, entry.weight, train_set, eval_set))
    return sources


def _single_source(data: DataConfig, entry: DataSourceConfig) -> DataConfig:
    """The one-file data config of a source: its path, its held-out file, or the mix's
    eval_fraction of its lines (held out under data.seed, as for data.path)."""
    return dataclasses.replace(
        data, sources=(), path=entry.path, eval_path=entry.eval_path,
        eval_fraction=0.0 if entry.eval_path else data.eval_fraction)


def source_draws(weights: Sequence[float], seed: int, start: int, count: int) -> list[int]:
    """The source index of samples start .. start + count - 1 of the stream.

    Args:
        weights: Relative weights (> 0), one per source.
        seed: data.seed.
        start: Stream position of the first sample.
        count: Samples to draw.
    """
    cumulative = list(itertools.accumulate(weights))
    total, last = cumulative[-1], len(cumulative) - 1
    draws: list[int] = []
    position = start
    while len(draws) < count:
        block, offset = divmod(position, DRAW_BLOCK)
        rng = random.Random(f"sft-mix:{seed}:{block}")
        uniforms = [rng.random() for _ in range(DRAW_BLOCK)]
        for u in uniforms[offset:offset + count - len(draws)]:
            # u * total < cumulative[i] for the first such i; min() guards u * total rounding
            # up to total itself.
            draws.append(min(bisect.bisect_right(cumulative, u * total), last))
        position = start + len(draws)
    return draws


class _SourceCursor:
    """Where one source is in its own sequence of epochs."""

    def __init__(self, name: str, num_samples: int, seed: int) -> None:
        self.name, self.num_samples, self.seed = name, num_samples, seed
        self.epoch = self.epoch_consumed = self.consumed = 0
        self._order: tuple[int, list[int]] | None = None

    def take(self) -> int:
        """The next row of this source (0-based), starting a new epoch after its last."""
        if self.epoch_consumed == self.num_samples:
            self.epoch, self.epoch_consumed = self.epoch + 1, 0
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, epoch_permutation(self.num_samples, self.seed,
                                                         self.epoch, f"sft-mix:{self.name}"))
        row = self._order[1][self.epoch_consumed]
        self.epoch_consumed += 1
        self.consumed += 1
        return row


class MixedBatchSource:
    """Deterministic, resumable per-step batches of one data-parallel rank, drawn from
    several sources by weight (the module docstring has the rules)."""

    def __init__(self, sources: Sequence[MixSource], *, global_batch_size: int,
                 micro_batching: MicroBatching, dp_rank: int, dp_size: int, seed: int) -> None:
        """Args:
            sources: The tokenized sources, names unique.
            global_batch_size: G, samples per optimizer step over all ranks.
            micro_batching: B or a token budget, packing, and the length multiple.
            dp_rank: This rank's data-parallel index in [0, dp_size).
            dp_size: D, the data-parallel size.
            seed: data.seed (the draws and every source's order).

        Raises:
            ValueError: for a bad rank, G not a multiple of B x D, or no sources.
        """
        check_batch_layout(global_batch_size, micro_batching, dp_rank, dp_size)
        if not sources:
            raise ValueError("data.sources: no sources to mix")
        self.sources = list(sources)
        self.global_batch_size = global_batch_size
        self.micro_batching = micro_batching
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.dataset = concat_datasets([s.train for s in self.sources])
        self._offsets = list(itertools.accumulate([len(s.train) for s in self.sources],
                                                  initial=0))
        self._cursors = [_SourceCursor(s.name, len(s.train), seed) for s in self.sources]
        self._consumed = 0

    def next_step(self) -> StepBatch:
        """This rank's micro-batches for the next optimizer step; advances the state."""
        draws = source_draws([s.weight for s in self.sources], self.seed, self._consumed,
                             self.global_batch_size)
        index_G = torch.tensor([self._offsets[i] + self._cursors[i].take() for i in draws],
                               dtype=torch.int64)
        self._consumed += self.global_batch_size
        batch = step_batch(self.dataset, index_G, micro_batching=self.micro_batching,
                           dp_rank=self.dp_rank, dp_size=self.dp_size,
                           epoch=max(c.epoch for c in self._cursors))
        return dataclasses.replace(
            batch, source_samples={s.name: draws.count(i) for i, s in enumerate(self.sources)},
            source_consumed={c.name: c.consumed for c in self._cursors})

    def state_dict(self) -> dict[str, Any]:
        """The position in the stream; the same on every rank and for any DP size.

        Returns:
            `consumed_samples` (the stream position k), `seed`, and under `sources` per name:
            `epoch`, `epoch_consumed_samples`, `consumed_samples` (all epochs), and
            `num_samples` and `weight` (checked on load).
        """
        return {"consumed_samples": self._consumed, "seed": self.seed,
                "sources": {c.name: {"epoch": c.epoch, "epoch_consumed_samples": c.epoch_consumed,
                                     "consumed_samples": c.consumed,
                                     "num_samples": c.num_samples, "weight": s.weight}
                            for s, c in zip(self.sources, self._cursors)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`, possibly saved under another DP size.

        Raises:
            ValueError: for a single-source state, a different seed, set of source names,
                source size or weight (the stream could not continue), or a bad position.
        """
        if "sources" not in state:
            raise ValueError("data state: saved by a single-source run (data.path or the "
                             "arithmetic task); this run mixes data.sources, which cannot "
                             "continue it")
        if state.get("seed") != self.seed:
            raise ValueError(f"data state: saved seed={state.get('seed')} differs from this "
                             f"run's data.seed={self.seed}; the mix could not continue")
        saved = state["sources"]
        names = [c.name for c in self._cursors]
        if sorted(saved) != sorted(names):
            raise ValueError(f"data state: saved sources {sorted(saved)} differ from this run's "
                             f"data.sources {sorted(names)}")
        for source, cursor in zip(self.sources, self._cursors):
            entry = saved[cursor.name]
            for key, mine in (("num_samples", cursor.num_samples), ("weight", source.weight)):
                if entry[key] != mine:
                    raise ValueError(
                        f"data state: source {cursor.name!r} saved {key}={entry[key]}, this run "
                        f"has {key}={mine}; the mix could not continue")
            if not 0 <= entry["epoch_consumed_samples"] <= cursor.num_samples:
                raise ValueError(
                    f"data state: source {cursor.name!r} epoch_consumed_samples="
                    f"{entry['epoch_consumed_samples']} is outside 0..{cursor.num_samples}")
        for cursor in self._cursors:
            entry = saved[cursor.name]
            cursor.epoch = entry["epoch"]
            cursor.epoch_consumed = entry["epoch_consumed_samples"]
            cursor.consumed = entry["consumed_samples"]
        self._consumed = state["consumed_samples"]


def prepare_sft_data(data: DataConfig, tokenizer: PreTrainedTokenizerBase,
                     cache_dir: str | os.PathLike[str]) -> None:
    """Find or build in `cache_dir` every token store that `data` reads, checking every
    record on the way: one rank does this while the others wait, then they all open the
    stores (sft_batch_source) without reading a source file.

    Raises:
        ValueError: as sft_batch_source.
    """
    if data.sources:
        mix_sources(data, tokenizer, cache_dir=cache_dir)
    else:
        sft_datasets(data, tokenizer, seed=data.seed, cache_dir=cache_dir)


def sft_batch_source(data: DataConfig, tokenizer: PreTrainedTokenizerBase, *,
                     global_batch_size: int, micro_batching: MicroBatching, dp_rank: int,
                     dp_size: int, cache_dir: str | os.PathLike[str] | None = None
                     ) -> tuple[BatchSource, dict[str, SFTDataset]]:
    """The training stream and the held-out sets that `data` describes.

    Args:
        cache_dir: Where the token stores are built once and memory-mapped after
            (megatron_r1.data.token_store); None tokenizes into memory.

    Returns:
        (batches, held-out sets): a MixedBatchSource and {source name: eval set} (sources
        without one left out) for data.sources; else an SFTBatchSource and {"": eval set}
        ({} without one).
    """
    if data.sources:
        sources = mix_sources(data, tokenizer, cache_dir=cache_dir)
        mixed = MixedBatchSource(sources, global_batch_size=global_batch_size,
                                 micro_batching=micro_batching, dp_rank=dp_rank,
                                 dp_size=dp_size, seed=data.seed)
        return mixed, {s.name: s.eval for s in sources if s.eval is not None}
    train_set, eval_set = sft_datasets(data, tokenizer, seed=data.seed, cache_dir=cache_dir)
    single = SFTBatchSource(train_set, global_batch_size=global_batch_size,
                            micro_batching=micro_batching, dp_rank=dp_rank, dp_size=dp_size,
                            seed=data.seed)
    return single, ({} if eval_set is None else {"": eval_set})
