"""Prompt templates: the one place that turns a question into the text the policy sees.

Layer L1 (pure Python). The R1-Zero template is copied verbatim from the DeepSeek-R1 paper
(../shared/R1_RECIPE.md section 4); a test pins it character for character, because SFT, the
rollout prompts and the format reward must all agree on it.
"""

from __future__ import annotations

from typing import Literal, get_args

TemplateName = Literal["r1_zero", "none"]
"""`r1_zero`: the R1-Zero reasoning template; `none`: the question as it is."""

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)
"""The R1-Zero template; `{prompt}` is replaced by the question."""


def render_prompt(question: str, template: TemplateName) -> str:
    """Put a question into a prompt template.

    Args:
        question: The user's question, e.g. "Compute (7 + 5) * 3".
        template: `r1_zero` wraps it in the R1-Zero template; `none` returns it unchanged.

    Returns:
        The prompt text, ending where the policy's completion starts ("Assistant:" for
        r1_zero).

    Raises:
        ValueError: for an unknown template name.
    """
    if template == "r1_zero":
        # str.replace, not str.format: a question may itself contain braces.
        return R1_ZERO_TEMPLATE.replace("{prompt}", question)
    if template == "none":
        return question
    raise ValueError(
        f"template={template!r}: unknown prompt template, expected one of "
        f"{list(get_args(TemplateName))}")
