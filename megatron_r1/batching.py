"""How a step's rows become every data-parallel rank's micro-batches, and their tensors.

Layer L1. SFT and GRPO share it; two decisions, one function each:

- `plan_microbatches`: which rows go to which data-parallel rank and micro-batch, and the
  length each micro-batch is padded to. Without a token budget it is megatron's layout:
  micro-batch m of rank r holds positions [m*B*D + r*B, m*B*D + (r+1)*B) of the global batch
  (B rows per micro-batch, D ranks), so the global batch (and the loss and its gradient) do
  not depend on D. With a token budget the rows are dealt longest first to the rank with the
  fewest tokens so far (every rank gets the same number of rows), then binned first-fit
  decreasing so that each micro-batch costs at most the budget (rows x padded length, or its
  packed tokens); every rank ends with the same number of micro-batches, since pipeline
  schedules and expert-parallel all-to-alls pair micro-batches up across ranks.
  Either way a micro-batch is padded only to its own longest row, rounded up to a multiple of
  the sequence-parallel degree, unless the layout needs one shape for the whole step
  (`uniform`, megatron's allgather token dispatcher).
- `build_microbatch`: a micro-batch's tensors from row-major sources: padded [B, L], or
  packed into one row [1, T] (sequences back to back, positions restarting at 0, and
  `cu_seqlens`/`max_seqlen`: megatron's packed-sequence `thd` layout), with one padding
  sequence at the end to reach the multiple. The loss denominators are untouched by either:
  each row carries its own weights and its share of the count.

Shapes: N source rows, S source width, G rows of a step, B rows of a micro-batch, L its
padded length, T packed positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True, slots=True)
class MicroBatching:
    """How a stage cuts a step into micro-batches (train.* settings plus the layout)."""

    micro_batch_size: int
    """Rows per micro-batch when there is no token budget."""
    max_tokens: int | None = None
    """Token budget per micro-batch (train.max_tokens_per_microbatch), or None."""
    pack: bool = False
    """Pack each micro-batch's rows into one row (train.pack_sequences)."""
    multiple_of: int = 1
    """Padded lengths are multiples of this (the sequence-parallel degree)."""
    uniform: bool = False
    """One shape [micro_batch_size, longest row of the step] for every micro-batch."""

    def __post_init__(self) -> None:
        if self.uniform and (self.pack or self.max_tokens):
            raise ValueError("uniform micro-batch shapes exclude packing and token budgets")


@dataclass(frozen=True, slots=True)
class MicroBatchPlan:
    """One micro-batch: its source rows and the length it is padded to."""

    rows: tuple[int, ...]
    """Source row indices, in micro-batch order."""
    length: int
    """Padded positions per row, or (packed) positions of the single packed row."""
    packed: bool = False

    @property
    def positions(self) -> int:
        """Positions the model computes for this micro-batch, padding included."""
        return self.length if self.packed else self.length * len(self.rows)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _cost(lengths: Sequence[int], how: MicroBatching) -> int:
    if how.pack:
        return _round_up(sum(lengths), how.multiple_of)
    return len(lengths) * _round_up(max(lengths), how.multiple_of)


