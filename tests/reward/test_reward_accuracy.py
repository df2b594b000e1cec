"""Accuracy reward: answer extraction rules and math-verify equivalence on real answer formats."""

from __future__ import annotations

import pytest

from megatron_r1.data.arithmetic import Problem, Step, write_solution
from megatron_r1.reward.accuracy import accuracy_reward, extract_answer, find_boxed
from megatron_r1.reward.types import Sample

THINK = "<think> 7 + 5 = 12, 12 * 3 = 36 </think> "


@pytest.mark.parametrize(("text", "expected"), [
    ("\\boxed{36}", ["36"]),
    ("\\boxed{\\frac{1}{2}}", ["\\frac{1}{2}"]),
    ("\\boxed{\\frac{\\sqrt{4}}{2}} and \\fbox{7}", ["\\frac{\\sqrt{4}}{2}", "7"]),
    ("\\boxed{\\{1, 2\\}}", ["\\{1, 2\\}"]),  # escaped braces do not close the group
    ("\\boxed {5}", ["5"]),
    ("\\boxed{\\frac{1}{2}", []),  # cut off before the closing brace
    ("no box here {36}", []),
])
def test_find_boxed(text: str, expected: list[str]) -> None:
    assert find_boxed(text) == expected


@pytest.mark.parametrize(("completion", "expected"), [
    (THINK + "<answer> 36 </answer>", "36"),
    (THINK + "<answer>\n36\n</answer>", "36"),
    (THINK + "<answer> 35 </answer> <answer> 36 </answer>", "36"),  # last block wins
    (THINK + "<answer> so \\boxed{35}, no: \\boxed{36} </answer>", "36"),  # last box in block
    (THINK + "The answer is \\boxed{36}.", "36"),  # a box without an answer block
    ("<think> maybe \\boxed{35} </think> <answer> 36 </answer>", "36"),
    ("<think> maybe \\boxed{35} </think> I give up.", None),  # boxes in the reasoning ignored
    (THINK + "<answer> 36", None),  # block never closed
    (THINK + "<answer>   </answer>", None),
    ("The answer is 36.", None),
    ("", None),
])
def test_extract_answer(completion: str, expected: str | None) -> None:
    assert extract_answer(completion) == expected


# (answer text as the policy wrote it, reference answer, expected reward)
ANSWER_FORMATS = [
    pytest.param("36", "36", 1.0, id="integer"),
    pytest.param("37", "36", 0.0, id="wrong-integer"),
    pytest.param("1,000", "1000", 1.0, id="thousands-separator"),
    pytest.param("36.0", "36", 1.0, id="integer-as-decimal"),
    pytest.param("-3", "-3", 1.0, id="negative"),
    pytest.param("−3", "-3", 1.0, id="unicode-minus"),
    pytest.param("3", "-3", 0.0, id="sign-dropped"),
    pytest.param("1/2", "\\frac{1}{2}", 1.0, id="slash-vs-frac"),
    pytest.param("0.5", "\\frac{1}{2}", 1.0, id="decimal-vs-frac"),
    pytest.param("\\dfrac{1}{2}", "0.5", 1.0, id="dfrac-vs-decimal"),
    pytest.param("3/6", "1/2", 1.0, id="unreduced-fraction"),
    pytest.param("1/3", "0.33", 0.0, id="rounded-too-far"),
    pytest.param("-\\frac{3}{4}", "-0.75", 1.0, id="negative-fraction"),
    pytest.param("2\\sqrt{2}", "\\sqrt{8}", 1.0, id="latex-radical"),
    pytest.param("\\boxed{\\frac{\\sqrt{4}}{2}}", "1", 1.0, id="nested-boxed"),
    pytest.param("$36$", "36", 1.0, id="math-delimiters"),
    pytest.param("5 apples", "5", 1.0, id="unit-word"),
    pytest.param("5\\text{ cm}", "5", 1.0, id="latex-text-unit"),
    pytest.param("50\\%", "50\\%", 1.0, id="percent"),
    pytest.param("0.5", "50\\%", 1.0, id="percent-as-fraction"),
    pytest.param("(x+1)^2", "x^2+2x+1", 1.0, id="symbolic"),
    pytest.param("x+2", "x+1", 0.0, id="symbolic-wrong"),
    pytest.param("\\{2, 1\\}", "\\{1, 2\\}", 1.0, id="set-order"),
    pytest.param("35 or 36", "36", 0.0, id="hedged-answers"),
    pytest.param("The answer is 36", "36", 0.0, id="sentence-not-expression"),
    pytest.param("thirty-six", "36", 0.0, id="number-in-words"),
]


@pytest.mark.parametrize(("answer", "reference", "expected"), ANSWER_FORMATS)
def test_answer_formats(answer: str, reference: str, expected: float) -> None:
    completion = f"{THINK}<answer> {answer} </answer>"
    assert accuracy_reward(completion, Sample(answer=reference)) == expected


@pytest.mark.parametrize(("completion", "expected"), [
    (THINK + "<answer>36</answer>", 1.0),
    (THINK + "<answer> 35 </answer> <answer> 36 </answer>", 1.0),
    (THINK + "<answer> 36 </answer> <answer> 35 </answer>", 0.0),
    (THINK + "\\boxed{36}", 1.0),
    ("<think> \\boxed{36} </think> <answer> 35 </answer>", 0.0),
    (THINK + "<Answer> 36 </Answer>", 0.0),  # wrong tags: no answer
    (THINK + "<ans> 36 </ans>", 0.0),
    ("The answer is 36.", 0.0),  # missing tags
    (THINK, 0.0),  # no answer at all
])
def test_extraction_decides_reward(completion: str, expected: float) -> None:
    assert accuracy_reward(completion, Sample(answer="36")) == expected


def test_solver_output_of_the_arithmetic_task_is_correct() -> None:
    problem = Problem(question="Compute (7 + 5) * 3", expression="(7 + 5) * 3", answer=36,
                      steps=(Step(7, "+", 5, 12), Step(12, "*", 3, 36)))
    completion = write_solution(problem)
    assert accuracy_reward(completion, Sample(answer=str(problem.answer))) == 1.0
    assert accuracy_reward(completion, Sample(answer="35")) == 0.0


def test_missing_or_unparsable_reference_raises() -> None:
    with pytest.raises(ValueError, match=r"needs Sample\.answer"):
        accuracy_reward(THINK + "<answer> 36 </answer>", Sample(answer=None))
    with pytest.raises(ValueError, match="does not parse"):
        accuracy_reward(THINK + "<answer> 36 </answer>", Sample(answer="}"))
