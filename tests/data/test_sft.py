"""SFT data: JSONL errors, Megatron's label/mask layout, DP-invariant and resumable batches."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from megatron_r1.batching import (
    MicroBatching,
    MicroBatchPlan,
    build_microbatch,
    plan_microbatches,
)
from megatron_r1.config.schema import DataConfig
from megatron_r1.data.sft import (
    SFTBatchSource,
    SFTDataset,
    SFTExample,
    StepBatch,
    arithmetic_examples,
    cut_dataset,
    epoch_permutation,
    read_jsonl,
    sft_datasets,
    tokenize_sft,
)
from megatron_r1.data.template import render_prompt
from megatron_r1.data.token_store import from_sequences

# ----------------------------------------------------------------------------- JSONL


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = json.dumps({"prompt": "Compute 1 + 2", "completion": "<answer> 3 </answer>"})


def test_read_jsonl_skips_blank_lines_and_ignores_extra_keys(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [GOOD, "", json.dumps(
        {"prompt": "p", "completion": "c", "answer": 3})])
    assert read_jsonl(path) == [SFTExample("Compute 1 + 2", "<answer> 3 </answer>"),
                                SFTExample("p", "c")]


@pytest.mark.parametrize(("bad_line", "message"), [
    ('{"prompt": "p", "completion": ', r"invalid JSON: Expecting value \(column 31\)"),
    ('["p", "c"]', r"expected an object with keys 'prompt' and 'completion', got a JSON list"),
    ('{"prompt": "p"}', r"missing key 'completion'"),
    ('{"completion": "c"}', r"missing key 'prompt'"),
    ('{"prompt": 7, "completion": "c"}', r"'prompt' must be a string, got int 7"),
    ('{"prompt": "p", "completion": null}', r"'completion' must be a string, got NoneType None"),
])
def test_read_jsonl_errors_name_file_and_line(tmp_path: Path, bad_line: str,
                                              message: str) -> None:
    # Line 4: the blank line 2 still counts, as in an editor.
    path = _write(tmp_path / "d.jsonl", [GOOD, "", GOOD, bad_line, GOOD])
    with pytest.raises(ValueError, match=rf"^{path}:4: {message}"):
        read_jsonl(path)


def test_read_jsonl_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=rf"{tmp_path / 'missing.jsonl'}: no such file"):
        read_jsonl(tmp_path / "missing.jsonl")
    empty = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=rf"{empty}: holds no examples"):
        read_jsonl(empty)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(GOOD.encode() + b"\n" + '{"prompt": "é", "completion": "c"}'.encode(
        "latin-1") + b"\n")
    with pytest.raises(ValueError, match=rf"{latin1}:2: not UTF-8"):
        read_jsonl(latin1)


def test_jsonl_source_applies_the_template(
        tmp_path: Path, arithmetic_tokenizer: PreTrainedTokenizerFast) -> None:
    tok = arithmetic_tokenizer
    path = _write(tmp_path / "d.jsonl", [GOOD])
    for template in ("r1_zero", "none"):
        data = DataConfig(source="jsonl", path=str(path), template=template, seq_length=256)
        train, evaluation = sft_datasets(data, tok, seed=0)
        prompt = tok(render_prompt("Compute 1 + 2", template), add_special_tokens=False)
        completion = tok("<answer> 3 </answer>", add_special_tokens=False)
        assert train.ids(0).tolist() == [tok.bos_token_id, *prompt["input_ids"],
                                         *completion["input_ids"], tok.eos_token_id]
        assert evaluation is None


# ----------------------------------------------------------------------------- tokenisation


def test_sample_layout_and_loss_mask(arithmetic_tokenizer: PreTrainedTokenizerFast) -> None:
    tok = arithmetic_tokenizer
    example = SFTExample(render_prompt("Compute 12 + 3", "r1_zero"),
                         "<think> 12 + 3 = 15 </think> <answer> 15 </answer>")
    prompt_ids = tok(example.prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tok(example.completion, add_special_tokens=False)["input_ids"]
    seq = 64
    data = tokenize_sft([example], tok, seq)
    ids = [tok.bos_token_id, *prompt_ids, *completion_ids, tok.eos_token_id]
    padded = ids + [tok.pad_token_id] * (seq + 1 - len(ids))
    dense = data.batch(MicroBatchPlan((0,), length=seq))  # the row padded to S positions
    assert dense["tokens"].shape == dense["labels"].shape == dense["loss_mask"].shape == (1, seq)
    assert dense["tokens"].dtype == dense["labels"].dtype == torch.int64
    assert dense["loss_mask"].dtype == torch.float32
    assert dense["tokens"][0].tolist() == padded[:-1]
    assert dense["labels"][0].tolist() == padded[1:]
    # Loss exactly on the labels that are completion tokens or eos, in one contiguous run.
    mask = dense["loss_mask"][0]
    start = len(prompt_ids)  # label at position len(bos + prompt) - 1 is the first completion id
    expected = torch.zeros(seq)
    expected[start:start + len(completion_ids) + 1] = 1.0
    assert torch.equal(mask, expected)
    learned = dense["labels"][0][mask.bool()].tolist()
    assert learned == [*completion_ids, tok.eos_token_id]
    assert tok.decode(learned, skip_special_tokens=True) == example.completion
    assert tok.decode(dense["tokens"][0][: start + 1].tolist(), skip_special_tokens=True) == (
        example.prompt)
    assert data.loss_tokens_N.tolist() == [len(completion_ids) + 1]
    assert data.length_N.tolist() == [len(ids) - 1]
    batch = data.batch(MicroBatchPlan((0, 0), length=seq))
    assert torch.equal(batch["position_ids"], torch.arange(seq).repeat(2, 1))
    trimmed = data.batch(MicroBatchPlan((0,), length=len(ids) - 1))  # its own longest row
    assert trimmed["tokens"][0].tolist() == ids[:-1] and trimmed["loss_mask"].sum() == mask.sum()


def test_too_long_examples_are_dropped_counted_and_logged(
        arithmetic_tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture) -> None:
    short = SFTExample("Compute 1 + 2", "<answer> 3 </answer>")
    long = SFTExample("Compute " + " + ".join(["1"] * 30), "<answer> 30 </answer>")
    # bos + prompt + completion + eos = S + 1 ids fits exactly: the last id is only a label.
    seq = sum(len(arithmetic_tokenizer(text, add_special_tokens=False)["input_ids"])
              for text in (short.prompt, short.completion)) + 1
    with caplog.at_level(logging.WARNING, logger="megatron_r1.data.sft"):
        data = tokenize_sft([long, short, long], arithmetic_tokenizer, seq)
    assert len(data) == 1 and data.num_dropped == 2
    assert "dropped 2 of 3 SFT examples longer than seq_length + 1" in caplog.text
    dense = data.batch(MicroBatchPlan((0,), length=seq))
    assert dense["loss_mask"][0, -1] == 1.0 and dense["labels"][0, -1] == (
        arithmetic_tokenizer.eos_token_id)
    with pytest.raises(ValueError, match=r"all 2 examples are longer than seq_length=8 allows "
                                         r"\(9 ids with bos and eos; the shortest needs \d+\)"):
        tokenize_sft([long, short], arithmetic_tokenizer, 8)


def test_default_arithmetic_examples_all_fit(arithmetic_tokenizer: PreTrainedTokenizerFast) -> None:
    data = DataConfig()
    train, evaluation = sft_datasets(data, arithmetic_tokenizer, seed=1234)
    assert evaluation is not None
    assert (len(train), len(evaluation)) == (data.num_train_samples, data.num_eval_samples)
    assert train.num_dropped == 0 and evaluation.num_dropped == 0
    assert train.seq_length == data.seq_length
    examples, _ = arithmetic_examples(data, seed=1234)
    assert examples[0].prompt.endswith(". Assistant:")
    assert examples[0].completion.startswith("<think> ")


# ----------------------------------------------------------------------------- batches


def _dataset(n: int, seq: int = 6, lengths: list[int] | None = None) -> SFTDataset:
    """Row i is recognisable: its ids are 100 i + position, so tokens = 100 i + position and
    labels = tokens + 1; its loss covers its last i % seq + 1 positions (a per-row count);
    every row uses all seq positions unless `lengths` says otherwise."""
    lengths = lengths or [seq] * n
    ids = [[100 * i + p for p in range(m + 1)] for i, m in enumerate(lengths)]
    starts = [m - min(i % seq + 1, m) for i, m in enumerate(lengths)]
    return cut_dataset(from_sequences(ids, starts, pad_id=0), range(n), seq)


def _row(data: SFTDataset, r: int) -> tuple[list[int], list[int], list[float]]:
    """Sample r's tokens, labels and loss mask over its positions (what the test built)."""
    ids = data.ids(r).tolist()
    n = len(ids) - 1
    start = n - min(r % data.seq_length + 1, n)
    return ids[:-1], ids[1:], [0.0] * start + [1.0] * (n - start)


