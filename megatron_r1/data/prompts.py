"""Questions with reference answers: what GRPO samples from and evaluation scores against.

Layer L1. Two sources, as for SFT: the built-in arithmetic task (train and held-out splits of
data.py's generator) or a JSONL file of {"prompt": ..., "answer": ...} objects (errors name
the file and line). Prompts are rendered with the configured template and tokenized once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from megatron_r1.config.schema import DataConfig
from megatron_r1.data.arithmetic import arithmetic_splits
from megatron_r1.data.jsonl import read_jsonl_records
from megatron_r1.data.template import render_prompt


@dataclass(frozen=True, slots=True)
class PromptExample:
    question: str
    """The question as the data source holds it (no template)."""
    prompt: str
    """The full prompt text (template applied)."""
    answer: str
    """The reference answer the accuracy reward compares with."""
    prompt_ids: tuple[int, ...]
    """Token ids of the prompt as the engine receives them (with bos when the tokenizer
    adds one)."""


def read_prompt_jsonl(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from a JSONL file of {"prompt": ..., "answer": ...} strings; the
    errors name the file and line."""
    return [(r["prompt"], r["answer"]) for r in read_jsonl_records(path, ("prompt", "answer"))]


def prompt_splits(data: DataConfig, tokenizer: PreTrainedTokenizerBase
                  ) -> tuple[list[PromptExample], list[PromptExample]]:
    """(train, held-out) prompts; a JSONL source has no held-out split."""
    if data.source == "arithmetic":
        splits = arithmetic_splits(data, seed=data.seed)
        train = [(p.question, str(p.answer)) for p in splits.train]
        held_out = [(p.question, str(p.answer)) for p in splits.eval]
    else:
        assert data.path is not None
        train, held_out = read_prompt_jsonl(data.path), []

    def encode(pairs: list[tuple[str, str]]) -> list[PromptExample]:
        texts = [render_prompt(q, data.template) for q, _ in pairs]
        ids = tokenizer(texts)["input_ids"]
        return [PromptExample(q, t, a, tuple(i)) for t, (q, a), i in zip(texts, pairs, ids)]

    return encode(train), encode(held_out)
