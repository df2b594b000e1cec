"""Loss aggregation: each mode equals its formula over the whole step, whatever the split
into micro-batches (megatron sums loss_sum and count over micro-batches and ranks)."""

import pytest
import torch

from megatron_r1.grpo.loss import token_weights


def step_loss(token_loss_BS, mask_BS, mode, splits, max_length=8):
    """What megatron computes: sum of loss_sum over micro-batches / sum of counts."""
    total, count = 0.0, 0
    for rows in splits:
        w, c = token_weights(mask_BS[rows], mode, max_length)
        total += float((token_loss_BS[rows] * w).sum())
        count += int(c.sum())
    return total / count


@pytest.fixture
def batch():
    torch.manual_seed(0)
    mask = torch.zeros(4, 8)
    for i, (start, stop) in enumerate([(1, 4), (2, 8), (0, 1), (3, 5)]):
        mask[i, start:stop] = 1
    return torch.randn(4, 8) * mask, mask


def test_seq_mean_token_mean_is_r1(batch):
    loss, mask = batch
    want = float(((loss * mask).sum(1) / mask.sum(1)).mean())
    for splits in ([[0, 1, 2, 3]], [[0], [1, 2], [3]]):
        assert step_loss(loss, mask, "seq_mean_token_mean", splits) == pytest.approx(want)


def test_token_mean_is_dapo(batch):
    loss, mask = batch
    want = float((loss * mask).sum() / mask.sum())
    for splits in ([[0, 1, 2, 3]], [[0, 3], [1, 2]]):
        assert step_loss(loss, mask, "token_mean", splits) == pytest.approx(want)


def test_seq_mean_token_sum_norm_is_dr_grpo(batch):
    loss, mask = batch
    want = float(((loss * mask).sum(1) / 8).mean())
    assert step_loss(loss, mask, "seq_mean_token_sum_norm", [[0, 1], [2, 3]]) == pytest.approx(want)


def test_empty_sequences_count_for_nothing():
    mask = torch.zeros(2, 4)
    mask[0, :2] = 1
    weights, counts = token_weights(mask, "seq_mean_token_mean", 4)
    assert counts.tolist() == [1, 0] and float(weights[1].sum()) == 0.0
    assert token_weights(mask, "token_mean", 4)[1].tolist() == [2, 0]


def test_unknown_mode_names_the_key():
    with pytest.raises(ValueError, match=r"grpo\.loss_aggregation='sum'"):
        token_weights(torch.ones(1, 2), "sum", 2)  # type: ignore[arg-type]
