"""GRPO prompts from a JSONL file: math and code prompts, templated and tokenized; held-out
prompts from data.eval_path or a seeded data.eval_fraction of the file (the same lines SFT
holds out), none without either (an empty split must not reach the tokenizer, which raises
on an empty batch)."""

from __future__ import annotations

import json

import pytest

from megatron_r1.config.schema import DataConfig
from megatron_r1.data.prompts import prompt_splits
from megatron_r1.data.sft import sft_datasets
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


def test_held_out_prompts_from_a_fraction_or_a_file(tmp_path, arithmetic_tokenizer):
    path = tmp_path / "prompts.jsonl"
    records = [{"prompt": f"Compute {i} + 1", "answer": str(i + 1), "completion": "x"}
               for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = DataConfig(source="jsonl", path=str(path), eval_fraction=0.25, seed=3)
    train, held_out = prompt_splits(data, arithmetic_tokenizer)
    assert (len(train), len(held_out)) == (15, 5)
    assert {q.question for q in train}.isdisjoint(q.question for q in held_out)
    assert [q.question for q in prompt_splits(data, arithmetic_tokenizer)[1]] == [
        q.question for q in held_out]  # deterministic under data.seed
    other = DataConfig(source="jsonl", path=str(path), eval_fraction=0.25, seed=4)
    assert [q.question for q in prompt_splits(other, arithmetic_tokenizer)[1]] != [
        q.question for q in held_out]
    # SFT reading the same file holds out the same lines
    _, sft_held_out = sft_datasets(DataConfig(source="jsonl", path=str(path), eval_fraction=0.25,
                                              seed=3, template="none"), arithmetic_tokenizer,
                                   seed=0)
    assert sft_held_out is not None
    tok = arithmetic_tokenizer
    assert [sft_held_out.ids(i).tolist() for i in range(len(sft_held_out))] == [
        [tok.bos_token_id, *tok(q.question, add_special_tokens=False)["input_ids"],
         *tok("x", add_special_tokens=False)["input_ids"], tok.eos_token_id] for q in held_out]
    # a separate held-out file
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text(json.dumps({"prompt": "Compute 9 + 9", "answer": "18"}) + "\n")
    data = DataConfig(source="jsonl", path=str(path), eval_path=str(eval_path))
    train, held_out = prompt_splits(data, arithmetic_tokenizer)
    assert len(train) == 20 and [q.answer for q in held_out] == ["18"]
    tiny = tmp_path / "one.jsonl"
    tiny.write_text(json.dumps(records[0]) + "\n")
    with pytest.raises(ValueError, match=r"data.eval_fraction=0.25 of the 1 records .* holds out 0"):
        prompt_splits(DataConfig(source="jsonl", path=str(tiny), eval_fraction=0.25),
                      arithmetic_tokenizer)