def _flat(lists: list[list[int]]) -> list[int]:
    return list(itertools.chain.from_iterable(lists))


def _indices(step: StepBatch) -> list[int]:
    """The sample rows of one rank's step, in micro-batch order."""
    return _flat([mb["rows"].tolist() for mb in step.micro_batches])


def _global_order(steps: list[list[StepBatch]]) -> list[list[int]]:
    """Per step, the global batch as ranks see it, in Megatron's (micro-batch, rank) order."""
    out = []
    for per_rank in steps:
        order = []
        for m in range(len(per_rank[0].micro_batches)):
            for rank_step in per_rank:
                order += rank_step.micro_batches[m]["rows"].tolist()
        out.append(order)
    return out


def _run(data: SFTDataset, dp_size: int, steps: int, seed: int = 0, gbs: int = 8,
         mbs: int = 2) -> list[list[StepBatch]]:
    sources = [SFTBatchSource(data, global_batch_size=gbs, micro_batching=MicroBatching(mbs),
                              dp_rank=r, dp_size=dp_size, seed=seed) for r in range(dp_size)]
    return [[s.next_step() for s in sources] for _ in range(steps)]


def test_global_batch_does_not_depend_on_dp_size() -> None:
    data = _dataset(37)
    reference = _global_order(_run(data, 1, 12))  # 12 steps cross 2 epoch boundaries (4 per epoch)
    for dp_size in (2, 4):
        run = _run(data, dp_size, 12)
        assert _global_order(run) == reference
        for per_rank in run:
            ranks = [_indices(s) for s in per_rank]
            flat = _flat(ranks)
            assert len(set(flat)) == len(flat)  # ranks see disjoint samples
            assert all(len(r) == 8 // dp_size for r in ranks)
            # Every rank knows the global loss denominator without a collective.
            total = sum(float(mb["loss_mask"].sum()) for s in per_rank for mb in s.micro_batches)
            assert all(s.global_loss_tokens == total for s in per_rank)


def test_micro_batches_hold_the_indexed_rows() -> None:
    data = _dataset(20)
    step = _run(data, 2, 1, mbs=2, gbs=8)[0][1]
    assert len(step.micro_batches) == 2
    for mb in step.micro_batches:
        index = mb["rows"]
        assert mb["tokens"].shape == (2, 6)
        for b, r in enumerate(index.tolist()):
            tokens, labels, mask = _row(data, r)
            assert mb["tokens"][b].tolist() == tokens == [100 * r + p for p in range(6)]
            assert mb["labels"][b].tolist() == labels == [t + 1 for t in tokens]
            assert mb["loss_mask"][b].tolist() == mask


def test_epochs_are_shuffled_permutations_that_drop_the_tail() -> None:
    data = _dataset(37)
    order = _global_order(_run(data, 1, 8))
    epochs = [step.epoch for step in (s[0] for s in _run(data, 1, 8))]
    assert epochs == [0, 0, 0, 0, 1, 1, 1, 1]
    first, second = _flat(order[:4]), _flat(order[4:])
    assert len(set(first)) == 32 and len(set(second)) == 32  # no repeat inside an epoch
    assert first == epoch_permutation(37, 0, 0)[:32]
    assert first != second and first != sorted(first)
    assert sorted(epoch_permutation(37, 0, 5)) == list(range(37))


def test_order_is_deterministic_by_seed() -> None:
    data = _dataset(37)
    assert _global_order(_run(data, 1, 5, seed=3)) == _global_order(_run(data, 1, 5, seed=3))
    assert _global_order(_run(data, 1, 5, seed=3)) != _global_order(_run(data, 1, 5, seed=4))


@pytest.mark.parametrize(("dp_before", "dp_after"), [(1, 1), (2, 2), (1, 2), (4, 2)])
def test_resume_continues_the_uninterrupted_stream(dp_before: int, dp_after: int) -> None:
    data = _dataset(37)
    straight = _global_order(_run(data, dp_after, 11))

    before = [SFTBatchSource(data, global_batch_size=8, micro_batching=MicroBatching(2), dp_rank=r,
                             dp_size=dp_before, seed=0) for r in range(dp_before)]
    for _ in range(5):  # stop mid-epoch 1
        for s in before:
            s.next_step()
    state = json.loads(json.dumps(before[0].state_dict()))  # survives a checkpoint file
    assert all(s.state_dict() == state for s in before)
    assert state == {"epoch": 1, "epoch_consumed_samples": 8, "consumed_samples": 40, "seed": 0,
                     "num_samples": 37}

    after = [SFTBatchSource(data, global_batch_size=8, micro_batching=MicroBatching(2), dp_rank=r,
                            dp_size=dp_after, seed=0) for r in range(dp_after)]
    for s in after:
        s.load_state_dict(state)
    resumed = _global_order([[s.next_step() for s in after] for _ in range(6)])
    assert resumed == straight[5:]
    assert [after[0].dataset.ids(r).tolist() for r in resumed[0]] == [
        data.ids(r).tolist() for r in straight[5]]


def test_load_state_dict_rejects_another_stream() -> None:
    source = SFTBatchSource(_dataset(37), global_batch_size=8, micro_batching=MicroBatching(2), dp_rank=0,
                            dp_size=1, seed=0)
    state = source.state_dict()
    with pytest.raises(ValueError, match=r"saved seed=0 differs from this run's seed=1"):
        SFTBatchSource(_dataset(37), global_batch_size=8, micro_batching=MicroBatching(2), dp_rank=0,
                       dp_size=1, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"saved num_samples=37 differs from this run's "
                                         r"num_samples=40"):
        SFTBatchSource(_dataset(40), global_batch_size=8, micro_batching=MicroBatching(2), dp_rank=0,
                       dp_size=1, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match=r"missing key 'epoch'"):
        source.load_state_dict({k: v for k, v in state.items() if k != "epoch"})
    with pytest.raises(ValueError, match=r"epoch_consumed_samples=99 is outside 0..37"):
        source.load_state_dict({**state, "epoch_consumed_samples": 99})


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(global_batch_size=8, micro_batch_size=2, dp_rank=0, dp_size=3),
     r"train.global_batch_size=8: must be a positive multiple of train.micro_batch_size x "
     r"data-parallel size = 2 x 3"),
    (dict(global_batch_size=40, micro_batch_size=2, dp_rank=0, dp_size=1),
     r"train.global_batch_size=40: larger than the 37 samples"),
    (dict(global_batch_size=8, micro_batch_size=2, dp_rank=2, dp_size=2),
     r"dp_rank=2, dp_size=2: need 0 <= dp_rank < dp_size"),
    (dict(global_batch_size=8, micro_batch_size=0, dp_rank=0, dp_size=1),
     r"train.micro_batch_size=0: must be >= 1"),
])
def test_batch_source_rejects_bad_layouts(kwargs: dict[str, int], message: str) -> None:
    how = MicroBatching(kwargs.pop("micro_batch_size"))
    with pytest.raises(ValueError, match=message):
        SFTBatchSource(_dataset(37), seed=0, micro_batching=how, **kwargs)


