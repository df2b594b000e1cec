"""Language-consistency reward: tokenisation by script and the share of target-language words."""

from __future__ import annotations

import pytest

from megatron_r1.reward.language import (
    WordCounts,
    chain_of_thought,
    count_words,
    language_consistency,
    language_reward,
)
from megatron_r1.reward.types import Sample


@pytest.mark.parametrize(("text", "expected"), [
    ("Let me compute it", WordCounts(latin=4, han=0, other=0)),
    ("我们计算", WordCounts(latin=0, han=4, other=0)),  # one word per ideograph
    ("我们用Python计算", WordCounts(latin=1, han=5, other=0)),  # no spaces between scripts
    ("don't over-think", WordCounts(latin=2, han=0, other=0)),
    ("café naïve", WordCounts(latin=2, han=0, other=0)),
    ("Давайте посчитаем", WordCounts(latin=0, han=0, other=2)),
    ("ひらがな", WordCounts(latin=0, han=0, other=1)),
    # Neutral: digits, operators, punctuation, LaTeX commands, single letters, Greek, sin/log.
    ("7 + 5 = 12, 12 * 3 = 36.", WordCounts(latin=0, han=0, other=0)),
    ("\\frac{x}{2} + \\sqrt{y} = 2x, sin(θ) + log(n) = π", WordCounts(latin=0, han=0, other=0)),
])
def test_count_words(text: str, expected: WordCounts) -> None:
    assert count_words(text) == expected


@pytest.mark.parametrize(("completion", "language", "expected"), [
    pytest.param("<think> First add the numbers: 7 + 5 = 12 </think> <answer> 12 </answer>",
                 "en", 1.0, id="english-en"),
    pytest.param("<think> First 我们 add the numbers </think> <answer> 12 </answer>",
                 "en", 4 / 6, id="english-with-chinese-words"),
    pytest.param("<think> 我们先 compute 一下 </think> <answer> 12 </answer>",
                 "zh", 5 / 6, id="chinese-with-english-word"),
    pytest.param("<think> 我们先 compute 一下 </think> <answer> 12 </answer>",
                 "en", 1 / 6, id="chinese-reasoning-en-target"),
    pytest.param("<think> 先算 7 + 5 = 12, 再乘以 3 </think> <answer> 36 </answer>",
                 "zh", 1.0, id="chinese-zh-with-math"),
    pytest.param("<think> Сначала add </think> <answer> 12 </answer>",
                 "en", 0.5, id="other-script-counts-against"),
    pytest.param("<think> 7 + 5 = 12, 12 * 3 = 36 </think> <answer> 36 </answer>",
                 "zh", 1.0, id="math-only-is-neutral"),
    pytest.param("<think> add </think> <answer> 答案是 12 </answer>",
                 "en", 1.0, id="answer-part-not-counted"),
    pytest.param("<think></think> <answer> 12 </answer>", "en", 0.0, id="empty-think"),
    pytest.param("<think>  \n </think> <answer> 12 </answer>", "en", 0.0, id="blank-think"),
    pytest.param("<answer> 12 </answer>", "en", 0.0, id="no-think"),
    pytest.param("<think> add the numbers and", "en", 0.0, id="unclosed-think"),
    pytest.param("add the numbers </think> the sum is 12", "en", 1.0,
                 id="think-opened-by-the-prompt"),
])
def test_language_reward(completion: str, language: str, expected: float) -> None:
    sample = Sample(answer="12", target_language=language)  # type: ignore[arg-type]
    assert language_reward(completion, sample) == pytest.approx(expected)


def test_chain_of_thought_is_the_first_think_block() -> None:
    assert chain_of_thought("<think> a </think> b </think>") == " a "
    assert chain_of_thought("a </think>") == "a "
    assert chain_of_thought("<think> a") is None


def test_unknown_language_raises() -> None:
    with pytest.raises(ValueError, match="target_language='fr'"):
        language_consistency("bonjour", "fr")  # type: ignore[arg-type]
