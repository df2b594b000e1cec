"""Group advantages (R1 eq. 3) and the solved-all/none statistics."""

import pytest
import torch

from megatron_r1.grpo.advantage import STD_EPS, group_advantages


def test_matches_the_formula_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    correct = torch.tensor([1, 0, 0, 1, 1, 1, 1, 1])
    got = group_advantages(rewards, correct, 4, std_normalize=True)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # sample std (Bessel), as DeepSeekMath
    want = (torch.tensor([1.0, 0.0, 0.0, 1.0]) - 0.5) / (std + STD_EPS)
    torch.testing.assert_close(got.advantages_R[:4], want)
    assert got.metrics["groups/solved_all"] == 0.5
    assert got.metrics["groups/solved_none"] == 0.0
    assert got.metrics["advantage/zero_groups"] == 0.5


def test_equal_rewards_give_exactly_zero_advantage():
    rewards = torch.full((8,), 0.7)
    for std_normalize in (True, False):
        got = group_advantages(rewards, torch.zeros(8), 8, std_normalize=std_normalize)
        assert torch.equal(got.advantages_R, torch.zeros(8))
    assert got.metrics["groups/solved_none"] == 1.0


def test_dr_grpo_skips_the_std():
    rewards = torch.tensor([3.0, 1.0])
    got = group_advantages(rewards, torch.tensor([1, 0]), 2, std_normalize=False)
    assert got.advantages_R.tolist() == [1.0, -1.0]


def test_shape_is_checked():
    with pytest.raises(ValueError, match=r"rewards must be \[P x G\] with G=3"):
        group_advantages(torch.zeros(8), torch.zeros(8), 3, std_normalize=True)
