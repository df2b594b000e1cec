"""The token store: built once and reused, rebuilt when what decides the ids changes, written
atomically; and the SFT data memory it buys (a peak-RSS bound the dense layout breaks)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from megatron_r1.config.schema import DataConfig
from megatron_r1.data.sft import sft_datasets
from megatron_r1.data.token_store import (
    cached_store,
    open_store,
    tokenize_pairs,
)
from megatron_r1.data.tokenizer import build_arithmetic_tokenizer

from procs import run_python

PAIRS = [("Compute 1 + 2", "<answer> 3 </answer>"), ("Compute 7", "<answer> 7 </answer>"),
         ("", "x")]


def _counting(pairs: list[tuple[str, str]]
              ) -> tuple[list[int], Callable[[], list[tuple[str, str]]]]:
    calls = [0]

    def source() -> list[tuple[str, str]]:
        calls[0] += 1
        return pairs
    return calls, source


def test_a_store_is_built_once_then_memory_mapped(
        tmp_path: Path, arithmetic_tokenizer: PreTrainedTokenizerFast) -> None:
    calls, source = _counting(PAIRS)
    built = cached_store(tmp_path, "d", {"file": "a"}, source, arithmetic_tokenizer)
    again = cached_store(tmp_path, "d", {"file": "a"}, source, arithmetic_tokenizer)
    assert calls == [1] and again.path == built.path  # the second open read no source
    assert isinstance(again.ids_T, np.memmap)
    memory = tokenize_pairs(PAIRS, arithmetic_tokenizer)
    for store in (built, again):
        assert len(store) == 3 and store.pad_id == memory.pad_id == arithmetic_tokenizer.pad_token_id
        for m in range(3):
            assert store.ids(m).tolist() == memory.ids(m).tolist()
        assert store.loss_start_M.tolist() == memory.loss_start_M.tolist()
    tok = arithmetic_tokenizer
    prompt = tok("Compute 1 + 2", add_special_tokens=False)["input_ids"]
    assert memory.ids(0).tolist() == [tok.bos_token_id, *prompt,
                                      *tok("<answer> 3 </answer>", add_special_tokens=False)[
                                          "input_ids"], tok.eos_token_id]
    assert memory.loss_start_M[0] == len(prompt)  # bos + prompt, minus one
    assert memory.loss_start_M[2] == 0 and memory.ids(2)[0] == tok.bos_token_id  # empty prompt
    # nothing but complete stores in the cache directory
    assert [p.name for p in tmp_path.iterdir()] == [built.path.name]


def test_a_change_of_records_or_tokenizer_builds_a_new_store(
        tmp_path: Path, arithmetic_tokenizer: PreTrainedTokenizerFast) -> None:
    first = cached_store(tmp_path, "d", {"file": "a"}, lambda: PAIRS, arithmetic_tokenizer)
    other = cached_store(tmp_path, "d", {"file": "b"}, lambda: PAIRS[:1], arithmetic_tokenizer)
    assert other.path != first.path and len(other) == 1
    smaller = build_arithmetic_tokenizer(tmp_path / "tok300", vocab_size=300)
    retok = cached_store(tmp_path, "d", {"file": "a"}, lambda: PAIRS, smaller)
    assert retok.path not in (first.path, other.path)
    assert retok.ids(0).tolist() != first.ids(0).tolist()  # another vocabulary's ids


def test_a_jsonl_source_is_keyed_by_its_file_and_template(
        tmp_path: Path, arithmetic_tokenizer: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                            for p, c in PAIRS))
    cache = tmp_path / "cache"
    data = DataConfig(source="jsonl", path=str(path), seq_length=64)
    train, _ = sft_datasets(data, arithmetic_tokenizer, seed=0, cache_dir=cache)
    in_memory, _ = sft_datasets(data, arithmetic_tokenizer, seed=0)
    assert [train.ids(i).tolist() for i in range(3)] == [in_memory.ids(i).tolist()
                                                         for i in range(3)]
    sft_datasets(data, arithmetic_tokenizer, seed=0, cache_dir=cache)
    assert len(list(cache.iterdir())) == 1  # reused
    raw = DataConfig(source="jsonl", path=str(path), seq_length=64, template="none")
    sft_datasets(raw, arithmetic_tokenizer, seed=0, cache_dir=cache)
    assert len(list(cache.iterdir())) == 2  # another template: another store
    path.write_text(path.read_text() + json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    os.utime(path, ns=(1, 1))  # an edit, whatever the clock's resolution
    grown, _ = sft_datasets(data, arithmetic_tokenizer, seed=0, cache_dir=cache)
    assert len(grown) == 4 and len(list(cache.iterdir())) == 3


def test_a_failed_build_leaves_nothing_and_a_raced_one_is_used(
        tmp_path: Path, arithmetic_tokenizer: PreTrainedTokenizerFast) -> None:
    def broken() -> Iterator[tuple[str, str]]:
        yield PAIRS[0]
        raise ValueError("d.jsonl:2: invalid JSON")
    with pytest.raises(ValueError, match=r"d\.jsonl:2: invalid JSON"):
        cached_store(tmp_path, "d", {"file": "a"}, broken, arithmetic_tokenizer)
    assert list(tmp_path.iterdir()) == []  # no partial store a later run could read

    # another process renames its complete copy into place while this one builds
    winner = cached_store(tmp_path / "other", "d", {"file": "a"}, lambda: PAIRS,
                          arithmetic_tokenizer)
    target = tmp_path / winner.path.name

    def racing() -> list[tuple[str, str]]:
        winner.path.rename(target)
        return PAIRS
    store = cached_store(tmp_path, "d", {"file": "a"}, racing, arithmetic_tokenizer)
    assert store.path == target  # the winner's copy; this builder's own was discarded
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["other", target.name])
    with pytest.raises(ValueError, match="not a token store"):
        open_store(tmp_path / "other")


def test_the_arithmetic_source_cached_equals_in_memory(
        tmp_path: Path, arithmetic_tokenizer: PreTrainedTokenizerFast) -> None:
    data = DataConfig(num_train_samples=64, num_eval_samples=8)
    cached = sft_datasets(data, arithmetic_tokenizer, seed=3, cache_dir=tmp_path)
    memory = sft_datasets(data, arithmetic_tokenizer, seed=3)
    for a, b in zip(cached, memory):
        assert a is not None and b is not None and len(a) == len(b)
        assert all(a.ids(i).tolist() == b.ids(i).tolist() for i in range(len(a)))
        assert torch.equal(a.loss_tokens_N, b.loss_tokens_N)
    assert len(cached[0]) == 64 and cached[1] is not None and len(cached[1]) == 8


# ----------------------------------------------------------------------------- memory

# 5,000 examples at seq_length 4,096: the former dense layout held int64 tokens and labels and
# a float32 mask of [N, S] on every rank (5,000 x 4,096 x 20 bytes = 410 MB) after building
# them from padded Python lists (measured: its peak RSS grew by 0.9 GB here, and by 3.6 GB at
# 20,000 examples); the token store holds ~40 ids per example (4 bytes each).
MEMORY_CHILD = """
import json, resource, sys
from pathlib import Path
from megatron_r1.batching import MicroBatching
from megatron_r1.config.schema import DataConfig
from megatron_r1.data.mix import sft_batch_source
from megatron_r1.data.tokenizer import build_arithmetic_tokenizer

