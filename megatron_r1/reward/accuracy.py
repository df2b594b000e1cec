"""The accuracy reward for math: find the final answer, then ask math-verify if it is right.

Layer L1 (pure Python + math-verify/sympy). Two decisions:

- Extraction is ours and strict (`extract_answer`): the answer must be in the required format,
  the last `<answer>...</answer>` block or the last `\\boxed{...}` after the chain of thought.
  We do not let math-verify hunt for "the last number in the text", because then
  `<answer> 35 or 36 </answer>` would be right for 36: hedging must not pay.
- Equivalence is math-verify's (Hugging Face): the extracted answer and the reference are both
  parsed as if written in `\\boxed{...}` (LaTeX), which accepts plain numbers, fractions
  (1/2, \\frac{1}{2}, \\dfrac12, 0.5), percentages, units and \\text{...}, signs (including the
  Unicode minus) and symbolic expressions (x^2+2x+1 = (x+1)^2). math-verify's own time limits
  use SIGALRM, which fails outside the main thread and cannot interrupt C code; they are off
  here, and the caller bounds the time (megatron_r1.reward.pool kills the worker process).
"""

from __future__ import annotations

import functools
import logging
import re

from math_verify import parse, verify

from megatron_r1.reward.types import Sample

BOXED_COMMANDS = ("\\boxed", "\\fbox")
"""LaTeX commands whose braced argument is a final answer."""

_THINK_END = "</think>"
ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
"""An answer block of the R1 template (its text: group 1)."""
_BOXED_START = re.compile(r"\\(?:boxed|fbox)\s*\{")


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once per process that its timeout is off; that is deliberate here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


def _braced_argument(text: str, open_brace: int) -> str | None:
    """The text inside the brace group opening at `open_brace`, or None if it never closes.

    Escaped braces (`\\{`, `\\}`, as in the set `\\{1, 2\\}`) do not count.
    """
    depth = 0
    i = open_brace
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # skip the escaped character
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1:i]
        i += 1
    return None


def find_boxed(text: str) -> list[str]:
    """The arguments of every complete `\\boxed{...}` / `\\fbox{...}` in `text`, in order.

    Braces nest: `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`. A group that never closes (a
    completion cut off mid-answer) is skipped.

    Args:
        text: Any text.

    Returns:
        The argument strings, outermost groups only, left to right.
    """
    found: list[str] = []
    pos = 0
    while (match := _BOXED_START.search(text, pos)) is not None:
        argument = _braced_argument(text, match.end() - 1)
        if argument is None:
            pos = match.end()
            continue
        found.append(argument)
        pos = match.end() + len(argument) + 1
    return found


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion, by the rule of the R1 accuracy reward.

    The rule: look only after the last `</think>` (the whole text if there is none), so that
    a `\\boxed{}` in the reasoning is not the answer. There, the last complete
    `<answer>...</answer>` block wins; inside it, the last `\\boxed{...}` if it has one, else
    the whole block. Without an answer block, the last `\\boxed{...}` wins. Anything else
    (no tags, a block cut off before `</answer>` without a box, a blank block) has no answer.

    Args:
        completion: The generated text.

    Returns:
        The answer text, stripped, or None.
    """
    region = completion.rpartition(_THINK_END)[2]
    blocks = ANSWER_BLOCK.findall(region)
    if blocks:
        candidate = blocks[-1]
        boxed = find_boxed(candidate)
        if boxed:
            candidate = boxed[-1]
    else:
        boxed = find_boxed(region)
        if not boxed:
            return None
        candidate = boxed[-1]
    candidate = candidate.strip()
    return candidate or None


def _parse_boxed(answer: str) -> list[object]:
    # Wrapping in \boxed makes math-verify parse the whole string as one LaTeX expression
    # (with its unit, \text and percentage normalisation) instead of searching it.
    return list(parse(f"\\boxed{{{answer}}}", parsing_timeout=None))


@functools.lru_cache(maxsize=4096)
def _parse_reference(answer: str) -> tuple[object, ...]:
    """The parsed reference; cached, as all G completions of a group share it."""
    return tuple(_parse_boxed(answer))


def answers_match(predicted: str, reference: str) -> bool:
    """Whether two final answers are mathematically equivalent (math-verify).

    Args:
        predicted: The policy's answer, e.g. "0.5" or "\\dfrac{1}{2}".
        reference: The gold answer, e.g. "\\frac{1}{2}".

    Returns:
        True when math-verify finds them equal (numerically within its precision, or
        symbolically; text that is not math is compared as text); False when not, or when
        nothing can be read from the prediction.

    Raises:
        ValueError: when nothing can be read from the reference (blank, unbalanced braces).
    """
    gold = _parse_reference(reference)
    if not gold:
        raise ValueError(f"reference answer {reference!r} does not parse")
    target = _parse_boxed(predicted)
    if not target:
        return False
    return bool(verify(list(gold), target, timeout_seconds=None))


def accuracy_reward(completion: str, sample: Sample) -> float:
    """1.0 if the completion's final answer equals the reference answer, else 0.0.

    Args:
        completion: The generated text.
        sample: Uses `sample.answer`, the reference.

    Returns:
        1.0 or 0.0 (0.0 also when no answer can be extracted, see `extract_answer`).

    Raises:
        ValueError: if the sample has no reference answer, or nothing can be read from it: a
            data problem, which the scorer counts as an error rather than as a wrong answer.
    """
    if sample.answer is None:
        raise ValueError("accuracy reward needs Sample.answer, got None")
    predicted = extract_answer(completion)
    if predicted is None:
        return 0.0
    return 1.0 if answers_match(predicted, sample.answer) else 0.0
