"""Reward-model objectives against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_r1.reward.preference_loss import (
    auc,
    average_ranks,
    bradley_terry_loss,
    pointwise_loss,
)


def test_bradley_terry_matches_hand_values():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    loss_sum, count, metrics = bradley_terry_loss(chosen, rejected)
    # d = 1, 0, -2: -log sigmoid(d) = log(1 + e^-d)
    want = math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.exp(2))
    assert float(loss_sum) == pytest.approx(want, rel=1e-6)  # fp32 roundoff: 6e-8 relative
    assert int(count) == 3 and count.dtype == torch.int
    assert metrics["loss"].tolist() == pytest.approx([want, 3.0], rel=1e-6)
    assert metrics["accuracy"].tolist() == [1.0, 3.0]  # the tie (d = 0) counts as wrong
    assert metrics["margin"].tolist() == [-1.0, 3.0]


def test_bradley_terry_is_exact_for_large_margins():
    loss_sum, _, _ = bradley_terry_loss(torch.tensor([0.0, 200.0]), torch.tensor([200.0, 0.0]))
    # log(1 + e^200) = 200 + log(1 + e^-200); e^-200 underflows to exactly 0 in the second pair
    assert float(loss_sum) == pytest.approx(200.0, rel=1e-6)


def test_bradley_terry_gradient_is_sigmoid_of_minus_the_margin():
    chosen = torch.tensor([0.5], requires_grad=True)
    loss_sum, _, _ = bradley_terry_loss(chosen, torch.tensor([0.0]))
    loss_sum.backward()
    assert float(chosen.grad) == pytest.approx(-1 / (1 + math.exp(0.5)), rel=1e-6)


def test_pointwise_bce_matches_hand_values():
    score, label = torch.tensor([0.0, 2.0, -1.0, 3.0]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    loss_sum, count, metrics = pointwise_loss(score, label)
    # label 1: -log sigmoid(s) = log(1 + e^-s); label 0: -log(1 - sigmoid(s)) = log(1 + e^s)
    want = (math.log(2) + math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))
            + math.log(1 + math.exp(3)))
    assert float(loss_sum) == pytest.approx(want, rel=1e-6)
    assert int(count) == 4
    # score 0 with label 1 is wrong (positive means score > 0); -1 with 0 right; 3 with 0 wrong
    assert metrics["accuracy"].tolist() == [2.0, 4.0]


def test_average_ranks_share_ties():
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


@pytest.mark.parametrize(("scores", "labels", "want"), [
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),   # the classic example: 3 of 4 pairs ordered
    ([1.0, 2.0, 3.0], [0, 1, 1], 1.0),
    ([3.0, 2.0, 1.0], [0, 1, 1], 0.0),
    ([1.0, 1.0, 1.0, 1.0], [0, 1, 0, 1], 0.5),   # all tied: each pair counts one half
    ([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1], 0.875),  # pos {0.5, 0.9} vs neg {0.5, 0.2}: 3.5 / 4
])
def test_auc_matches_hand_values(scores, labels, want):
    assert auc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(want, abs=1e-12)


def test_auc_without_both_classes_is_nan():
    assert math.isnan(auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))
