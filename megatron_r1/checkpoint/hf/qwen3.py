"""Qwen3 dense (Qwen3ForCausalLM): the Llama layout plus per-head RMSNorm on queries and keys.

Layer L1, declarative. Qwen3's head_dim is explicit (it need not be hidden/heads).
"""

from __future__ import annotations

from typing import Any

from megatron_r1.checkpoint.hf import hf_config as H
from megatron_r1.checkpoint.hf import llama
from megatron_r1.checkpoint.hf.llama import HF, L
from megatron_r1.checkpoint.hf.rules import Family, Rule
from megatron_r1.config.schema import ModelConfig

QK_NORM_RULES = (
    Rule(f"{L}.self_attention.q_layernorm.weight", f"{HF}.self_attn.q_norm.weight", scope="layer"),
    Rule(f"{L}.self_attention.k_layernorm.weight", f"{HF}.self_attn.k_norm.weight", scope="layer"),
)
RULES = (*llama.RULES, *QK_NORM_RULES)


def config_to_model(cfg: dict[str, Any]) -> dict[str, Any]:
    H.require_value(cfg, "attention_bias", (False, None),
                    "Qwen3 attention biases (q/k/v/o) are not supported")
    return {**H.common_fields(cfg), **H.gqa_attention(cfg, qk_layernorm=True),
            **H.plain_rope(cfg), **H.NO_MOE, **H.qkv_bias(False)}


def model_to_config(model: ModelConfig) -> dict[str, Any]:
    return {**H.model_common_to_hf(model), **H.model_gqa_to_hf(model),
            "attention_bias": False, "use_sliding_window": False}


FAMILY = Family(name="qwen3", architectures=("Qwen3ForCausalLM",), model_type="qwen3",
                rules=RULES, config_to_model=config_to_model, model_to_config=model_to_config)
