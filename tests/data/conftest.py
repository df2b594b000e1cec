"""Shared fixtures of the data tests: one arithmetic tokenizer per session (built in ~0.2 s)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from megatron_r1.data.tokenizer import build_arithmetic_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "arithmetic"
    build_arithmetic_tokenizer(path, vocab_size=512)
    return path


@pytest.fixture(scope="session")
def arithmetic_tokenizer(tokenizer_dir: Path) -> PreTrainedTokenizerFast:
    return build_arithmetic_tokenizer(tokenizer_dir, vocab_size=512)
