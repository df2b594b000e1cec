"""megatron_r1.ops.grpo_loss_reference: the spec itself, against values worked out by hand
(R1_RECIPE.md section 1), so that the kernels are not merely consistent with a wrong spec."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_r1.ops import grpo_token_loss_reference

# softmax([0, ln 2, ln 5]) = [1, 2, 5] / 8; target 2: logp = ln(5/8)
LOGITS = torch.tensor([[0.0, math.log(2.0), math.log(5.0)]], dtype=torch.float64)
P = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64) / 8
LOGP = math.log(5 / 8)
BETA = 0.1


def _run(adv: float, ratio: float, d: float, estimator: str, mask: float = 1.0,
         clip_low: float = 0.2):
    x = LOGITS.clone().requires_grad_()
    t = torch.tensor([2])
    old = torch.tensor([LOGP - math.log(ratio)], dtype=torch.float64)
    ref = torch.tensor([LOGP + d], dtype=torch.float64)
    res = grpo_token_loss_reference(x, t, old, ref, torch.tensor([adv], dtype=torch.float64),
                                    torch.tensor([mask], dtype=torch.float64), clip_low=clip_low,
                                    clip_high=0.2, kl_coef=BETA, kl_estimator=estimator)
    res.loss.sum().backward()
    return res, x.grad[0]


KL = {"k1": (-0.5, 1.0), "k2": (0.125, -0.5), "k3": (math.exp(0.5) - 1.5, 1 - math.exp(0.5))}


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize(("adv", "ratio", "surr", "clipped", "clip_low"), [
    (1.0, 2.0, 1.2, True, 0.2),     # A > 0, ratio above 1 + clip_high: clipped branch is the min
    (1.0, 0.5, 0.5, False, 0.2),    # A > 0, ratio below the range: unclipped (smaller) branch
    (-1.0, 0.5, -0.8, True, 0.2),   # A < 0, ratio below 1 - clip_low: clipped
    (-1.0, 2.0, -2.0, False, 0.2),  # A < 0, ratio above: unclipped, no pessimistic bound
    (1.0, 1.1, 1.1, False, 0.2),    # inside the range
    # clip_low >= 1 (the R1 journal's epsilon 10): 1 - clip_low <= 0 < ratio, never clipped
    (-1.0, 0.5, -0.5, False, 10.0),
    (-1.0, 0.01, -0.01, False, 1.0),
    (1.0, 2.0, 1.2, True, 10.0),    # the upper clip still applies
])
def test_hand_computed_token(estimator, adv, ratio, surr, clipped, clip_low) -> None:
    kl, dkl = KL[estimator]  # d = ref - logp = 0.5
    res, grad = _run(adv, ratio, 0.5, estimator, clip_low=clip_low)
    torch.testing.assert_close(res.logp, torch.tensor([LOGP], dtype=torch.float64))
    torch.testing.assert_close(res.kl, torch.tensor([kl], dtype=torch.float64))
    torch.testing.assert_close(res.loss, torch.tensor([-(surr - BETA * kl)], dtype=torch.float64))
    assert bool(res.clipped[0]) == clipped
    torch.testing.assert_close(res.entropy, -(P * P.log()).sum().view(1))
    # d loss / d logp = -ratio * A (0 when clipped) + beta * dKL/dlogp; d logp / d x = e_t - p
    dlogp = (0.0 if clipped else -ratio * adv) + BETA * dkl
    onehot = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(grad, dlogp * (onehot - P))


def test_masked_token_has_zero_loss_and_gradient() -> None:
    res, grad = _run(1.0, 2.0, 0.5, "k3", mask=0.0)
    assert res.loss.item() == 0.0 and res.kl.item() == 0.0 and not res.clipped.item()
    assert torch.equal(grad, torch.zeros_like(grad))
    torch.testing.assert_close(res.logp, torch.tensor([LOGP], dtype=torch.float64))


def test_temperature_scales_the_logits() -> None:
    x = LOGITS * 2.0
    res = grpo_token_loss_reference(x, torch.tensor([2]), None, None,
                                    torch.zeros(1, dtype=torch.float64),
                                    torch.ones(1, dtype=torch.float64), temperature=2.0)
    torch.testing.assert_close(res.logp, torch.tensor([LOGP], dtype=torch.float64))
    assert res.loss.item() == 0.0  # A = 0 and no KL term


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_reference_gradient_matches_finite_differences(kl_estimator):
    """The spec's autograd gradient is the derivative of its loss (float64 central
    differences, torch.autograd.gradcheck's default eps 1e-6 and tolerances)."""
    g = torch.Generator().manual_seed(3)
    n, v = 5, 7
    logits = torch.randn(n, v, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, v, (n,), generator=g)
    old = torch.randn(n, generator=g, dtype=torch.float64) - 2
    ref = torch.randn(n, generator=g, dtype=torch.float64) - 2
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64)

    def total(x):
        return grpo_token_loss_reference(x, target, old, ref, adv, mask, clip_low=0.2,
                                         clip_high=0.28, kl_coef=0.1, kl_estimator=kl_estimator,
                                         temperature=0.9).loss.sum()

    assert torch.autograd.gradcheck(total, (logits,))
