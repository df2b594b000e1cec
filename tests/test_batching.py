"""Micro-batch planning and building: megatron's slices without a budget, token-budget bins
with balanced ranks, each micro-batch padded only to its own longest row or packed, and the
inverse (per-row outputs back out of either layout)."""

import random

import pytest
import torch

from megatron_r1.batching import (
    MicroBatching,
    MicroBatchPlan,
    build_microbatch,
    padding_fraction,
    plan_microbatches,
    rank_microbatches,
    split_rows,
)


def r1_like_lengths(n, seed=0, longest=4096):
    """Long-tailed lengths as R1's responses: most short, a few near the limit."""
    rng = random.Random(seed)
    return [min(longest, max(1, int(rng.lognormvariate(6.0, 1.0)))) for _ in range(n)]


def test_without_a_budget_the_rows_are_megatrons_slices_trimmed_to_their_longest():
    lengths = [5, 9, 3, 3, 7, 1, 2, 8]
    plans = plan_microbatches(range(8), lengths, 2, MicroBatching(micro_batch_size=2))
    for rank in range(2):
        assert [list(p.rows) for p in plans[rank]] == rank_microbatches(range(8), 2, rank, 2)
    assert [p.length for p in plans[0]] == [9, 7]  # rows (0, 1) and (4, 5)
    assert [p.length for p in plans[1]] == [3, 8]  # rows (2, 3) and (6, 7)
    # a sequence-parallel multiple rounds each up; uniform shapes take the step's longest
    assert [p.length for p in plan_microbatches(range(8), lengths, 2,
                                                MicroBatching(2, multiple_of=4))[1]] == [4, 8]
    uniform = plan_microbatches(range(8), lengths, 2, MicroBatching(2, multiple_of=2,
                                                                    uniform=True))
    assert {p.length for rank in uniform for p in rank} == {10}
    wider = plan_microbatches(range(8), lengths, 2, MicroBatching(2, multiple_of=2, uniform=True),
                              uniform_length=13)  # e.g. the whole rollout's longest row
    assert {p.length for rank in wider for p in rank} == {14}


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("dp", [1, 2, 4])
def test_a_token_budget_bins_every_row_once_within_budget_with_equal_counts(pack, dp):
    lengths = r1_like_lengths(64)
    rows = list(range(100, 164))  # row ids are values, not positions
    how = MicroBatching(micro_batch_size=1, max_tokens=4096, pack=pack, multiple_of=2)
    plans = plan_microbatches(rows, lengths, dp, how)
    length_of = dict(zip(rows, lengths))
    assert sorted(r for rank in plans for p in rank for r in p.rows) == rows
    assert len({len(rank) for rank in plans}) == 1  # every rank: the same number of micro-batches
    assert len({sum(len(p.rows) for p in rank) for rank in plans}) == 1  # and of rows
    for rank in plans:
        for p in rank:
            assert p.positions <= how.max_tokens and p.packed == pack and p.length % 2 == 0
            need = sum(length_of[r] for r in p.rows) if pack else max(length_of[r] for r in p.rows)
            assert need <= p.length < need + 2
    loads = [sum(length_of[r] for p in rank for r in p.rows) for rank in plans]
    assert max(loads) - min(loads) <= max(lengths)  # dealt longest first to the lightest rank
    assert plans == plan_microbatches(rows, lengths, dp, how)  # deterministic


def test_budget_and_packing_cut_padding_on_a_long_tailed_step():
    lengths = r1_like_lengths(512, seed=1, longest=8192)
    length_of = dict(enumerate(lengths))

    def padding(how):
        return padding_fraction(plan_microbatches(range(512), lengths, 8, how), length_of)

    fixed_full = sum(lengths) / (512 * 8192)  # the old layout: every row padded to seq_length
    fixed = padding(MicroBatching(micro_batch_size=4))
    budget = padding(MicroBatching(1, max_tokens=8192))
    packed = padding(MicroBatching(1, max_tokens=8192, pack=True))
    assert 1 - fixed_full > 0.9  # ~93% of such a step is padding when padded to seq_length
    assert fixed < 1 - fixed_full and budget < fixed / 2 and packed == 0.0


def test_a_row_longer_than_the_budget_is_named():
    with pytest.raises(ValueError, match=r"a row of 9 positions .* train.max_tokens_per_microbatch=8"):
        plan_microbatches(range(2), [9, 1], 1, MicroBatching(1, max_tokens=8))
    with pytest.raises(ValueError, match="packing and token budgets"):
        MicroBatching(1, max_tokens=8, uniform=True)


@pytest.mark.parametrize("packed", [False, True])
def test_split_rows_returns_each_rows_positions(packed):
    lengths = torch.tensor([3, 1, 4])
    values = torch.arange(1, 13, dtype=torch.float32).view(3, 4) * (torch.arange(4) < lengths[:, None])
    plan = MicroBatchPlan((2, 0, 1), length=10 if packed else 4, packed=packed)
    batch = build_microbatch(plan, lengths, per_token={"v": values})
    assert batch["v"].shape == ((1, 10) if packed else (3, 4))
    rows = split_rows(batch["v"], batch)
    for row, got in zip(plan.rows, rows):
        assert torch.equal(got, values[row, :lengths[row]])


@pytest.mark.parametrize("packed", [False, True])
def test_per_token_values_with_trailing_dims_follow_their_rows(packed):
    """A per-token source with trailing dims (MoE routing ids [N, S, layers, top_k]) is taken,
    padded and packed like the rest, and split back per row."""
    lengths = torch.tensor([3, 1, 4])
    ids = torch.randint(1, 9, (3, 4, 2, 2), dtype=torch.int16)
    plan = MicroBatchPlan((2, 0, 1), length=10 if packed else 6, packed=packed)
    batch = build_microbatch(plan, lengths, per_token={"routing": ids})
    assert batch["routing"].shape == ((1, 10, 2, 2) if packed else (3, 6, 2, 2))
    assert batch["routing"].dtype == torch.int16
    for row, got in zip(plan.rows, split_rows(batch["routing"], batch)):
        assert torch.equal(got, ids[row, :lengths[row]])
    if not packed:  # padded beyond the source's width with zeros
        assert not batch["routing"][:, 4:].any()