@pytest.mark.parametrize("pack", [False, True])
def test_a_token_budget_keeps_the_global_batch_and_the_loss_denominator(pack: bool) -> None:
    data = _dataset(37, seq=12, lengths=[i % 12 + 1 for i in range(37)])  # varied lengths
    fixed = _run(data, 2, 3)
    how = MicroBatching(2, max_tokens=16, pack=pack)
    sources = [SFTBatchSource(data, global_batch_size=8, micro_batching=how, dp_rank=r,
                              dp_size=2, seed=0) for r in range(2)]
    budget = [[s.next_step() for s in sources] for _ in range(3)]
    for by_fixed, by_budget in zip(fixed, budget):
        assert sorted(_flat([_indices(s) for s in by_fixed])) == sorted(
            _flat([_indices(s) for s in by_budget]))  # the same samples in the step
        assert by_fixed[0].global_loss_tokens == by_budget[0].global_loss_tokens
        assert len(by_budget[0].micro_batches) == len(by_budget[1].micro_batches)
        for mb in (mb for s in by_budget for mb in s.micro_batches):
            assert mb["tokens"].numel() <= 16
            if not pack:  # padded only to its own longest row
                assert mb["tokens"].shape[1] == int(mb["lengths"].max())
        if pack:
            assert by_budget[0].padding_fraction == 0.0


