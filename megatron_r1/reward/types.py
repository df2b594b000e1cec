"""The reward seam: what a reward function is given (`Sample`) and what it is (`RewardFn`).

Layer L1 (pure Python). A reward is a plain function `(completion, sample) -> float`; the GRPO
loop builds one `Sample` per prompt from the prompt data and the reward config. `Sample` is
small, frozen and picklable because it travels to the reward worker processes with every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Language = Literal["en", "zh"]
"""Target language of the chain of thought: `en` (Latin script) or `zh` (CJK ideographs)."""


@dataclass(frozen=True, slots=True)
class CodeTest:
    """One test of a code prompt: what the program reads on stdin and must print."""

    input: str
    output: str


@dataclass(frozen=True, slots=True)
class Sample:
    """What the rule rewards know about the prompt a completion answers."""

    answer: str | None = None
    """Reference final answer as text, e.g. "36", "-3", "\\frac{1}{2}", "50\\%"; None for a
    prompt without one (the accuracy reward then raises, and scores 0 as an error)."""
    target_language: Language = "en"
    """Language the chain of thought should be written in (RewardConfig.target_language)."""
    tests: tuple[CodeTest, ...] = ()
    """A code prompt's tests; non-empty makes the accuracy reward run the completion's program
    (megatron_r1.reward.code) instead of comparing math answers."""


class RewardFn(Protocol):
    """A reward component: a pure function of one completion and its sample.

    Implementations must be picklable by reference (module-level functions, or instances of
    module-level classes): the scorer runs them in worker processes. They may raise; the scorer
    turns an exception or an overrun of its time limit into a 0 for that component.
    """

    def __call__(self, completion: str, sample: Sample, /) -> float:
        """Score one completion.

        Args:
            completion: The policy's generated text (prompt excluded, special tokens removed).
            sample: The prompt's reference data.

        Returns:
            The reward, typically in [0, 1].
        """
        ...
