"""A checkpoint root's hf_assets/: copied from the starting checkpoint, else the run's tokenizer
saved with its generation ids; written once, whole, and never replaced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, GenerationConfig

from megatron_r1.checkpoint.assets import ASSETS_DIR, write_assets
from megatron_r1.data.tokenizer import build_arithmetic_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return build_arithmetic_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", 512)


def _source_assets(root: Path) -> Path:
    assets = root / ASSETS_DIR
    assets.mkdir(parents=True)
    (assets / "tokenizer.json").write_text('{"from": "the source"}')
    (assets / "generation_config.json").write_text('{"eos_token_id": 7}')
    return assets


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.name.startswith(".")]


def test_the_starting_checkpoints_assets_are_copied_once(tmp_path: Path, tokenizer) -> None:
    source = _source_assets(tmp_path / "converted")
    run = tmp_path / "run" / "checkpoints"
    # Preferred over the run's tokenizer: the source's files (chat template, generation
    # config) belong to the model.
    assert write_assets(run, copy_from=source, tokenizer=tokenizer) == run / ASSETS_DIR
    got = {p.name: p.read_text() for p in (run / ASSETS_DIR).iterdir()}
    assert got == {"tokenizer.json": '{"from": "the source"}',
                   "generation_config.json": '{"eos_token_id": 7}'}
    # Later saves (or another source) leave them as they are.
    other = _source_assets(tmp_path / "other")
    (other / "tokenizer.json").write_text("{}")
    assert write_assets(run, copy_from=other, tokenizer=tokenizer) == run / ASSETS_DIR
    assert (run / ASSETS_DIR / "tokenizer.json").read_text() == '{"from": "the source"}'
    assert _leftovers(run) == []


def test_without_assets_to_copy_the_runs_tokenizer_is_saved(tmp_path: Path, tokenizer) -> None:
    run = tmp_path / "checkpoints"
    assets = write_assets(run, copy_from=tmp_path / "missing" / ASSETS_DIR, tokenizer=tokenizer)
    assert assets == run / ASSETS_DIR
    assert {p.name for p in assets.iterdir()} == {
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
        "generation_config.json"}
    config = json.loads((assets / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    loaded = AutoTokenizer.from_pretrained(assets)
    text = "<think> 12 + 3 = 15 </think> <answer> 15 </answer>"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    generation = GenerationConfig.from_pretrained(assets)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 0)
    assert _leftovers(run) == []


def test_nothing_to_write_leaves_no_directory(tmp_path: Path) -> None:
    run = tmp_path / "checkpoints"
    assert write_assets(run, copy_from=None, tokenizer=None) is None
    assert write_assets(run, copy_from=tmp_path / "missing", tokenizer=None) is None
    assert not run.exists()
