"""The language-consistency reward: the share of chain-of-thought words in the target language.

Layer L1 (pure Python). R1 adds this reward to stop language mixing in the reasoning; the paper
does not define "word", so this module does, by script (no language identification model: it
must be cheap enough for thousands of completions per rollout and deterministic):

- a Latin word is a run of Latin letters (ASCII, accented, full-width), with inner apostrophes or
  hyphens ("don't", "well-known"); it counts for `en`;
- every CJK ideograph (Han character) is one word, since Chinese is written without spaces; it
  counts for `zh`;
- a run of letters of any other script (Cyrillic, kana, Hangul, ...) is one word, counting for
  neither language;
- neutral, counting for neither and against neither: digits, punctuation, operators and other
  symbols, LaTeX commands (`\\frac`), Greek letters, single Latin letters (variables such as x, n;
  the English "a" and "I" are lost too, a negligible bias) and the function names in
  MATH_FUNCTION_NAMES.

The chain of thought is the text up to the first `</think>` (after `<think>` if present, so the
R1 chat template that opens the think block in the prompt works too). The reward is
target words / counted words. A reasoning with no counted words at all (pure arithmetic such as
"7 + 5 = 12") scores 1, since nothing in it is in another language; a blank or missing think
block scores 0, since there is no chain of thought to be consistent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_r1.reward.types import Language, Sample

MATH_FUNCTION_NAMES = frozenset({
    "sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh",
    "tanh", "log", "ln", "lg", "exp", "lim", "max", "min", "gcd", "lcm", "mod", "det", "sqrt",
})
"""Latin-letter tokens that are notation, not English, and so count for neither language."""

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_LATIN = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff\uff21-\uff3a\uff41-\uff5a"
_GREEK = "\u0370-\u03ff\u1f00-\u1fff"
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(
    rf"(?P<han>[{_HAN}])"
    rf"|(?P<latin>[{_LATIN}]+(?:['’\-][{_LATIN}]+)*)"
    rf"|(?P<greek>[{_GREEK}]+)"
    # [^\W\d_] is "a letter of any script"; the lookahead leaves the three scripts above out.
    rf"|(?P<other>(?:(?![{_HAN}{_LATIN}{_GREEK}])[^\W\d_])+)"
)


@dataclass(frozen=True, slots=True)
class WordCounts:
    """Counted words of a text, by script (neutral tokens are not counted)."""

    latin: int
    han: int
    other: int

    @property
    def total(self) -> int:
        return self.latin + self.han + self.other


def count_words(text: str) -> WordCounts:
    """Count the words of a text by script, with the tokenisation of the module docstring.

    Args:
        text: Any text, e.g. a chain of thought.

    Returns:
        Latin words, Han characters and other-script words.
    """
    latin = han = other = 0
    for match in _WORD.finditer(_LATEX_COMMAND.sub(" ", text)):
        kind = match.lastgroup
        if kind == "han":
            han += 1
        elif kind == "latin":
            word = match.group()
            if len(word) > 1 and word.lower() not in MATH_FUNCTION_NAMES:
                latin += 1
        elif kind == "other":
            other += 1
    return WordCounts(latin=latin, han=han, other=other)


def chain_of_thought(completion: str) -> str | None:
    """The reasoning of a completion: the text before the first `</think>`, after `<think>`.

    Args:
        completion: The generated text.

    Returns:
        The reasoning text, or None when there is no `</think>`.
    """
    reasoning, closed, _ = completion.partition("</think>")
    if not closed:
        return None
    return reasoning.partition("<think>")[2] if "<think>" in reasoning else reasoning


def language_consistency(reasoning: str, language: Language) -> float:
    """The share of a reasoning's counted words that are in `language`.

    Args:
        reasoning: The chain of thought.
        language: `en` counts Latin words, `zh` counts Han characters.

    Returns:
        A value in [0, 1]; 1.0 when the text has no counted words but is not blank, 0.0 when
        it is blank.

    Raises:
        ValueError: for a language other than `en` or `zh`.
    """
    if language not in ("en", "zh"):
        raise ValueError(f"target_language={language!r}: expected 'en' or 'zh'")
    if not reasoning.strip():
        return 0.0
    counts = count_words(reasoning)
    if counts.total == 0:
        return 1.0
    target = counts.latin if language == "en" else counts.han
    return target / counts.total


def language_reward(completion: str, sample: Sample) -> float:
    """The language consistency of the completion's chain of thought.

    Args:
        completion: The generated text.
        sample: Uses `sample.target_language`.

    Returns:
        A value in [0, 1]; 0.0 when the completion has no closed think block.
    """
    reasoning = chain_of_thought(completion)
    if reasoning is None:
        return 0.0
    return language_consistency(reasoning, sample.target_language)
