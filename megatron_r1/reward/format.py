"""The format reward: 1 for the exact R1-Zero layout `<think> ... </think> <answer> ... </answer>`.

Layer L1 (pure Python). The key decision is what "exactly" allows, and each allowance has a
reason:

- whitespace (any, including none) before `<think>`, between `</think>` and `<answer>`, and
  after `</answer>`: the template's prompt ends in "Assistant:" so a completion usually starts
  with a space, tokenizers differ in how they split spaces and newlines around tags, and
  trailing newlines are harmless;
- anything inside the blocks except another tag (an empty think block is allowed: the reward
  judges layout, the language reward judges the reasoning);
- nothing else: no text before `<think>` or after `</answer>` (the model must stop after its
  answer; a completion cut off at the length limit scores 0), exactly one block of each, tags in
  lower case, and a non-blank answer.

The rollout engine must hand over the text without special tokens (EOS), as vLLM does by default.
"""

from __future__ import annotations

import re

from megatron_r1.reward.types import Sample

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
"""The four tags of the R1-Zero template."""

_LAYOUT = re.compile(r"\A\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*\Z", re.DOTALL)


def has_r1_zero_format(completion: str) -> bool:
    """Whether a completion is exactly one think block followed by one non-blank answer block.

    Args:
        completion: The generated text.

    Returns:
        True when the layout is right (see the module docstring for the whitespace rules).
    """
    match = _LAYOUT.match(completion)
    if match is None:
        return False
    think, answer = match.groups()
    if any(tag in think or tag in answer for tag in TAGS):
        return False
    return bool(answer.strip())


def format_reward(completion: str, sample: Sample) -> float:
    """1.0 for the R1-Zero layout, else 0.0.

    Args:
        completion: The generated text.
        sample: Unused (the layout is the same for every prompt).

    Returns:
        1.0 or 0.0.
    """
    del sample
    return 1.0 if has_r1_zero_format(completion) else 0.0
