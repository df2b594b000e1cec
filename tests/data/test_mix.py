"""The SFT data mix: weighted draws, DP-invariant and resumable streams, per-source splits."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from megatron_r1.batching import MicroBatching
from megatron_r1.config.schema import DataConfig, DataSourceConfig
from megatron_r1.data.mix import (
    DRAW_BLOCK,
    MixedBatchSource,
    MixSource,
    mix_sources,
    sft_batch_source,
    source_draws,
)
from megatron_r1.data.sft import (
    SFTBatchSource,
    SFTDataset,
    StepBatch,
    cut_dataset,
    epoch_permutation,
)
from megatron_r1.data.template import render_prompt
from megatron_r1.data.token_store import from_sequences

# ----------------------------------------------------------------------------- draws


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counts_per_source_follow_the_weights(seed: int) -> None:
    # Binomial tolerance: count_i ~ Binomial(n, p_i); |count_i - n p_i| < 4 sqrt(n p_i (1 - p_i))
    # (a false failure has probability ~6e-5 per source; the seeds are fixed anyway).
    weights, n = [3.0, 1.0, 0.5], 6000
    counts = [0, 0, 0]
    for source in source_draws(weights, seed, 0, n):
        counts[source] += 1
    for count, weight in zip(counts, weights):
        p = weight / sum(weights)
        assert abs(count - n * p) < 4 * math.sqrt(n * p * (1 - p)), (counts, weights)


def test_the_source_of_sample_k_depends_on_seed_weights_and_k_only() -> None:
    weights = [3.0, 1.0]
    whole = source_draws(weights, 7, 0, 2 * DRAW_BLOCK + 100)
    # Any window (across a block boundary too) is the same slice of the stream.
    assert source_draws(weights, 7, DRAW_BLOCK - 50, 200) == whole[DRAW_BLOCK - 50:
                                                                   DRAW_BLOCK + 150]
    assert source_draws(weights, 7, 5, 1) == whole[5:6]
    assert source_draws(weights, 8, 0, 500) != whole[:500]
    # Scaling the weights changes nothing: only their ratios are probabilities.
    assert source_draws([30.0, 10.0], 7, 0, 500) == whole[:500]


# ----------------------------------------------------------------------------- batches


def _dataset(n: int, base: int, seq: int = 6) -> SFTDataset:
    """Row i is recognisable: ids = base + 10 i + position (tokens too, labels = tokens + 1);
    1..seq loss tokens."""
    ids = [[base + 10 * i + p for p in range(seq + 1)] for i in range(n)]
    return cut_dataset(from_sequences(ids, [seq - (i % seq + 1) for i in range(n)], pad_id=0),
                       range(n), seq)


# 13 and 5 rows (weights 3:1): 12 steps of 8 draw ~72 and ~24 samples, so both sources wrap
# into new epochs at different steps.
SOURCES = [MixSource("reasoning", 3.0, _dataset(13, 0), None),
           MixSource("general", 1.0, _dataset(5, 10_000), None)]


def _sources(dp_size: int, micro_batching: MicroBatching | None = None,
             sources: list[MixSource] = SOURCES, seed: int = 0) -> list[MixedBatchSource]:
    return [MixedBatchSource(sources, global_batch_size=8,
                             micro_batching=micro_batching or MicroBatching(2), dp_rank=r,
                             dp_size=dp_size, seed=seed) for r in range(dp_size)]


def _step(sources: list[MixedBatchSource]) -> list[StepBatch]:
    return [s.next_step() for s in sources]


def _global_order(per_rank: list[StepBatch]) -> list[int]:
    """The step's global batch as token ids of position 0 (row identity), in Megatron's
    (micro-batch, rank) order."""
    order = []
    for m in range(len(per_rank[0].micro_batches)):
        for rank_step in per_rank:
            order += rank_step.micro_batches[m]["tokens"][:, 0].tolist()
    return order


def _which(token: int) -> tuple[str, int]:
    return ("general", (token - 10_000) // 10) if token >= 10_000 else ("reasoning", token // 10)


def test_stream_draws_by_weight_and_walks_each_source_in_epochs() -> None:
    source = _sources(1)[0]
    batches = [source.next_step() for _ in range(12)]
    drawn = [_which(t) for b in batches for t in _global_order([b])]
    expected = source_draws([3.0, 1.0], 0, 0, 96)
    assert [name for name, _ in drawn] == [SOURCES[i].name for i in expected]
    for name, size in (("reasoning", 13), ("general", 5)):
        rows = [row for n, row in drawn if n == name]
        # Each epoch of a source is its own permutation, none skipped, then a new order.
        for epoch in range(len(rows) // size):
            assert rows[epoch * size:(epoch + 1) * size] == epoch_permutation(
                size, 0, epoch, f"sft-mix:{name}")
        assert epoch_permutation(size, 0, 0, f"sft-mix:{name}") != epoch_permutation(
            size, 0, 1, f"sft-mix:{name}")
    for b, first in zip(batches, itertools.count(0, 8)):
        window = source_draws([3.0, 1.0], 0, first, 8)
        assert b.source_samples == {"reasoning": window.count(0), "general": window.count(1)}
    assert batches[-1].source_consumed == {"reasoning": expected.count(0),
                                           "general": expected.count(1)}


def test_stream_does_not_depend_on_dp_size() -> None:
    streams = {}
    for dp_size in (1, 2, 4):
        sources = _sources(dp_size)
        per_step = [_step(sources) for _ in range(12)]
        streams[dp_size] = [_global_order(s) for s in per_step]
        for per_rank in per_step:
            # Every rank knows the step's loss denominator and counts without a collective.
            total = sum(float(mb["loss_mask"].sum()) for s in per_rank for mb in s.micro_batches)
            assert all(s.global_loss_tokens == total for s in per_rank)
            assert all(s.source_samples == per_rank[0].source_samples for s in per_rank)
    assert streams[1] == streams[2] == streams[4]


def test_a_token_budget_keeps_each_steps_samples() -> None:
    how = MicroBatching(2, max_tokens=12)
    fixed, budget = _sources(2), _sources(2, how)
    for _ in range(5):
        a, b = _step(fixed), _step(budget)
        assert sorted(_global_order(a)) == sorted(
            t for s in b for mb in s.micro_batches for t in mb["tokens"][:, 0].tolist())
        assert a[0].global_loss_tokens == b[0].global_loss_tokens


@pytest.mark.parametrize(("dp_before", "dp_after"), [(2, 2), (1, 4), (4, 2)])
def test_resume_continues_the_same_stream(dp_before: int, dp_after: int) -> None:
    reference = _sources(dp_after)
    straight = [_global_order(_step(reference)) for _ in range(11)]

    before = _sources(dp_before)
    for _ in range(5):
        _step(before)
    state = json.loads(json.dumps(before[0].state_dict()))  # survives a checkpoint file
    assert all(s.state_dict() == state for s in before)
    assert state["consumed_samples"] == 40 and sorted(state["sources"]) == ["general",
                                                                          "reasoning"]
    # Mid-stream: the general source (5 rows, ~10 drawn) is past its first epoch.
    assert state["sources"]["general"]["epoch"] >= 1

    after = _sources(dp_after)
    for s in after:
        s.load_state_dict(state)
    resumed = [_step(after) for _ in range(6)]
    assert [_global_order(r) for r in resumed] == straight[5:]
    assert after[0].state_dict() == reference[0].state_dict()  # cumulative counts included
    assert resumed[-1][0].source_consumed == {
        n: e["consumed_samples"] for n, e in reference[0].state_dict()["sources"].items()}


def test_states_of_another_stream_are_refused() -> None:
    state = _sources(1)[0].state_dict()
    mix = _sources(1)[0]
    with pytest.raises(ValueError, match=r"saved by a single-source run"):
        mix.load_state_dict({"epoch": 0, "epoch_consumed_samples": 0, "consumed_samples": 0,
                             "seed": 0, "num_samples": 13})
    single = SFTBatchSource(_dataset(13, 0), global_batch_size=8,
                            micro_batching=MicroBatching(2), dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(ValueError, match=r"saved by a data.sources mix of \['general', "
                                         r"'reasoning'\]; this run reads one source"):
        single.load_state_dict(state)
    reweighted = [SOURCES[0], MixSource("general", 2.0, SOURCES[1].train, None)]
    with pytest.raises(ValueError, match=r"source 'general' saved weight=1.0, this run has "
                                         r"weight=2.0"):
        _sources(1, sources=reweighted)[0].load_state_dict(state)
    renamed = [SOURCES[0], MixSource("writing", 1.0, SOURCES[1].train, None)]
    with pytest.raises(ValueError, match=r"saved sources \['general', 'reasoning'\] differ from "
                                         r"this run's data.sources \['reasoning', 'writing'\]"):
        _sources(1, sources=renamed)[0].load_state_dict(state)
    with pytest.raises(ValueError, match=r"saved seed=0 differs from this run's data.seed=3"):
        _sources(1, seed=3)[0].load_state_dict(state)


# ----------------------------------------------------------------------------- files


def _jsonl(path: Path, n: int, tag: str) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Compute {i} + {i}",
                                        "completion": f"<answer> {tag} {2 * i} </answer>"}) + "\n"
                            for i in range(n)))
    return path


def test_sources_read_their_own_splits(tmp_path: Path,
                                       arithmetic_tokenizer: PreTrainedTokenizerFast) -> None:
    a, a_eval = _jsonl(tmp_path / "a.jsonl", 10, "a"), _jsonl(tmp_path / "a_eval.jsonl", 3, "a")
    b = _jsonl(tmp_path / "b.jsonl", 20, "b")
    data = DataConfig(source="jsonl", eval_fraction=0.25, seq_length=64, sources=(
        DataSourceConfig(path=str(a), weight=3, eval_path=str(a_eval)),
        DataSourceConfig(path=str(b), weight=1, name="general")))
    mixed = mix_sources(data, arithmetic_tokenizer)
    assert [(s.name, s.weight) for s in mixed] == [("a", 3), ("general", 1)]
    # a: its eval_path; general: a quarter of its lines held out, the rest trained on.
    assert [(len(s.train), s.eval and len(s.eval)) for s in mixed] == [(10, 3), (15, 5)]
    template_ids = arithmetic_tokenizer(render_prompt("Compute 0 + 0", data.template),
                                        add_special_tokens=False)["input_ids"]
    first = mixed[0].train.ids(0).tolist()
    assert first[1:1 + len(template_ids)] == template_ids  # after bos: the templated prompt

    source, eval_sets = sft_batch_source(data, arithmetic_tokenizer, global_batch_size=8,
                                         micro_batching=MicroBatching(2), dp_rank=0, dp_size=1)
    assert isinstance(source, MixedBatchSource) and sorted(eval_sets) == ["a", "general"]
    single, single_eval = sft_batch_source(
        DataConfig(source="jsonl", path=str(b), seq_length=64), arithmetic_tokenizer,
        global_batch_size=8, micro_batching=MicroBatching(2), dp_rank=0, dp_size=1)
    assert isinstance(single, SFTBatchSource) and single_eval == {}


def test_a_source_too_long_for_seq_length_is_named(
        tmp_path: Path, arithmetic_tokenizer: PreTrainedTokenizerFast) -> None:
    a, b = _jsonl(tmp_path / "a.jsonl", 4, "a"), _jsonl(tmp_path / "b.jsonl", 4, "b")
    data = DataConfig(source="jsonl", template="none", seq_length=4, sources=(
        DataSourceConfig(path=str(a), weight=1), DataSourceConfig(path=str(b), weight=1)))
    with pytest.raises(ValueError, match=rf"^data.sources\[0\] \({a}\): all 4 examples are "
                                         r"longer than seq_length=4"):
        mix_sources(data, arithmetic_tokenizer)
