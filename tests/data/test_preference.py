"""Reward-model data: JSONL errors by file:line, the scored ids and their cut, the generated
preference sets, and batches in which a pair never splits."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from megatron_r1.batching import MicroBatching
from megatron_r1.config.schema import DataConfig
from megatron_r1.data.arithmetic import arithmetic_splits, write_solution
from megatron_r1.data.preference import (
    LabelledResponse,
    PreferencePair,
    arithmetic_labels,
    arithmetic_pairs,
    preference_examples,
    read_pairwise_jsonl,
    read_pointwise_jsonl,
    reward_input_ids,
)
from megatron_r1.data.reward_batches import RewardBatchSource, eval_microbatches, tokenize_rewards
from megatron_r1.data.template import render_prompt


def _write(path: Path, objects: list[object]) -> Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n"
                            for o in objects))
    return path


PAIR = {"prompt": "Compute 1 + 2", "chosen": "<answer> 3 </answer>", "rejected": "<answer> 4 </answer>"}


def test_pairwise_lines_are_read_and_bad_lines_named(tmp_path):
    good = _write(tmp_path / "p.jsonl", [PAIR, "", {**PAIR, "extra": 1}])
    assert read_pairwise_jsonl(good) == [PreferencePair(**PAIR)] * 2
    bad = _write(tmp_path / "bad.jsonl", [PAIR, {"prompt": "x", "chosen": "y"}])
    with pytest.raises(ValueError, match=rf"^{bad}:2: missing key 'rejected'$"):
        read_pairwise_jsonl(bad)


@pytest.mark.parametrize(("label", "message"), [
    (0.5, r"'label': must be 0, 1, false or true, got float 0.5"),
    ("1", r"'label': must be 0, 1, false or true, got str '1'"),
    (2, r"'label': must be 0, 1, false or true, got int 2"),
])
def test_pointwise_labels_are_checked_by_line(tmp_path, label, message):
    line = {"prompt": "p", "response": "r", "label": label}
    path = _write(tmp_path / "l.jsonl", [{"prompt": "p", "response": "r", "label": True}, line])
    with pytest.raises(ValueError, match=rf"^{path}:2: {message}$"):
        read_pointwise_jsonl(path)


def test_pointwise_lines_take_booleans_and_need_a_label(tmp_path):
    path = _write(tmp_path / "l.jsonl", [{"prompt": "p", "response": "r", "label": False},
                                         {"prompt": "p", "response": "s", "label": 1}])
    assert read_pointwise_jsonl(path) == [LabelledResponse("p", "r", 0), LabelledResponse("p", "s", 1)]
    missing = _write(tmp_path / "m.jsonl", [{"prompt": "p", "response": "r"}])
    with pytest.raises(ValueError, match=rf"^{missing}:1: missing key 'label'$"):
        read_pointwise_jsonl(missing)


def test_reward_input_ids_are_bos_prompt_response_eos(arithmetic_tokenizer):
    tok = arithmetic_tokenizer
    prompt = tok("Compute 12 + 3", add_special_tokens=False)["input_ids"]
    response = tok(" <answer> 15 </answer>", add_special_tokens=False)["input_ids"]
    full = [tok.bos_token_id, *prompt, *response, tok.eos_token_id]
    assert reward_input_ids(tok, "Compute 12 + 3", " <answer> 15 </answer>", 100) == full
    assert reward_input_ids(tok, "Compute 12 + 3", " <answer> 15 </answer>", len(full)) == full


def test_too_long_cuts_the_prompt_start_then_the_response_start(arithmetic_tokenizer):
    tok = arithmetic_tokenizer
    prompt = tok("Compute 12 + 3", add_special_tokens=False)["input_ids"]
    response = tok(" <answer> 15 </answer>", add_special_tokens=False)["input_ids"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert len(prompt) > 2
    short = len(response) + 2 + 2  # room for two prompt ids
    assert reward_input_ids(tok, "Compute 12 + 3", " <answer> 15 </answer>", short) == [
        bos, *prompt[-2:], *response, eos]
    assert reward_input_ids(tok, "Compute 12 + 3", " <answer> 15 </answer>", 5) == [
        bos, *response[-3:], eos]
    with pytest.raises(ValueError, match="max_length=2: no room for a response"):
        reward_input_ids(tok, "p", "r", 2)


DATA = DataConfig(num_train_samples=64, num_eval_samples=16, arithmetic_max_operand=10)


def test_arithmetic_pairs_prefer_the_correct_answer_with_the_same_steps():
    train, held_out = arithmetic_pairs(DATA, seed=3)
    splits = arithmetic_splits(DATA, seed=3)
    assert len(train) == 64 and len(held_out) == 16
    for pair, problem in zip(train, splits.train):
        assert pair.prompt == problem.question and pair.chosen == write_solution(problem)
        steps, answer = pair.rejected.split("<answer>")
        assert steps == pair.chosen.split("<answer>")[0]
        assert int(answer.split()[0]) != problem.answer
    # the held-out pairs do not move when only the training set grows
    bigger = dataclasses.replace(DATA, num_train_samples=128)
    assert arithmetic_pairs(bigger, seed=3)[1] == held_out


def test_arithmetic_labels_say_whether_the_answer_is_correct():
    train, _ = arithmetic_labels(DATA, seed=3)
    for example, problem in zip(train, arithmetic_splits(DATA, seed=3).train):
        assert example.label == int(example.response == write_solution(problem))
    assert 20 <= sum(e.label for e in train) <= 44  # one half of 64, binomial sd 4


def test_preference_examples_apply_the_template(tmp_path):
    path = _write(tmp_path / "p.jsonl", [PAIR] * 4)
    data = DataConfig(source="jsonl", path=str(path), eval_fraction=0.25)
    train, held_out = preference_examples(data, "pairwise", seed=0)
    assert len(train) == 3 and len(held_out) == 1
    assert train[0].prompt == render_prompt(PAIR["prompt"], "r1_zero")


def _pairs_dataset(tok, count: int):
    train, _ = arithmetic_pairs(dataclasses.replace(DATA, num_train_samples=count), seed=1)
    return tokenize_rewards(train, tok, 64)


def test_pairs_stay_together_and_the_global_batch_ignores_dp(arithmetic_tokenizer):
    dataset = _pairs_dataset(arithmetic_tokenizer, 32)
    assert dataset.tokens_NS.shape == (64, 64) and len(dataset) == 32
    assert dataset.label_N[0::2].tolist() == [1.0] * 32 and dataset.label_N[1::2].sum() == 0
    how = MicroBatching(micro_batch_size=2)
    steps = {}
    for dp in (1, 2):
        sources = [RewardBatchSource(dataset, global_batch_size=8, micro_batching=how,
                                     dp_rank=r, dp_size=dp, seed=5) for r in range(dp)]
        rows = []
        for source in sources:
            for batch in source.next_step().micro_batches:
                assert batch["tokens"].shape[0] == 4  # 2 pairs = 4 sequences
                got = batch["rows"].tolist()
                assert got[1::2] == [r + 1 for r in got[0::2]] and got[0] % 2 == 0
                assert batch["label"].tolist() == [1.0, 0.0, 1.0, 0.0]
                rows += got
        steps[dp] = sorted(rows)
    assert steps[1] == steps[2] and len(steps[1]) == 16


def test_batch_source_resumes_and_refuses_token_budgets(arithmetic_tokenizer):
    dataset = _pairs_dataset(arithmetic_tokenizer, 32)
    how = MicroBatching(micro_batch_size=2)
    straight = RewardBatchSource(dataset, global_batch_size=8, micro_batching=how, dp_rank=0,
                                 dp_size=1, seed=5)
    expected = [straight.next_step() for _ in range(6)]  # crosses an epoch (32 / 8 = 4 steps)
    first = RewardBatchSource(dataset, global_batch_size=8, micro_batching=how, dp_rank=0,
                              dp_size=1, seed=5)
    for _ in range(3):
        first.next_step()
    resumed = RewardBatchSource(dataset, global_batch_size=8, micro_batching=how, dp_rank=0,
                                dp_size=1, seed=5)
    resumed.load_state_dict(first.state_dict())
    for want in expected[3:]:
        got = resumed.next_step()
        assert got.epoch == want.epoch
        assert all(torch.equal(g["rows"], w["rows"])
                   for g, w in zip(got.micro_batches, want.micro_batches))
    with pytest.raises(ValueError, match=r"train\.max_tokens_per_microbatch and "
                                         r"train\.pack_sequences: not supported"):
        RewardBatchSource(dataset, global_batch_size=8, dp_rank=0, dp_size=1, seed=5,
                          micro_batching=MicroBatching(micro_batch_size=2, max_tokens=256))


def test_eval_microbatches_cover_whole_rounds(arithmetic_tokenizer):
    dataset = _pairs_dataset(arithmetic_tokenizer, 10)
    how = MicroBatching(micro_batch_size=2)
    rows = [b["rows"].tolist() for r in range(2)
            for b in eval_microbatches(dataset, how, r, 2)]
    assert sorted(x for b in rows for x in b) == list(range(16))  # 8 of 10 pairs: 2 rounds
