"""pass@1 and cons@k arithmetic, with outputs fixed in advance (a scripted engine that
implements the RolloutEngine protocol) and the real reward scorer."""

import pytest

from megatron_r1.config.schema import RewardConfig
from megatron_r1.data.prompts import PromptExample
from megatron_r1.evaluation import evaluate, majority_vote
from megatron_r1.reward.scoring import RewardScorer
from megatron_r1.rollout.types import Completion, SamplingConfig


class ScriptedEngine:
    """Returns the given texts for each prompt, in order."""

    def __init__(self, texts):
        self.texts = texts
        self.calls = []

    def generate(self, prompts, sampling: SamplingConfig, *, prompt_indices=None):
        self.calls.append(sampling)
        return [[Completion((5,) * 3, (0.0,) * 3, t, "stop") for t in self.texts[i]]
                for i in range(len(prompts))]


def answer(value):
    return f"<think> x </think> <answer> {value} </answer>"


def test_majority_vote():
    assert majority_vote(["4", " 4 ", "5", None]) == 0
    assert majority_vote(["5", "4", "4"]) == 1
    assert majority_vote([None, "  "]) is None


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer.from_config(RewardConfig(), num_workers=1) as s:
        yield s


def test_pass_at_1_and_cons_at_k(scorer):
    questions = [PromptExample("q1", "q1", "4", (1, 2)), PromptExample("q2", "q2", "7", (1, 3))]
    engine = ScriptedEngine([
        [answer(4), answer(4), answer(5), "no answer"],   # 2/4 right, majority 4: right
        [answer(6), answer(6), answer(7), answer(7.0)],   # 2/4 right, tie 6 vs 7: 6 first
    ])
    result = evaluate(engine, questions, scorer, k=4, temperature=0.6, top_p=0.95,
                      max_new_tokens=8, seed=0)
    assert result.pass_at_1 == pytest.approx(4 / 8)
    assert result.cons_at_k == pytest.approx(1 / 2)
    assert engine.calls[0].n == 4 and engine.calls[0].temperature == 0.6
    assert result.metrics()["eval/cons@4"] == pytest.approx(0.5)