tok = build_arithmetic_tokenizer(Path(sys.argv[1]), vocab_size=512)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
data = DataConfig(source="jsonl", path=sys.argv[2], seq_length=4096, template="none")
source, _ = sft_batch_source(data, tok, global_batch_size=64,
                             micro_batching=MicroBatching(8), dp_rank=0, dp_size=1)
for _ in range(4):
    source.next_step()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT", json.dumps({"peak_kib": after, "growth_kib": after - before}))
"""
GROWTH_BOUND_MB = 100
EXAMPLES = 5_000


def test_sft_data_memory_is_bounded_by_the_batch(
        tmp_path: Path, tokenizer_dir: Path) -> None:
    """Peak RSS growth of reading EXAMPLES examples at seq_length 4,096 (in memory; cached
    stores are memory-mapped) and taking 4 steps stays under GROWTH_BOUND_MB (measured:
    about 10 MB), far below what the dense layout took. Tokenized in chunks, so the source
    file is never held whole. The child runs on the former code too (no new API): it fails
    there."""
    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        for i in range(EXAMPLES):
            f.write(json.dumps({"prompt": f"Compute {i} + {i % 97}",
                                "completion": f"<think> {i} + {i % 97} = {i + i % 97} </think> "
                                              f"<answer> {i + i % 97} </answer>"}) + "\n")
    proc = run_python(MEMORY_CHILD.replace("sys.argv[1]", repr(str(tokenizer_dir)))
                      .replace("sys.argv[2]", repr(str(path))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(x for x in proc.stdout.splitlines()
                             if x.startswith("RESULT "))[len("RESULT "):])
    assert result["growth_kib"] < GROWTH_BOUND_MB * 1024, result