def rank_microbatches(index_G: Sequence[int], micro_batch_size: int, dp_rank: int,
                      dp_size: int) -> list[list[int]]:
    """megatron's slices: this rank's micro-batches of a global batch, as lists of the values
    of `index_G`.

    Raises:
        ValueError: if the global batch is not a multiple of B x D.
    """
    per_round = micro_batch_size * dp_size
    if len(index_G) % per_round:
        raise ValueError(f"global batch of {len(index_G)} is not a multiple of "
                         f"micro_batch_size x data-parallel size = {micro_batch_size} x {dp_size}")
    b = micro_batch_size
    return [list(index_G[m * per_round + dp_rank * b:m * per_round + (dp_rank + 1) * b])
            for m in range(len(index_G) // per_round)]


def _deal_to_ranks(order: list[int], lengths: Mapping[int, int], dp_size: int) -> list[list[int]]:
    """Rows (longest first) to the rank with the fewest tokens that still has room; every
    rank ends with len(order) / dp_size rows."""
    per_rank = len(order) // dp_size
    ranks: list[list[int]] = [[] for _ in range(dp_size)]
    load = [0] * dp_size
    for row in order:
        rank = min((r for r in range(dp_size) if len(ranks[r]) < per_rank),
                   key=lambda r: (load[r], r))
        ranks[rank].append(row)
        load[rank] += lengths[row]
    return ranks


def _bin_rows(rows: list[int], lengths: Mapping[int, int], how: MicroBatching) -> list[list[int]]:
    """First-fit decreasing: rows (longest first) into bins costing at most the budget."""
    assert how.max_tokens is not None
    bins: list[list[int]] = []
    totals: list[int] = []  # positions of each bin's rows
    for row in rows:
        n = lengths[row]
        if _cost([n], how) > how.max_tokens:
            raise ValueError(f"a row of {n} positions ({_cost([n], how)} after rounding to a "
                             f"multiple of {how.multiple_of}) exceeds "
                             f"train.max_tokens_per_microbatch={how.max_tokens}")
        for i, members in enumerate(bins):
            # rows arrive longest first, so a bin's first row is its longest
            cost = (_round_up(totals[i] + n, how.multiple_of) if how.pack else
                    (len(members) + 1) * _round_up(lengths[members[0]], how.multiple_of))
            if cost <= how.max_tokens:
                members.append(row)
                totals[i] += n
                break
        else:
            bins.append([row])
            totals.append(n)
    return bins


def _split_to(bins: list[list[int]], count: int) -> list[list[int]]:
    """Split the bins with the most rows in two until there are `count` bins (possible:
    every rank holds at least `count` rows)."""
    bins = [list(b) for b in bins]
    while len(bins) < count:
        widest = max(range(len(bins)), key=lambda i: (len(bins[i]), -i))
        members = bins.pop(widest)
        half = len(members) // 2
        bins[widest:widest] = [members[:half], members[half:]]
    return bins


def plan_microbatches(index_G: Sequence[int], lengths_G: Sequence[int], dp_size: int,
                      how: MicroBatching, *,
                      uniform_length: int | None = None) -> list[list[MicroBatchPlan]]:
    """Every data-parallel rank's micro-batches of one step (the same number on each rank).

    Args:
        index_G: the step's source rows (any order: without a budget it is megatron's order).
        lengths_G: positions each row needs (>= 1), aligned with index_G.
        dp_size: data-parallel ranks.
        how: the micro-batching settings.
        uniform_length: with how.uniform, the length every micro-batch takes (default: the
            step's longest row); GRPO passes the rollout's longest, since one scoring pass
            runs the micro-batches of every mini-batch.

    Raises:
        ValueError: for a step that does not split evenly over the ranks, or a row longer
            than the token budget.
    """
    rows, lengths = [int(i) for i in index_G], [int(n) for n in lengths_G]
    if len(rows) != len(lengths):
        raise ValueError(f"{len(rows)} rows but {len(lengths)} lengths")
    if min(lengths, default=1) < 1:
        raise ValueError("every row needs at least one position")
    length_of = dict(zip(rows, lengths))
    if how.max_tokens is None:
        per_rank = [rank_microbatches(rows, how.micro_batch_size, r, dp_size)
                    for r in range(dp_size)]
    else:
        if len(rows) % dp_size:
            raise ValueError(f"a step of {len(rows)} rows does not split over {dp_size} "
                             "data-parallel ranks")
        order = sorted(rows, key=lambda r: (-length_of[r], r))
        per_rank = [_bin_rows(mine, length_of, how)
                    for mine in _deal_to_ranks(order, length_of, dp_size)]
        count = max(len(bins) for bins in per_rank)
        per_rank = [_split_to(bins, count) for bins in per_rank]
    step_longest = _round_up(max(lengths) if uniform_length is None else uniform_length,
                             how.multiple_of)

    def plan(members: list[int]) -> MicroBatchPlan:
        if how.uniform:
            return MicroBatchPlan(tuple(members), step_longest)
        mine = [length_of[r] for r in members]
        if how.pack:
            return MicroBatchPlan(tuple(members), _round_up(sum(mine), how.multiple_of), True)
        return MicroBatchPlan(tuple(members), _round_up(max(mine), how.multiple_of))

    return [[plan(members) for members in bins] for bins in per_rank]


def padding_fraction(plans: Sequence[Sequence[MicroBatchPlan]],
                     lengths: Mapping[int, int]) -> float:
    """Share of the computed positions that are padding, over every rank's micro-batches."""
    computed = sum(p.positions for rank in plans for p in rank)
    used = sum(lengths[r] for rank in plans for p in rank for r in p.rows)
    return 1.0 - used / computed if computed else 0.0


def _take(source: torch.Tensor, rows: torch.Tensor, length: int) -> torch.Tensor:
    """source[rows, :length] ([B, L, ...]), zero-padded where the source is narrower."""
    taken = source[rows, :length]
    if taken.shape[1] < length:
        filler = taken.new_zeros((taken.shape[0], length - taken.shape[1], *taken.shape[2:]))
        taken = torch.cat([taken, filler], dim=1)
    return taken


def build_microbatch(plan: MicroBatchPlan, lengths_N: torch.Tensor, *,
                     per_token: Mapping[str, torch.Tensor],
                     per_row: Mapping[str, torch.Tensor] | None = None) -> Batch:
    """The tensors of one micro-batch (on the sources' device).

    Args:
        plan: its rows and padded length.
        lengths_N: positions each source row uses; beyond them every per-token value must be
            a valid filler (masked out of every loss).
        per_token: [N, S, ...] sources, taken as [B, L, ...] (or packed [1, T, ...]).
        per_row: [N] sources, broadcast over each row's positions (e.g. advantages).

    Returns:
        `per_token` and `per_row` keys as [B, L] (packed: [1, T]), `position_ids`, and
        `rows` / `lengths` [B] (int64); packed also `cu_seqlens` (int32 [B + 1], or [B + 2]
        with the trailing padding sequence) and `max_seqlen` (0-d int64).
    """
    rows_B = torch.tensor(plan.rows, dtype=torch.int64)
    n_B = lengths_N[rows_B].to(torch.int64)
    width = int(n_B.max()) if plan.packed else plan.length
    batch = {k: _take(v, rows_B, width) for k, v in per_token.items()}
    for key, value in (per_row or {}).items():
        batch[key] = value[rows_B].unsqueeze(1).expand(-1, width).contiguous()
    batch["position_ids"] = torch.arange(width).repeat(len(plan.rows), 1)
    if plan.packed:
        batch = _pack(batch, n_B, plan.length)
    batch["rows"], batch["lengths"] = rows_B, n_B
    return batch


def _pack(batch: Batch, n_B: torch.Tensor, total: int) -> Batch:
    """[B, L] rows -> one [1, T] row of their first n_b positions, back to back; the tail up
    to `total` is one padding sequence (positions restarting at 0, masked everywhere)."""
    width = batch["position_ids"].shape[1]
    valid_BL = torch.arange(width).unsqueeze(0) < n_B.unsqueeze(1)
    used = int(n_B.sum())
    tail = total - used
    if tail < 0:
        raise ValueError(f"packed length {total} < the rows' {used} positions")
    packed = {}
    for key, value in batch.items():
        flat = value[valid_BL]
        filler = torch.arange(tail, dtype=flat.dtype) if key == "position_ids" \
            else flat.new_zeros((tail, *flat.shape[1:]))
        packed[key] = torch.cat([flat, filler]).unsqueeze(0)
    seqlens = [*n_B.tolist(), *([tail] if tail else [])]
    cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seqlens, dtype=torch.int32).cumsum(0)
    packed["cu_seqlens"] = cu
    packed["max_seqlen"] = torch.tensor(max(seqlens), dtype=torch.int64)
    return packed


def split_rows(values: torch.Tensor, batch: Batch) -> list[torch.Tensor]:
    """Each row's first `lengths[b]` positions of a per-token output of `batch` (padded
    [B, L] or packed [1, T]), in row order."""
    lengths = batch["lengths"].tolist()
    if "cu_seqlens" in batch:
        starts = batch["cu_seqlens"].tolist()
        flat = values.reshape(-1, *values.shape[2:])
        return [flat[s:s + n] for s, n in zip(starts, lengths)]
    return [values[b, :n] for b, n in enumerate(lengths)]
