"""The R1-Zero template must be the paper's text, character for character."""

from __future__ import annotations

import pytest

from megatron_r1.data.template import R1_ZERO_TEMPLATE, render_prompt

# Typed again from ../shared/R1_RECIPE.md section 4 (the paper's Table 1), on purpose.
PAPER_TEXT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)


def test_r1_zero_template_is_the_papers_text() -> None:
    assert R1_ZERO_TEMPLATE == PAPER_TEXT
    assert "  " not in R1_ZERO_TEMPLATE and "\n" not in R1_ZERO_TEMPLATE


def test_render_r1_zero_puts_the_question_before_assistant() -> None:
    prompt = render_prompt("Compute (7 + 5) * 3", "r1_zero")
    assert prompt == PAPER_TEXT.replace("{prompt}", "Compute (7 + 5) * 3")
    assert prompt.endswith("User: Compute (7 + 5) * 3. Assistant:")
    assert prompt.startswith("A conversation between User and Assistant.")


def test_render_keeps_braces_in_the_question() -> None:
    assert render_prompt("solve {x} + {y}", "r1_zero").endswith("User: solve {x} + {y}. Assistant:")


def test_render_none_returns_the_question_unchanged() -> None:
    assert render_prompt("  Compute 1 + 2 ", "none") == "  Compute 1 + 2 "


def test_unknown_template_is_rejected_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"template='chatml': unknown prompt template, expected "
                                         r"one of \['r1_zero', 'none'\]"):
        render_prompt("q", "chatml")  # type: ignore[arg-type]
