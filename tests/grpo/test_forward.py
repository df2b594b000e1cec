"""The GRPO forward steps (grpo/forward.py) on a small stand-in model: a training micro-batch
of the rollout's first mini-batch that takes its old log-probs from its own forward
(OLD_FROM_FORWARD) computes what the same micro-batch computes with the old log-probs of a
separate score pass, and hands those log-probs back.

Tolerance: the two paths run the same kernel on the same logits, one with old log-probs equal
to this forward's (ratio exp(0) = 1) and one without (ratio 1 by definition): equal to float
roundoff (1e-6 relative, measured exact).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_r1.config.schema import GRPOConfig
from megatron_r1.grpo import forward


class TinyLM(torch.nn.Module):
    """Called as GPTModel is: model(tokens, position_ids, attention_mask, packed_seq_params)."""

    def __init__(self, vocab: int = 11, hidden: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, tokens, position_ids, attention_mask, packed_seq_params=None):
        return self.head(torch.tanh(self.embed(tokens)))


def batch() -> dict:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 11, (3, 6), generator=g)
    mask = torch.ones(3, 6)
    mask[0, :2] = 0  # prompt positions
    mask[2, 4:] = 0  # padding
    return {"tokens": tokens, "position_ids": torch.arange(6).expand(3, 6),
            "labels": torch.roll(tokens, -1, 1), "loss_mask": mask,
            "sampler_logp": -torch.rand(3, 6, generator=g),
            "ref_logp": -torch.rand(3, 6, generator=g) * 3,
            "advantages": torch.tensor([[1.0], [-0.5], [2.0]]).expand(3, 6).contiguous(),
            "weights": mask / mask.sum(), "count": torch.tensor(3)}


def run(step, model, b):
    model.zero_grad()
    output, loss_fn = step(b, model)
    loss, _, metrics = loss_fn(output)
    loss.backward()
    return metrics, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("fused", ["off", "auto"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_old_logprobs_from_the_training_forward_equal_a_separate_score_pass(fused, kl_coef):
    model = TinyLM()
    grpo = dataclasses.replace(GRPOConfig(), fused_loss=fused, kl_coef=kl_coef, clip_low=0.1)
    temperature = 0.7
    # the old pass: log-probs of the labels under the same (not yet updated) policy
    out, loss_fn = forward.score_step(temperature, fused, None)(batch(), model)
    old = loss_fn(out)[2]["logp"].detach()

    separate = {**batch(), "old_logp": old}
    own = {**batch(), "old_logp": torch.full((3, 6), float("nan")),  # never read
           forward.OLD_FROM_FORWARD: True}
    no_ref = kl_coef == 0  # a run without a reference model: its stand-in are the old ones
    if no_ref:
        separate["ref_logp"] = old
        own.update({"ref_logp": torch.full((3, 6), float("nan")), forward.REF_IS_OLD: True})
    step = forward.loss_step(grpo, temperature, None)
    want, want_grads = run(step, model, separate)
    got, got_grads = run(step, model, own)
    torch.testing.assert_close(got["old_logp"], old, rtol=1e-6, atol=0)
    assert "old_logp" not in want
    for key in forward.LOSS_METRICS:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)
    assert float(got["ratio_mean"][0] / got["ratio_mean"][1]) == pytest.approx(1.0, abs=1e-6)
    if no_ref:
        assert float(got["kl"][0]) == 0.0
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    assert any(float(g.abs().max()) > 0 for g in got_grads)  # the ratio carries a gradient