def _dense_reference(data: SFTDataset, pad: int) -> dict[str, torch.Tensor]:
    """The former layout, as the executable spec of `SFTDataset.batch`: every sample's ids
    padded to S + 1 with the pad id, tokens = [:, :-1], labels = [:, 1:], float32 mask."""
    seq = data.seq_length
    ids_NL = torch.full((len(data), seq + 1), pad, dtype=torch.int64)
    mask_NS = torch.zeros(len(data), seq)
    for i in range(len(data)):
        ids = torch.from_numpy(data.ids(i).astype("int64"))
        ids_NL[i, :len(ids)] = ids
        n = len(ids) - 1
        mask_NS[i, n - int(data.loss_tokens_N[i]):n] = 1.0
    return {"tokens": ids_NL[:, :-1], "labels": ids_NL[:, 1:], "loss_mask": mask_NS}


@pytest.mark.parametrize("how", [
    MicroBatching(3), MicroBatching(3, multiple_of=4), MicroBatching(3, max_tokens=40),
    MicroBatching(3, max_tokens=40, pack=True, multiple_of=4), MicroBatching(3, uniform=True),
], ids=["padded", "rounded-past-S", "budget", "packed", "uniform"])
def test_batches_equal_the_dense_layout(how: MicroBatching) -> None:
    """Micro-batches built from the token store are bitwise the micro-batches of the former
    dense [N, S] tensors (megatron_r1.batching.build_microbatch over them), also where a
    length rounds up past S, for repeated rows and for packed ones."""
    lengths = [1, 5, 9, 10, 3, 7, 10, 2, 8, 6, 4, 10]  # S = 10: several rows fill it
    ids = [[7 + 13 * i + p for p in range(m + 1)] for i, m in enumerate(lengths)]
    data = cut_dataset(from_sequences(ids, [m // 2 for m in lengths], pad_id=99),
                       range(len(lengths)), 10)
    dense = _dense_reference(data, pad=99)
    index = [3, 0, 11, 6, 6, 2, 9, 1, 8, 5, 4, 10]  # a repeated row too
    for plan in (p for rank in plan_microbatches(index, data.length_N[index].tolist(), 2, how)
                 for p in rank):
        want = build_microbatch(plan, data.length_N, per_token=dense)
        got = data.batch(plan)
        assert sorted(got) == sorted(want)
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
