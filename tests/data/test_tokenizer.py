"""The arithmetic tokenizer: lossless, digit by digit, short prompts, a standard HF directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from megatron_r1.config.schema import DataConfig
from megatron_r1.data.arithmetic import make_splits, write_solution
from megatron_r1.data.template import render_prompt
from megatron_r1.data.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    MIN_VOCAB_SIZE,
    PAD_TOKEN,
    TAG_TOKENS,
    build_arithmetic_tokenizer,
    load_tokenizer,
    resolve_tokenizer,
)


def _corpus_style_texts() -> list[str]:
    # Another seed and wider ranges than the tokenizer's own corpus: unseen problems.
    splits = make_splits(num_train=200, num_eval=0, min_ops=1, max_ops=6, max_operand=99, seed=99)
    texts = []
    for p in splits.train:
        texts += [render_prompt(p.question, "r1_zero"), p.question, write_solution(p)]
    return texts


def test_directory_is_a_standard_fast_tokenizer(tokenizer_dir: Path) -> None:
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {
        f.name for f in tokenizer_dir.iterdir()}
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["clean_up_tokenization_spaces"] is False
    loaded = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (BOS_TOKEN, EOS_TOKEN,
                                                                     PAD_TOKEN)
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert 300 < len(loaded) <= 512


def test_round_trip_of_corpus_style_and_arbitrary_text(
        arithmetic_tokenizer: PreTrainedTokenizerFast, tokenizer_dir: Path) -> None:
    loaded = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = [*_corpus_style_texts(), "héllo wörld 日本\n\ttabs  and  double spaces ",
             "<think></think><answer>-3.5</answer>", " leading space", ""]
    for tok in (arithmetic_tokenizer, loaded):
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == text
            # The rollout side decodes completions without special tokens: same text.
            assert tok.decode([*ids, tok.eos_token_id], skip_special_tokens=True) == text


def test_every_digit_is_its_own_token(arithmetic_tokenizer: PreTrainedTokenizerFast) -> None:
    for text in [*_corpus_style_texts()[:60], "1234567890", "x=100200"]:
        ids = arithmetic_tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces = [arithmetic_tokenizer.decode([i]) for i in ids]
        for piece in pieces:
            assert not any(c.isdigit() for c in piece) or (len(piece) == 1 and piece.isdigit())
    ids = arithmetic_tokenizer("1234567890", add_special_tokens=False)["input_ids"]
    assert [arithmetic_tokenizer.decode([i]) for i in ids] == list("1234567890")


def test_tags_are_single_kept_tokens(arithmetic_tokenizer: PreTrainedTokenizerFast) -> None:
    ids = arithmetic_tokenizer("<think> 1 </think> <answer> 1 </answer>",
                               add_special_tokens=False)["input_ids"]
    tokens = arithmetic_tokenizer.convert_ids_to_tokens(ids)
    assert [t for t in tokens if t.startswith("<")] == list(TAG_TOKENS)
    assert arithmetic_tokenizer.decode(ids, skip_special_tokens=True).count("<") == 4


def test_prompt_gets_bos_and_template_is_short(
        arithmetic_tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = render_prompt("Compute ((7 + 5) * 3) - 4", "r1_zero")
    ids = arithmetic_tokenizer(prompt)["input_ids"]
    # What vLLM feeds the model for a prompt string equals SFT's bos + prompt.
    assert ids == [arithmetic_tokenizer.bos_token_id] + arithmetic_tokenizer(
        prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) <= 40, "the template must leave room in 128-token sequences"


def test_build_is_deterministic_and_atomic(tmp_path: Path, tokenizer_dir: Path) -> None:
    build_arithmetic_tokenizer(tmp_path / "a", vocab_size=512)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tokenizer_dir / "tokenizer.json").read_bytes()
    # Building again into the same place (another rank, a restart) keeps it: idempotent.
    build_arithmetic_tokenizer(tmp_path / "a", vocab_size=512)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary left behind
    other = build_arithmetic_tokenizer(tmp_path / "b", vocab_size=512, seed=1)
    assert isinstance(other, PreTrainedTokenizerFast)
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() != (
        tmp_path / "a" / "tokenizer.json").read_bytes()


def test_build_never_overwrites_other_content(tmp_path: Path) -> None:
    target = tmp_path / "tok"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"{target} already exists and does not hold the "
                                         r"arithmetic tokenizer with vocab_size=512, seed=0"):
        build_arithmetic_tokenizer(target, vocab_size=512)
    assert (target / "tokenizer.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_vocab_size_caps_the_vocabulary(tmp_path: Path) -> None:
    tok = build_arithmetic_tokenizer(tmp_path / "small", vocab_size=300)
    assert len(tok) == 300
    text = render_prompt("Compute (12 + 3) * 4", "r1_zero")
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    with pytest.raises(ValueError, match=rf"vocab_size=100: the byte-level tokenizer needs at "
                                         rf"least {MIN_VOCAB_SIZE}"):
        build_arithmetic_tokenizer(tmp_path / "tiny", vocab_size=100)


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=rf"tokenizer directory {missing} does not exist"):
        load_tokenizer(missing)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=rf"tokenizer path {a_file} is not a directory"):
        load_tokenizer(a_file)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    (broken / "tokenizer.json").write_text("not json")
    with pytest.raises(ValueError, match=rf"cannot load a tokenizer from {broken}: "):
        load_tokenizer(broken)


def test_resolve_builds_into_the_cache_or_loads_the_configured_one(
        tmp_path: Path, tokenizer_dir: Path) -> None:
    built = resolve_tokenizer(DataConfig(), vocab_size=512, cache_dir=tmp_path)
    assert (tmp_path / "tokenizer" / "tokenizer.json").read_bytes() == (
        tokenizer_dir / "tokenizer.json").read_bytes()
    loaded = resolve_tokenizer(DataConfig(tokenizer=str(tokenizer_dir)), vocab_size=512,
                               cache_dir=tmp_path / "unused")
    assert loaded.get_vocab() == built.get_vocab()
    assert not (tmp_path / "unused").exists()
    with pytest.raises(ValueError, match=rf"model.vocab_size=400: smaller than the {len(built)} "
                                         rf"tokens of data.tokenizer='{tokenizer_dir}'"):
        resolve_tokenizer(DataConfig(tokenizer=str(tokenizer_dir)), vocab_size=400,
                          cache_dir=tmp_path)


def test_incremental_decoding_as_a_rollout_engine_does(
        arithmetic_tokenizer: PreTrainedTokenizerFast) -> None:
    # vLLM's detokenizer streams ids through tokenizers' DecodeStream one at a time.
    text = "<think> 3 + 4 = 7, 7 * 12 = 84 </think> <answer> 84 </answer> héllo"
    ids = [*arithmetic_tokenizer(text, add_special_tokens=False)["input_ids"],
           arithmetic_tokenizer.eos_token_id]
    stream = DecodeStream(skip_special_tokens=True)
    pieces = [stream.step(arithmetic_tokenizer.backend_tokenizer, i) for i in ids]
    assert "".join(p for p in pieces if p is not None) == text
