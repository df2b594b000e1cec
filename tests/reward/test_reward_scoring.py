"""Scoring a rollout: weights, per-sample target language, failure counts in the metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch

from megatron_r1.config.schema import RewardConfig
from megatron_r1.reward.accuracy import accuracy_reward
from megatron_r1.reward.format import format_reward
from megatron_r1.reward.pool import Outcome
from megatron_r1.reward.scoring import RewardComponent, RewardScorer, reward_components
from megatron_r1.reward.types import Sample

if TYPE_CHECKING:
    from tests.reward.conftest import Misbehaving


GOOD = "<think> First add: 7 + 5 = 12 </think> <answer> 12 </answer>"
WRONG = "<think> First add: 7 + 5 = 13 </think> <answer> 13 </answer>"
CHINESE = "<think> 先 add 一下 </think> <answer> 12 </answer>"  # 3 Han, 1 Latin word
UNFORMATTED = "The answer is \\boxed{12}"


def test_weights_and_metrics_of_the_r1_scorer() -> None:
    config = RewardConfig(accuracy_weight=2.0, format_weight=0.5, language_weight=0.25)
    completions = [GOOD, WRONG, CHINESE, CHINESE, UNFORMATTED]
    samples = [Sample(answer="12")] * 3 + [Sample(answer="12", target_language="zh"),
                                           Sample(answer="12")]
    with RewardScorer.from_config(config, num_workers=2) as scorer:
        batch = scorer.score(completions, samples)
    expected = {
        "accuracy": [1.0, 0.0, 1.0, 1.0, 1.0],
        "format": [1.0, 1.0, 1.0, 1.0, 0.0],
        "language": [1.0, 1.0, 1 / 4, 3 / 4, 0.0],
    }
    assert list(batch.components_N) == ["accuracy", "format", "language"]
    for name, values in expected.items():
        torch.testing.assert_close(batch.components_N[name], torch.tensor(values))
        assert batch.outcomes_N[name].tolist() == [Outcome.OK] * 5
    total = [2.0 * a + 0.5 * f + 0.25 * lang for a, f, lang in zip(*expected.values())]
    torch.testing.assert_close(batch.total_N, torch.tensor(total))
    assert batch.total_N.dtype == torch.float32
    assert batch.metrics["reward/accuracy_mean"] == pytest.approx(0.8)
    assert batch.metrics["reward/format_mean"] == pytest.approx(0.8)
    assert batch.metrics["reward/language_mean"] == pytest.approx(0.6)
    assert batch.metrics["reward/total_mean"] == pytest.approx(sum(total) / 5)
    for name in expected:
        assert batch.metrics[f"reward/{name}_errors"] == 0.0
        assert batch.metrics[f"reward/{name}_timeouts"] == 0.0
    assert batch.metrics["reward/time_s"] > 0


def test_failing_components_score_zero_and_are_counted(misbehaving: Misbehaving) -> None:
    # "boom" makes `raising` raise, "slow" makes `slow` sleep a minute (conftest.py).
    components = [RewardComponent(name="accuracy", fn=accuracy_reward, weight=1.0),
                  RewardComponent(name="format", fn=format_reward, weight=1.0),
                  RewardComponent(name="raising", fn=misbehaving.raising, weight=2.0),
                  RewardComponent(name="slow", fn=misbehaving.slow, weight=10.0)]
    completions = [GOOD, GOOD + " boom", "slow " + GOOD, WRONG]
    with RewardScorer(components, timeout_s=1.0, num_workers=2) as scorer:
        batch = scorer.score(completions, [Sample(answer="12")] * 4)
    assert batch.components_N["raising"].tolist() == [0.5, 0.0, 0.5, 0.5]
    assert batch.outcomes_N["raising"].tolist() == [Outcome.OK, Outcome.ERROR, Outcome.OK,
                                                    Outcome.OK]
    assert batch.components_N["slow"].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert batch.outcomes_N["slow"].tolist() == [Outcome.OK, Outcome.OK, Outcome.TIMEOUT,
                                                 Outcome.OK]
    assert batch.metrics["reward/raising_errors"] == 1.0
    assert batch.metrics["reward/raising_timeouts"] == 0.0
    assert batch.metrics["reward/raising_mean"] == pytest.approx(1.5 / 4)
    assert batch.metrics["reward/slow_errors"] == 0.0
    assert batch.metrics["reward/slow_timeouts"] == 1.0
    assert batch.metrics["reward/slow_mean"] == pytest.approx(0.75)
    # The other components of the same completions are scored as usual.
    assert batch.components_N["accuracy"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert batch.components_N["format"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert batch.metrics["reward/accuracy_errors"] == 0.0
    assert batch.metrics["reward/format_timeouts"] == 0.0
    # 1 x accuracy + 1 x format + 2 x raising + 10 x slow
    assert batch.total_N.tolist() == [13.0, 11.0, 2.0, 12.0]


def test_zero_weight_component_is_logged_but_not_summed() -> None:
    components = reward_components(RewardConfig(accuracy_weight=1.0, format_weight=0.0,
                                                language_weight=0.0))
    with RewardScorer(components, timeout_s=5.0, num_workers=1) as scorer:
        batch = scorer.score([UNFORMATTED, GOOD], [Sample(answer="12")] * 2)
    assert batch.total_N.tolist() == [1.0, 1.0]
    assert batch.metrics["reward/format_mean"] == pytest.approx(0.5)


@pytest.mark.parametrize(("components", "match"), [
    ([], "at least one"),
    ([RewardComponent("a", format_reward, 1.0), RewardComponent("a", format_reward, 1.0)],
     "unique"),
    ([RewardComponent("a", format_reward, float("nan"))], "must be finite"),
])
def test_bad_components_raise(components: list[RewardComponent], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RewardScorer(components, timeout_s=1.0, num_workers=1)
