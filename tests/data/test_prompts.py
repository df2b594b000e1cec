"""GRPO prompts from a JSONL file: math and code prompts, templated and tokenized, no held-out
split (an empty split must not reach the tokenizer, which raises on an empty batch)."""

from __future__ import annotations

import json

from megatron_r1.config.schema import DataConfig
from megatron_r1.data.prompts import prompt_splits
from megatron_r1.data.template import render_prompt


def test_jsonl_prompts_are_templated_and_tokenized(tmp_path, arithmetic_tokenizer):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Compute 3 + 4", "answer": "7"},
        {"prompt": "Compute 2 * 5", "tests": [{"input": "2 5", "output": "10"}]},
    ]) + "\n")
    data = DataConfig(source="jsonl", path=str(path), template="r1_zero")
    train, held_out = prompt_splits(data, arithmetic_tokenizer)
    assert held_out == []
    assert [(q.question, q.answer, q.tests) for q in train] == [
        ("Compute 3 + 4", "7", ()), ("Compute 2 * 5", "", (("2 5", "10"),))]
    for q in train:
        assert q.prompt == render_prompt(q.question, "r1_zero")
        assert list(q.prompt_ids) == arithmetic_tokenizer(q.prompt)["input_ids"]
