"""Llama 3 (LlamaForCausalLM): GQA attention, SwiGLU MLP, untied or tied embeddings.

Layer L1, declarative. Llama 3.1+ RoPE scaling ('llama3') is refused until the config schema
can express it (see hf_config.plain_rope).
"""

from __future__ import annotations

from typing import Any

from megatron_r1.checkpoint.hf import hf_config as H
from megatron_r1.checkpoint.hf.rules import GATE_UP, QKV, VOCAB, Family, MapContext, Rule
from megatron_r1.config.schema import ModelConfig

L = "decoder.layers.{layer}"
HF = "model.layers.{layer}"


def untied(ctx: MapContext) -> bool:
    return not ctx.model.tie_embeddings


RULES = (
    Rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", VOCAB),
    Rule((f"{L}.input_layernorm.weight", f"{L}.self_attention.linear_qkv.layer_norm_weight"),
         f"{HF}.input_layernorm.weight", scope="layer"),
    Rule(f"{L}.self_attention.linear_qkv.weight",
         (f"{HF}.self_attn.q_proj.weight", f"{HF}.self_attn.k_proj.weight",
          f"{HF}.self_attn.v_proj.weight"), QKV, scope="layer"),
    Rule(f"{L}.self_attention.linear_proj.weight", f"{HF}.self_attn.o_proj.weight",
         scope="layer"),
    Rule((f"{L}.pre_mlp_layernorm.weight", f"{L}.mlp.linear_fc1.layer_norm_weight"),
         f"{HF}.post_attention_layernorm.weight", scope="layer"),
    Rule(f"{L}.mlp.linear_fc1.weight", (f"{HF}.mlp.gate_proj.weight", f"{HF}.mlp.up_proj.weight"),
         GATE_UP, scope="dense"),
    Rule(f"{L}.mlp.linear_fc2.weight", f"{HF}.mlp.down_proj.weight", scope="dense"),
    Rule("decoder.final_layernorm.weight", "model.norm.weight"),
    Rule("output_layer.weight", "lm_head.weight", VOCAB, when=untied),
)


def config_to_model(cfg: dict[str, Any]) -> dict[str, Any]:
    H.require_value(cfg, "attention_bias", (False, None),
                    "Llama attention biases (q/k/v/o) are not supported")
    H.require_value(cfg, "mlp_bias", (False, None), "MLP biases are not supported")
    return {**H.common_fields(cfg), **H.gqa_attention(cfg, qk_layernorm=False),
            **H.plain_rope(cfg), **H.NO_MOE, **H.qkv_bias(False)}


def model_to_config(model: ModelConfig) -> dict[str, Any]:
    return {**H.model_common_to_hf(model), **H.model_gqa_to_hf(model),
            "attention_bias": False, "mlp_bias": False}


FAMILY = Family(name="llama", architectures=("LlamaForCausalLM",), model_type="llama",
                rules=RULES, config_to_model=config_to_model, model_to_config=model_to_config)
