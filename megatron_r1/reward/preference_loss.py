"""Reward-model objectives and their held-out metrics: Bradley-Terry, pointwise BCE, AUC.

Layer L1 (torch only). Each loss follows megatron's loss-function contract of
megatron_r1.schedule: (loss sum, example count, {metric: [sum, count]}), so that the step's
loss is the mean over every example of the global batch, whatever the micro-batching and the
data-parallel size. An example is a pair (pairwise) or a response (pointwise).

Shapes: P pairs, N scored responses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LossOutput = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]

PAIRWISE_METRICS = ["loss", "accuracy", "margin"]
"""`loss`: -log sigmoid(r_chosen - r_rejected); `accuracy`: share of pairs with
r_chosen > r_rejected (a tie counts as wrong); `margin`: mean r_chosen - r_rejected."""
POINTWISE_METRICS = ["loss", "accuracy"]
"""`loss`: binary cross-entropy with the score as the logit; `accuracy`: share of responses
whose score is on the label's side of 0 (score > 0 for label 1, score <= 0 for label 0)."""


def _mean_terms(value_sum: torch.Tensor, count: int) -> torch.Tensor:
    """A metric's [sum, count] as float32 (the contract of megatron_r1.schedule)."""
    return torch.stack([value_sum.detach().float(),
                        torch.tensor(float(count), device=value_sum.device)])


def bradley_terry_loss(chosen_P: torch.Tensor, rejected_P: torch.Tensor) -> LossOutput:
    """Bradley-Terry: sum over pairs of -log sigmoid(r_chosen - r_rejected), the pair count,
    and the PAIRWISE_METRICS terms.

    -log sigmoid(d) is computed as softplus(-d), exact for large |d| in either direction."""
    diff_P = chosen_P.float() - rejected_P.float()
    loss_sum = F.softplus(-diff_P).sum()
    count = diff_P.shape[0]
    return loss_sum, torch.tensor(count, dtype=torch.int, device=diff_P.device), {
        "loss": _mean_terms(loss_sum, count),
        "accuracy": _mean_terms((diff_P > 0).sum(), count),
        "margin": _mean_terms(diff_P.sum(), count)}


def pointwise_loss(score_N: torch.Tensor, label_N: torch.Tensor) -> LossOutput:
    """Binary cross-entropy with logits `score_N` on labels in {0, 1}: the sum over
    responses, their count, and the POINTWISE_METRICS terms."""
    score_N, label_N = score_N.float(), label_N.to(score_N.device, torch.float32)
    loss_sum = F.binary_cross_entropy_with_logits(score_N, label_N, reduction="sum")
    count = score_N.shape[0]
    right_N = (score_N > 0) == (label_N > 0.5)
    return loss_sum, torch.tensor(count, dtype=torch.int, device=score_N.device), {
        "loss": _mean_terms(loss_sum, count), "accuracy": _mean_terms(right_N.sum(), count)}


def average_ranks(values_N: torch.Tensor) -> torch.Tensor:
    """1-based ranks of `values_N` in ascending order, tied values sharing their mean rank
    (float64 [N])."""
    values = values_N.detach().to(torch.float64).cpu()
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    ranks = torch.empty_like(values)
    start = 0
    n = values.numel()
    while start < n:
        end = start
        while end + 1 < n and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1  # mean of ranks start+1..end+1
        start = end + 1
    return ranks


def auc(score_N: torch.Tensor, label_N: torch.Tensor) -> float:
    """Area under the ROC curve by the rank formula (Mann-Whitney U): the probability that a
    random positive scores above a random negative, ties counting one half.

    AUC = (sum of the positives' ranks - P (P + 1) / 2) / (P N), ranks averaged over ties.
    NaN when either class is absent.
    """
    positive_N = label_N.detach().cpu() > 0.5
    num_pos = int(positive_N.sum())
    num_neg = positive_N.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    rank_sum = float(average_ranks(score_N)[positive_N].sum())
    return (rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)
