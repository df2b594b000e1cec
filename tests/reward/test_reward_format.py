"""Format reward: exactly the R1-Zero `<think> ... </think> <answer> ... </answer>` layout."""

from __future__ import annotations

import pytest

from megatron_r1.data.arithmetic import Problem, Step, write_solution
from megatron_r1.reward.format import format_reward, has_r1_zero_format
from megatron_r1.reward.types import Sample


@pytest.mark.parametrize(("completion", "expected"), [
    pytest.param("<think> 7 + 5 = 12 </think> <answer> 12 </answer>", 1.0, id="canonical"),
    pytest.param("<think>7 + 5 = 12</think><answer>12</answer>", 1.0, id="no-spaces"),
    pytest.param(" <think>\nreasoning\n</think>\n\n<answer>\n12\n</answer>\n", 1.0,
                 id="newlines-and-leading-space"),
    pytest.param("<think></think> <answer> 12 </answer>", 1.0, id="empty-think"),
    pytest.param("<think> a </think> <answer>   </answer>", 0.0, id="blank-answer"),
    pytest.param("<think> a </think> <answer> 12 </answer> Hope this helps!", 0.0,
                 id="trailing-text"),
    pytest.param("Sure. <think> a </think> <answer> 12 </answer>", 0.0, id="leading-text"),
    pytest.param("<think> a </think> so the answer is <answer> 12 </answer>", 0.0,
                 id="text-between-blocks"),
    pytest.param("<answer> 12 </answer>", 0.0, id="missing-think"),
    pytest.param("<think> a </think> 12", 0.0, id="missing-answer"),
    pytest.param("<answer> 12 </answer> <think> a </think>", 0.0, id="blocks-swapped"),
    pytest.param("<think> a </think> <answer> 12", 0.0, id="cut-off-answer"),
    pytest.param("<think> a <think> b </think> <answer> 12 </answer>", 0.0, id="nested-think"),
    pytest.param("<think> a </think> b </think> <answer> 12 </answer>", 0.0,
                 id="two-think-ends"),
    pytest.param("<think> a </think> <answer> 1 </answer> <answer> 2 </answer>", 0.0,
                 id="two-answers"),
    pytest.param("<think> a </think> <think> b </think> <answer> 12 </answer>", 0.0,
                 id="two-thinks"),
    pytest.param("<Think> a </Think> <Answer> 12 </Answer>", 0.0, id="capitalised-tags"),
    pytest.param("<think> a </think> <answer> 12 </answer><|endoftext|>", 0.0,
                 id="special-token-left-in"),
])
def test_layouts(completion: str, expected: float) -> None:
    assert format_reward(completion, Sample()) == expected
    assert has_r1_zero_format(completion) is (expected == 1.0)


def test_solver_output_has_the_format() -> None:
    problem = Problem(question="Compute 7 + 5", expression="7 + 5", answer=12,
                      steps=(Step(7, "+", 5, 12),))
    assert format_reward(write_solution(problem), Sample(answer="12")) == 1.0
