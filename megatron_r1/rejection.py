"""Which sampled outputs rejection sampling keeps (R1_RECIPE.md section 5, stage 3).

Layer L1 (pure, given scored outputs). DeepSeek-R1 samples several outputs per reasoning prompt
from the RL checkpoint and keeps only the correct and readable ones; the paper names the
readability filters (mixed languages, long paragraphs, code blocks in the chain of thought) but
not their thresholds, so each is a `sample.*` setting. Every output gets exactly one verdict,
the first rule it fails in this order, so the report's counts add up to the outputs sampled:

    truncated       hit max_new_tokens (the answer may be cut off)
    reward_failed   the accuracy verifier raised or timed out: not known to be correct
    incorrect       accuracy reward below 1
    format          format reward below 1 (with sample.require_format)
    mixed_language  language reward below sample.min_language_share
    code_block      a fenced code block in the chain of thought
    long_paragraph  a chain-of-thought paragraph longer than sample.max_paragraph_chars
    duplicate       the same text as an output already kept for this prompt
    over_quota      the prompt already has sample.keep_per_prompt outputs
    kept
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_r1.config.schema import SampleConfig
from megatron_r1.data.prompts import PromptExample
from megatron_r1.reward.language import chain_of_thought
from megatron_r1.reward.pool import Outcome
from megatron_r1.reward.scoring import RewardBatch
from megatron_r1.rollout.types import Completion

KEPT = "kept"
VERDICTS = ("truncated", "reward_failed", "incorrect", "format", "mixed_language", "code_block",
            "long_paragraph", "duplicate", "over_quota", KEPT)

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True, slots=True)
class KeptOutput:
    """One line of the data set: what `megatron-r1 sft` reads back (data.source=jsonl)."""

    prompt: str
    """The question without the template (SFT applies data.template, as GRPO did)."""
    completion: str
    answer: str

    def record(self) -> dict[str, str]:
        return {"prompt": self.prompt, "completion": self.completion, "answer": self.answer}


def readability_problem(text: str, cfg: SampleConfig) -> str | None:
    """The first readability filter the chain of thought fails (code block, long paragraph),
    or None. A missing chain of thought is the format rule's business, not this one's."""
    reasoning = chain_of_thought(text)
    if reasoning is None:
        return None
    if cfg.reject_code_blocks and "```" in reasoning:
        return "code_block"
    if cfg.max_paragraph_chars and any(
            len(p.strip()) > cfg.max_paragraph_chars for p in _PARAGRAPH_BREAK.split(reasoning)):
        return "long_paragraph"
    return None


def select_outputs(questions: Sequence[PromptExample], groups: Sequence[Sequence[Completion]],
                   rewards: RewardBatch, cfg: SampleConfig
                   ) -> tuple[list[KeptOutput], Counter[str]]:
    """Judge every output of every question; return the kept ones and the count per verdict.

    Args:
        questions: Q prompts.
        groups: Q groups of k outputs each, as the engine returned them.
        rewards: The scored Q x k outputs, row-major (question, then sample), with the
            accuracy, format and language components.
        cfg: The filters.
    """
    if len(groups) != len(questions):
        raise ValueError(f"{len(groups)} groups of outputs for {len(questions)} questions")
    accuracy = rewards.components_N["accuracy"].tolist()
    accuracy_outcome = rewards.outcomes_N["accuracy"].tolist()
    fmt = rewards.components_N["format"].tolist()
    language = rewards.components_N["language"].tolist()
    verdicts: Counter[str] = Counter()
    kept: list[KeptOutput] = []
    i = 0
    for question, group in zip(questions, groups):
        texts_kept: set[str] = set()
        for output in group:
            verdict = _verdict(output, accuracy[i], accuracy_outcome[i], fmt[i], language[i],
                               cfg, texts_kept)
            i += 1
            verdicts[verdict] += 1
            if verdict == KEPT:
                texts_kept.add(output.text)
                kept.append(KeptOutput(question.question, output.text, question.answer))
    if i != len(accuracy):
        raise ValueError(f"{len(accuracy)} scored outputs for {i} sampled ones")
    return kept, verdicts


def _verdict(output: Completion, accuracy: float, accuracy_outcome: int, fmt: float,
             language: float, cfg: SampleConfig, texts_kept: set[str]) -> str:
    if output.finish_reason == "length":
        return "truncated"
    if accuracy_outcome != Outcome.OK:
        return "reward_failed"
    if accuracy < 1.0:
        return "incorrect"
    if cfg.require_format and fmt < 1.0:
        return "format"
    if language < cfg.min_language_share:
        return "mixed_language"
    problem = readability_problem(output.text, cfg)
    if problem is not None:
        return problem
    if output.text in texts_kept:
        return "duplicate"
    if cfg.keep_per_prompt is not None and len(texts_kept) >= cfg.keep_per_prompt:
        return "over_quota"
    return KEPT
