"""Tiny random Hugging Face models of every supported family, built locally (no downloads).

Weights are drawn with std 0.1 (transformers' default 0.02 gives logits of ~0.1, against which
a 1e-4 tolerance would be loose); logits then have a std of about one, so a mapping error shows
as an O(0.1..1) difference. Norm weights and biases are perturbed away from their 1/0 starts
so that a swapped or dropped norm or bias shows too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

VOCAB = 300
SEQ = 16
INIT_STD = 0.1
FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3")


def family_configs() -> dict[str, Any]:
    from transformers import (
        DeepseekV3Config,
        LlamaConfig,
        Qwen2Config,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, initializer_range=INIT_STD,
                  rms_norm_eps=1e-6)
    return {
        # GQA (2 KV heads for 4 query heads), untied.
        "llama": LlamaConfig(**common, num_key_value_heads=2, rope_theta=500000.0),
        # q/k/v biases, tied embeddings (as the small Qwen2.5 models).
        "qwen2": Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True),
        # an explicit head_dim != hidden/heads, q/k norms.
        "qwen3": Qwen3Config(**common, num_key_value_heads=2, head_dim=24),
        "qwen3_moe": Qwen3MoeConfig(**common, num_key_value_heads=2, head_dim=16, num_experts=4,
                                    num_experts_per_tok=2, moe_intermediate_size=32,
                                    norm_topk_prob=True),
        # MLA with q LoRA, one dense layer, 8 routed experts in 4 groups (2 used, 4 experts per
        # token, as DeepSeek-V3's 8 = 2 x 4), a shared expert, sigmoid routing with an expert
        # bias and a scaling factor, YaRN.
        "deepseek_v3": DeepseekV3Config(
            **{**common, "num_hidden_layers": 3}, num_key_value_heads=4, n_routed_experts=8,
            n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
            first_k_dense_replace=1, moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=16,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.5,
            rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
            rope_theta=10000.0),
    }


def build_tiny(family: str, seed: int = 0) -> torch.nn.Module:
    """A random fp32 model of `family` with perturbed norms, biases and router biases."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_configs()[family], dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
            elif name.endswith("bias"):
                param.normal_(0, INIT_STD)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.1)
    return model.eval()


def tiny_tokens(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, SEQ), generator=generator)


@pytest.fixture(scope="session")
def hf_configs() -> dict[str, dict[str, Any]]:
    """config.json contents (as transformers 5 writes them) of the tiny models."""
    return {name: cfg.to_dict() for name, cfg in family_configs().items()}


@pytest.fixture(scope="session")
def tokens() -> torch.Tensor:
    """[2, 16] token ids for logits comparisons."""
    return tiny_tokens()


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every family's tiny model saved by transformers (the released checkpoint layout)."""
    root = tmp_path_factory.mktemp("tiny_hf")
    dirs = {}
    for family in FAMILIES:
        dirs[family] = root / family
        build_tiny(family).save_pretrained(dirs[family])
    return dirs
