"""Rewards routed by prompt kind (R1 stage 4): which component scores which row, the totals,
the per-kind metrics, what a reward model reads, and the config's refusals."""

from __future__ import annotations

import pytest
import torch

from megatron_r1.config.schema import RewardConfig, RewardModelSpec
from megatron_r1.reward.kinds import RewardRouting, check_prompt_kinds, scored_text, summary_text


def routing(**overrides):
    models = (RewardModelSpec(name="helpful", checkpoint="rm/h", weight=0.5, kinds=("general",)),
              RewardModelSpec(name="safe", checkpoint="rm/s", weight=2.0,
                              kinds=("general", "chat"), scores="response"))
    return RewardRouting.from_config(RewardConfig(models=models, **overrides))


@pytest.mark.parametrize(("completion", "summary"), [
    ("<think> 2 + 2 = 4 </think> <answer> 4 </answer>", "4"),
    ("<think> a </think> <answer> 3 </answer> <answer> 5 </answer>", "5"),  # the last block
    ("<think> a </think> Paris is the capital.", "Paris is the capital."),  # no answer tags
    ("<think> still thinking", None),  # never finished its reasoning
    ("<think> a </think>   ", None),  # a blank summary
    ("<think> a </think> <answer> 4", "<answer> 4"),  # an unclosed block: the text after think
])
def test_summary_is_the_answer_block_else_the_text_after_think(completion, summary):
    assert summary_text(completion) == summary


def test_the_safety_model_reads_the_whole_response():
    completion = "<think> careful </think> <answer> no </answer>"
    assert scored_text(completion, "response") == completion
    assert scored_text(completion, "answer") == "no"
    assert scored_text("  ", "response") is None


def test_totals_add_only_the_components_of_each_rows_kind():
    rewards = routing(accuracy_weight=1.0, format_weight=0.25, language_weight=0.0)
    assert rewards.names == ("accuracy", "format", "language", "helpful", "safe")
    kinds = ["math", "general", "chat", "code"]
    # columns: accuracy, format, language, helpful, safe (9: a value that must not count)
    values = torch.tensor([[1.0, 1.0, 0.5, 9.0, 9.0],    # math: rule rewards only
                           [9.0, 1.0, 9.0, 0.8, -0.5],   # general: format and both models
                           [9.0, 0.0, 9.0, 9.0, 0.25],   # chat: format and the safety model
                           [0.0, 1.0, 1.0, 9.0, 9.0]], dtype=torch.float64)
    total = rewards.total_R(values, kinds)
    assert total.dtype == torch.float32
    # float32 sums: equal to the float64 hand values within float32 rounding of each term
    assert torch.allclose(total.double(), torch.tensor(
        [1.25, 0.25 + 0.5 * 0.8 + 2.0 * -0.5, 2.0 * 0.25, 0.25], dtype=torch.float64),
        rtol=0, atol=4 * torch.finfo(torch.float32).eps)
    metrics = rewards.metrics(values, total, kinds)
    assert metrics["reward/accuracy_mean"] == pytest.approx(0.5)  # math and code rows only
    assert metrics["reward/format_mean"] == pytest.approx(0.75)  # R1: every kind's format
    assert metrics["reward/helpful_mean"] == pytest.approx(0.8)  # the general row only
    assert metrics["reward/safe_mean"] == pytest.approx((-0.5 + 0.25) / 2)
    assert metrics["kind/general/rows"] == 1.0
    assert metrics["kind/general/reward_mean"] == pytest.approx(-0.35)
    assert metrics["kind/chat/safe_mean"] == pytest.approx(0.25)
    assert "kind/chat/helpful_mean" not in metrics and "kind/math/safe_mean" not in metrics
    assert "kind/general/accuracy_mean" not in metrics
    assert metrics["reward/total_mean"] == pytest.approx(float(total.double().mean()))


def test_format_kinds_narrow_the_format_reward():
    rewards = routing(format_kinds=("math", "code"))
    assert rewards.applies_RC(["math", "general"])[:, 1].tolist() == [True, False]
    assert rewards.rule_kinds == {"math", "code"}


def test_rule_only_totals_add_as_the_rule_scorer_always_has():
    """A run without reward models sums weight x value in float32 in component order, the
    same bits as megatron_r1.reward.scoring's total."""
    rewards = RewardRouting.from_config(RewardConfig(format_weight=0.1, language_weight=0.3))
    values = torch.rand(64, 3, generator=torch.Generator().manual_seed(0)).double()
    expected = torch.zeros(64)
    for c, w in enumerate((1.0, 0.1, 0.3)):
        expected += w * values[:, c].float()
    assert torch.equal(rewards.total_R(values, ["math"] * 64), expected)


def test_a_kind_no_reward_scores_is_named():
    rewards = routing()
    check_prompt_kinds(["math", "general", "chat"], ["a", "b", "c"], rewards, "data.path='p'")
    with pytest.raises(ValueError, match=r"data.path='p': prompt 1 \('poem'\) has kind "
                                         r"'poetry', which neither reward.rule_kinds"):
        check_prompt_kinds(["math", "poetry"], ["q", "poem"], rewards, "data.path='p'")


@pytest.mark.parametrize(("config", "message"), [
    (lambda: RewardConfig(models=(RewardModelSpec(name="h", checkpoint="c", kinds=("math",)),)),
     r"reward.models='h': scores kinds \['math'\] that reward.rule_kinds also scores"),
    (lambda: RewardConfig(models=(RewardModelSpec(name="h", checkpoint="c"),
                                  RewardModelSpec(name="h", checkpoint="d"))),
     r"reward.models='h': reward model names must be unique"),
    (lambda: RewardConfig(models=(RewardModelSpec(name="format", checkpoint="c"),)),
     r"reward.models='format'"),
    (lambda: RewardModelSpec(name="h", checkpoint="c", weight=0.0),
     r"reward.models\['h'\].weight=0.0: must not be 0"),
    (lambda: RewardModelSpec(name="h", checkpoint="", kinds=("general",)),
     r"reward.models\['h'\].checkpoint=''"),
    (lambda: RewardModelSpec(name="h", checkpoint="c", max_length=0),
     r"reward.models\['h'\].max_length=0: must be > 0"),
])
def test_bad_reward_model_entries_are_named(config, message):
    with pytest.raises(ValueError, match=message):
        config()
