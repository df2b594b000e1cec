"""Train/rollout mismatch metrics and the importance-sampling corrections (TIS, sequence
masking) against hand-computed values; the reference spec and the production path agree; with
pi_sampler = pi_old the corrections change nothing.

Tolerance: 1e-6 relative for hand-computed values (float64 arithmetic of a few terms, the
inputs rounded to float32); the reference and the production paths both compute in float64
and are compared at 1e-12."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_r1.config.schema import Config, GRPOConfig, ModelConfig
from megatron_r1.grpo.mismatch import (
    Correction,
    correction_weights,
    mismatch_metrics,
    mismatch_partials,
)
from megatron_r1.grpo.rollout_batch import pack_rollout, train_inputs
from megatron_r1.ops.grpo_loss_reference import rollout_correction_reference
from megatron_r1.rollout.types import Completion

# two rows of four positions; row 0's completion labels sit at 1-2, row 1's at 2-3
MASK = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.float32)
OLD = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, 0.0, -0.3, -0.2]])
SAMPLER = torch.tensor([[0.0, -1.5, -1.0, 0.0], [0.0, 0.0, -0.3, -0.2]])
# d = old - sampler on the labels: row 0 (0.5, -1.0), row 1 (0, 0)
E05, EM1 = math.exp(0.5), math.exp(-1.0)


def metrics(correction=None, threshold=0.1, top_p=1.0):
    correction = correction or Correction()
    sums, maxima = mismatch_partials(OLD, SAMPLER, MASK, threshold=threshold,
                                     correction=correction)
    return mismatch_metrics(sums, maxima, top_p=top_p, correction=correction)


def test_mismatch_metrics_hand_computed():
    got = metrics(top_p=0.9)
    want = {
        "mismatch/logp_abs_diff_mean": (0.5 + 1.0) / 4,
        "mismatch/logp_abs_diff_max": 1.0,
        "mismatch/k3_kl_sampler_trainer": ((E05 - 1 - 0.5) + (EM1 - 1 + 1.0)) / 4,
        "mismatch/above_threshold_fraction": 2 / 4,
        "mismatch/ratio_mean": (E05 + EM1 + 2) / 4,
        "mismatch/ratio_min": EM1,
        "mismatch/ratio_max": E05,
        "mismatch/ratio_outside_fraction": 1 / 4,  # e^-1 < 0.5
        "mismatch/sampler_top_p": 0.9,
    }
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key


def test_correction_metrics_hand_computed():
    got = metrics(Correction(tis_cap=1.2, seq_low=0.8, seq_high=1.25))
    assert got["correction/tis_weight_mean"] == pytest.approx((1.2 + EM1 + 2) / 4, rel=1e-6)
    assert got["correction/tis_truncated_fraction"] == pytest.approx(1 / 4)
    # row 0: exp(mean(0.5, -1)) = exp(-0.25) = 0.78 < 0.8, masked; row 1: 1, kept
    assert got["correction/masked_sequence_fraction"] == pytest.approx(1 / 2)
    assert "correction/tis_weight_mean" not in metrics()


def test_correction_weights_hand_computed():
    factor, keep = correction_weights(OLD, SAMPLER, MASK, Correction(tis_cap=1.2))
    torch.testing.assert_close(factor, torch.tensor([[1, 1.2, EM1, 1], [1, 1, 1, 1]]),
                               rtol=1e-6, atol=0)
    assert keep.tolist() == [True, True]
    _, keep = correction_weights(OLD, SAMPLER, MASK, Correction(seq_low=0.8, seq_high=1.25))
    assert keep.tolist() == [False, True]
    _, keep = correction_weights(OLD, SAMPLER, MASK, Correction(seq_low=0.7, seq_high=1.25))
    assert keep.tolist() == [True, True]


@pytest.mark.parametrize("correction", [Correction(tis_cap=2.0),
                                        Correction(seq_low=0.9, seq_high=1.1),
                                        Correction(tis_cap=1.5, seq_low=0.95, seq_high=1.05)])
def test_production_weights_equal_the_reference_spec(correction):
    g = torch.Generator().manual_seed(0)
    rows, width = 12, 20
    mask = torch.zeros(rows, width)
    lengths = torch.randint(0, 15, (rows,), generator=g)
    for r, n in enumerate(lengths.tolist()):
        mask[r, 3:3 + n] = 1
    old = -2 + torch.randn(rows, width, generator=g)
    drift = 0.15 * torch.randn(rows, 1, generator=g)  # some rows' sampler further off
    sampler = old + drift + 0.1 * torch.randn(rows, width, generator=g)
    factor, keep = correction_weights(old, sampler, mask, correction)
    want = rollout_correction_reference(
        [old[r][mask[r] > 0] for r in range(rows)], [sampler[r][mask[r] > 0] for r in range(rows)],
        tis_cap=correction.tis_cap, seq_low=correction.seq_low, seq_high=correction.seq_high)
    for r in range(rows):
        got = (factor[r] * keep[r])[mask[r] > 0].double()
        torch.testing.assert_close(got, want[r].float().double(), rtol=1e-6, atol=0)
    assert 0 < int(keep.sum()) < rows or correction.seq_low is None  # the masking bites


def rollout_of(old_logps):
    groups = [[Completion(tuple(range(3, 3 + len(lp))), tuple(lp), "", "stop")]
              for lp in old_logps]
    return pack_rollout([[1, 2]] * len(groups), groups, seq_length=32, pad_id=0)


def test_same_policy_changes_nothing_and_masked_rows_keep_their_count():
    sampler = [[-1.0, -2.0, -0.5], [-0.1], [-3.0, -0.2]]
    rollout = rollout_of(sampler)
    adv = torch.tensor([1.0, -1.0, 0.5])
    everything = Correction(tis_cap=2.0, seq_low=0.5, seq_high=2.0)
    for aggregation in ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"):
        plain = train_inputs(rollout, adv, rollout.sampler_logp_RS, rollout.sampler_logp_RS,
                             aggregation, 8)
        same = train_inputs(rollout, adv, rollout.sampler_logp_RS, rollout.sampler_logp_RS,
                            aggregation, 8, everything)
        assert torch.equal(plain.weights_RS, same.weights_RS)
        assert torch.equal(plain.counts_R, same.counts_R)
    # the old policy far from the sampler on row 0 only: its weights vanish, its count stays
    old = rollout.sampler_logp_RS.clone()
    old[0] += rollout.loss_mask_RS[0] * 2.0
    moved = train_inputs(rollout, adv, old, old, "seq_mean_token_mean", 8, everything)
    plain = train_inputs(rollout, adv, old, old, "seq_mean_token_mean", 8)
    assert float(moved.weights_RS[0].abs().sum()) == 0.0
    assert torch.equal(moved.weights_RS[1:], plain.weights_RS[1:])
    assert torch.equal(moved.counts_R, plain.counts_R)


def test_config_checks_name_the_fields():
    with pytest.raises(ValueError, match=r"grpo\.seq_mask_low=0\.5 and grpo\.seq_mask_high=None"):
        GRPOConfig(seq_mask_low=0.5)
    with pytest.raises(ValueError, match=r"grpo\.seq_mask_low=1\.2"):
        GRPOConfig(seq_mask_low=1.2, seq_mask_high=2.0)
    with pytest.raises(ValueError, match=r"grpo\.tis_imp_ratio_cap=0"):
        GRPOConfig(tis_imp_ratio_cap=0)
    with pytest.raises(ValueError, match=r"grpo\.routing_replay='r2': the model is dense"):
        Config(model=ModelConfig(num_experts=0), grpo=GRPOConfig(routing_replay="r2"))
