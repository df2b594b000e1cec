"""Group-relative advantages (R1_RECIPE.md section 1, eq. 3) and group statistics.

Layer L1. Outputs of one question form a group of G; each output's advantage is its reward
minus the group mean, divided by the group std unless `std_normalize` is off (Dr. GRPO). The
std is the sample std (Bessel-corrected), as DeepSeekMath's reference code and TRL use. A
group whose rewards are all equal gets advantage exactly 0 (the std term cannot blow up:
the numerator is exactly 0 first).

Shapes: P questions (prompts) in the rollout, G outputs per question, R = P x G.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STD_EPS = 1e-6
"""Added to the group std: bounds the advantage when rewards differ by a rounding error."""


@dataclass(frozen=True, slots=True)
class GroupAdvantages:
    advantages_R: torch.Tensor
    """float32 [R]: one advantage per output, in the rollout's order."""
    metrics: dict[str, float]
    """Advantage statistics and the solved-all / solved-none fractions of the groups."""


def group_advantages(rewards_R: torch.Tensor, correct_R: torch.Tensor, group_size: int, *,
                     std_normalize: bool) -> GroupAdvantages:
    """Advantages of R = P x G outputs laid out group by group.

    Args:
        rewards_R: total reward of each output [R].
        correct_R: whether each output's answer is correct [R] (for solved_all/none).
        group_size: G.
        std_normalize: divide by the group std (R1) or not (Dr. GRPO).
    """
    if rewards_R.dim() != 1 or rewards_R.numel() % group_size:
        raise ValueError(f"rewards must be [P x G] with G={group_size}, got shape "
                         f"{tuple(rewards_R.shape)}")
    rewards_PG = rewards_R.to(torch.float64).view(-1, group_size)
    centered_PG = rewards_PG - rewards_PG.mean(dim=1, keepdim=True)
    if std_normalize:
        centered_PG = centered_PG / (rewards_PG.std(dim=1, keepdim=True) + STD_EPS)
    advantages_R = centered_PG.view(-1).to(torch.float32)
    correct_PG = correct_R.view(-1, group_size).bool()
    metrics = {
        "advantage/mean": float(advantages_R.mean()),
        "advantage/std": float(advantages_R.std()) if advantages_R.numel() > 1 else 0.0,
        "advantage/abs_max": float(advantages_R.abs().max()),
        "advantage/zero_groups": float((rewards_PG == rewards_PG[:, :1]).all(dim=1).float().mean()),
        "groups/solved_all": float(correct_PG.all(dim=1).float().mean()),
        "groups/solved_none": float((~correct_PG).all(dim=1).float().mean()),
    }
    return GroupAdvantages(advantages_R=advantages_R, metrics=metrics)
