"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sft_checkpoint(tmp_path_factory):
    """The tiny policy after 60 SFT steps (one run for every GRPO test of the session)."""
    from grpo_runs import sft_checkpoint as train

    return train(tmp_path_factory.mktemp("sft"))
