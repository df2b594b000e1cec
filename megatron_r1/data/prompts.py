"""Questions with reference answers: what GRPO samples from and evaluation scores against.

Layer L1. Two sources, as for SFT: the built-in arithmetic task (train and held-out splits of
data.py's generator) or a JSONL file of {"prompt": ..., "answer": ...} objects (errors name
the file and line). Prompts are rendered with the configured template and tokenized once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from megatron_r1.config.schema import DataConfig
from megatron_r1.data.arithmetic import arithmetic_splits
from megatron_r1.data.template import render_prompt


@dataclass(frozen=True, slots=True)
class PromptExample:
    prompt: str
    """The full prompt text (template applied)."""
    answer: str
    """The reference answer the accuracy reward compares with."""
    prompt_ids: tuple[int, ...]
    """Token ids of the prompt as the engine receives them (with bos when the tokenizer
    adds one)."""


def read_prompt_jsonl(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from a JSONL file; the errors name file and line."""
    pairs = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON: {err.msg}") from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected an object, got {type(row).__name__}")
        for key in ("prompt", "answer"):
            if not isinstance(row.get(key), str | int | float) or isinstance(row.get(key), bool):
                raise ValueError(f"{path}:{number}: key {key!r} missing or not a string/number")
        pairs.append((str(row["prompt"]), str(row["answer"])))
    if not pairs:
        raise ValueError(f"{path}: no prompts")
    return pairs


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
        return [PromptExample(t, a, tuple(i)) for t, (_, a), i in zip(texts, pairs, ids)]

    return encode(train), encode(held_out)
