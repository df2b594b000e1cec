"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): the Llama layout plus q/k/v projection biases.

Layer L1, declarative. The biases fuse like the weights (grouped per KV head)
(`model.add_qkv_bias`). Sliding-window attention (`use_sliding_window`) is refused.
"""

from __future__ import annotations

from typing import Any

from megatron_r1.checkpoint.hf import hf_config as H
from megatron_r1.checkpoint.hf import llama
from megatron_r1.checkpoint.hf.llama import HF, L
from megatron_r1.checkpoint.hf.rules import QKV, Family, MapContext, Rule
from megatron_r1.config.schema import ModelConfig


def has_qkv_bias(ctx: MapContext) -> bool:
    return ctx.qkv_bias


RULES = (
    *llama.RULES,
    Rule(f"{L}.self_attention.linear_qkv.bias",
         (f"{HF}.self_attn.q_proj.bias", f"{HF}.self_attn.k_proj.bias",
          f"{HF}.self_attn.v_proj.bias"), QKV, scope="layer", when=has_qkv_bias),
)


def config_to_model(cfg: dict[str, Any]) -> dict[str, Any]:
    # Qwen2's attention always has q/k/v biases (and none on o_proj).
    return {**H.common_fields(cfg), **H.gqa_attention(cfg, qk_layernorm=False),
            **H.plain_rope(cfg), **H.NO_MOE, **H.qkv_bias(True)}


def model_to_config(model: ModelConfig) -> dict[str, Any]:
    out = {**H.model_common_to_hf(model), **H.model_gqa_to_hf(model), "use_sliding_window": False}
    out.pop("head_dim")  # Qwen2 derives it from hidden_size / heads
    return out


FAMILY = Family(name="qwen2", architectures=("Qwen2ForCausalLM",), model_type="qwen2",
                rules=RULES, config_to_model=config_to_model, model_to_config=model_to_config)
