"""DeepSeek-V3 / R1 (DeepseekV3ForCausalLM): MLA, dense first layers, routed + shared experts,
sigmoid routing with an expert bias, group-limited routing, YaRN, FP8 block weights.

Layer L1, declarative. Choices:
- Rotary rows: DeepSeek stores the rotary part of q (per head) and of the compressed k as
  interleaved pairs, which is what megatron-core's MLA expects (it de-interleaves at run
  time); only a config with `rope_interleave=false` needs its rows permuted (RopeRows).
- The latent norms (`q_a_layernorm`, `kv_a_layernorm`) are megatron's MLA `q_layernorm` /
  `kv_layernorm`, built when `qk_layernorm` is on (TE spells them `linear_q_up_proj.
  layer_norm_weight` / `linear_kv_up_proj.layer_norm_weight`).
- `e_score_correction_bias` (aux-loss-free balancing) is the router's `expert_bias`.
- Every linear weight may arrive FP8 block-quantised (`weight_scale_inv`); it is dequantised
  on load, and an export may quantise the same tensors back.
- The multi-token-prediction layer (`model.layers.{num_hidden_layers}.*`) is skipped with a
  log line: RL training runs without it.
"""

from __future__ import annotations

import re
from typing import Any

from megatron_r1.checkpoint.hf import hf_config as H
from megatron_r1.checkpoint.hf.llama import HF, L, untied
from megatron_r1.checkpoint.hf.qwen3_moe import EXPERT, HF_EXPERT
from megatron_r1.checkpoint.hf.rules import (
    GATE_UP,
    VOCAB,
    Family,
    MapContext,
    RopeRows,
    Rule,
    Skip,
)
from megatron_r1.config.schema import ModelConfig

A = f"{L}.self_attention"
HA = f"{HF}.self_attn"


def q_lora(ctx: MapContext) -> bool:
    return ctx.model.q_lora_rank is not None


def no_q_lora(ctx: MapContext) -> bool:
    return ctx.model.q_lora_rank is None


def expert_bias(ctx: MapContext) -> bool:
    return ctx.model.moe_router_expert_bias


def shared_experts(ctx: MapContext) -> bool:
    return ctx.model.moe_shared_expert_size > 0


# Rotary rows: a query head is [qk_head_dim no-rope rows, qk_pos_emb_head_dim rope rows]; the
# compressed kv is [kv_lora_rank latent rows, qk_pos_emb_head_dim rope rows].
Q_ROPE = RopeRows(lambda ctx: ctx.model.qk_head_dim + ctx.model.qk_pos_emb_head_dim)
KV_ROPE = RopeRows(lambda ctx: ctx.model.kv_lora_rank + ctx.model.qk_pos_emb_head_dim)

RULES = (
    Rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", VOCAB),
    Rule(f"{L}.input_layernorm.weight", f"{HF}.input_layernorm.weight", scope="layer"),
    Rule(f"{A}.linear_q_down_proj.weight", f"{HA}.q_a_proj.weight", scope="layer", when=q_lora,
         fp8=True),
    Rule((f"{A}.q_layernorm.weight", f"{A}.linear_q_up_proj.layer_norm_weight"),
         f"{HA}.q_a_layernorm.weight", scope="layer", when=q_lora),
    Rule(f"{A}.linear_q_up_proj.weight", f"{HA}.q_b_proj.weight", Q_ROPE, scope="layer",
         when=q_lora, fp8=True),
    Rule(f"{A}.linear_q_proj.weight", f"{HA}.q_proj.weight", Q_ROPE, scope="layer",
         when=no_q_lora, fp8=True),
    Rule(f"{A}.linear_kv_down_proj.weight", f"{HA}.kv_a_proj_with_mqa.weight", KV_ROPE,
         scope="layer", fp8=True),
    Rule((f"{A}.kv_layernorm.weight", f"{A}.linear_kv_up_proj.layer_norm_weight"),
         f"{HA}.kv_a_layernorm.weight", scope="layer"),
    Rule(f"{A}.linear_kv_up_proj.weight", f"{HA}.kv_b_proj.weight", scope="layer", fp8=True),
    Rule(f"{A}.linear_proj.weight", f"{HA}.o_proj.weight", scope="layer", fp8=True),
    Rule((f"{L}.pre_mlp_layernorm.weight", f"{L}.mlp.linear_fc1.layer_norm_weight"),
         f"{HF}.post_attention_layernorm.weight", scope="layer"),
    # Dense layers (the first `first_k_dense_replace`).
    Rule(f"{L}.mlp.linear_fc1.weight", (f"{HF}.mlp.gate_proj.weight", f"{HF}.mlp.up_proj.weight"),
         GATE_UP, scope="dense", fp8=True),
    Rule(f"{L}.mlp.linear_fc2.weight", f"{HF}.mlp.down_proj.weight", scope="dense", fp8=True),
    # MoE layers.
    Rule(f"{L}.mlp.router.weight", f"{HF}.mlp.gate.weight", scope="moe"),
    Rule(f"{L}.mlp.router.expert_bias", f"{HF}.mlp.gate.e_score_correction_bias", scope="moe",
         when=expert_bias),
    Rule((f"{EXPERT}.local_experts.{{expert}}.linear_fc1.weight",
          f"{EXPERT}.linear_fc1.weight{{expert}}"),
         (f"{HF_EXPERT}.gate_proj.weight", f"{HF_EXPERT}.up_proj.weight"), GATE_UP,
         scope="expert", fp8=True),
    Rule((f"{EXPERT}.local_experts.{{expert}}.linear_fc2.weight",
          f"{EXPERT}.linear_fc2.weight{{expert}}"),
         f"{HF_EXPERT}.down_proj.weight", scope="expert", fp8=True),
    Rule(f"{L}.mlp.shared_experts.linear_fc1.weight",
         (f"{HF}.mlp.shared_experts.gate_proj.weight", f"{HF}.mlp.shared_experts.up_proj.weight"),
         GATE_UP, scope="moe", when=shared_experts, fp8=True),
    Rule(f"{L}.mlp.shared_experts.linear_fc2.weight", f"{HF}.mlp.shared_experts.down_proj.weight",
         scope="moe", when=shared_experts, fp8=True),
    Rule("decoder.final_layernorm.weight", "model.norm.weight"),
    Rule("output_layer.weight", "lm_head.weight", VOCAB, when=untied),
)

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def is_mtp_tensor(name: str, ctx: MapContext) -> bool:
    match = _LAYER.match(name)
    return match is not None and int(match.group(1)) >= ctx.model.num_layers


SKIPS = (Skip(is_mtp_tensor, "multi-token-prediction (MTP) layer: megatron-r1 trains without "
                             "MTP (model.mtp_num_layers=0)"),)


def config_to_model(cfg: dict[str, Any]) -> dict[str, Any]:
    H.require_value(cfg, "attention_bias", (False, None), "attention biases are not supported")
    H.require_value(cfg, "scoring_func", ("sigmoid", None),
                    "only DeepSeek-V3's sigmoid router scores are supported")
    H.require_value(cfg, "topk_method", ("noaux_tc", None),
                    "only aux-loss-free routing with the expert bias (noaux_tc) is supported")
    H.require_value(cfg, "norm_topk_prob", (True, None),
                    "megatron renormalises sigmoid top-k weights; unnormalised is not supported")
    H.require_value(cfg, "moe_layer_freq", (1, None), "every layer after the dense ones must be MoE")
    experts = H.get(cfg, "n_routed_experts", required=True)
    groups, topk = H.get(cfg, "n_group", 1), H.get(cfg, "num_experts_per_tok", required=True)
    if groups > 1 and topk != 2 * H.get(cfg, "topk_group", 1):
        # HF scores a group by the sum of its top-2 experts, megatron-core by its top
        # (topk / group_topk): the same routing only when topk = 2 x topk_group.
        raise H.unsupported("topk_group", cfg.get("topk_group"),
                            f"group-limited routing needs num_experts_per_tok = 2 x topk_group "
                            f"(got num_experts_per_tok={topk}); DeepSeek-V3 has 8 = 2 x 4")
    moe = {
        "num_experts": experts,
        "moe_ffn_hidden_size": H.get(cfg, "moe_intermediate_size", required=True),
        "moe_router_topk": topk,
        "moe_shared_expert_size": H.get(cfg, "n_shared_experts", 0)
        * H.get(cfg, "moe_intermediate_size"),
        "moe_first_dense_layers": H.get(cfg, "first_k_dense_replace", 0),
        "moe_router_score_function": "sigmoid", "moe_router_pre_softmax": False,
        "moe_router_topk_scaling_factor": float(H.get(cfg, "routed_scaling_factor", 1.0)),
        "moe_router_expert_bias": True,
        "moe_router_num_groups": groups if groups > 1 else None,
        "moe_router_group_topk": H.get(cfg, "topk_group", 1) if groups > 1 else None,
    }
    mla = {
        "multi_latent_attention": True, "qk_layernorm": True,
        "num_query_groups": None, "kv_channels": None,
        "q_lora_rank": H.get(cfg, "q_lora_rank"),
        "kv_lora_rank": H.get(cfg, "kv_lora_rank", required=True),
        "qk_head_dim": H.get(cfg, "qk_nope_head_dim", required=True),
        "qk_pos_emb_head_dim": H.get(cfg, "qk_rope_head_dim", required=True),
        "v_head_dim": H.get(cfg, "v_head_dim", required=True),
    }
    if moe["moe_first_dense_layers"] >= H.get(cfg, "num_hidden_layers", required=True):
        moe = dict(H.NO_MOE)  # every layer dense
    return {**H.common_fields(cfg), **moe, **mla, **_rope(cfg), **H.qkv_bias(False)}


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    rope = H.rope_parameters(cfg)
    base = float(rope["rope_theta"])
    if rope["rope_type"] == "default":
        return {"position_embedding": "rope", "rotary_base": base, "rotary_scaling_factor": 1.0,
                "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 0.0}
    if rope["rope_type"] != "yarn":
        raise H.unsupported("rope_scaling.type", rope["rope_type"], "only YaRN is supported")
    # megatron-core's YaRN fixes beta_fast/beta_slow at DeepSeek-V3's values (the schema has
    # no fields for them) and rounds the correction range to integers (HF's truncate=true).
    for key, value in (("beta_fast", 32), ("beta_slow", 1), ("truncate", True)):
        if rope.get(key, value) != value:
            raise H.unsupported(f"rope_scaling.{key}", rope[key],
                                f"megatron-core's YaRN uses {key}={value}")
    if rope.get("attention_factor") is not None:
        raise H.unsupported("rope_scaling.attention_factor", rope["attention_factor"],
                            "an explicit YaRN attention factor is not supported (megatron "
                            "derives it from mscale and mscale_all_dim)")
    return {"position_embedding": "yarn", "rotary_base": base,
            "rotary_scaling_factor": float(rope["factor"]),
            "original_max_position_embeddings": int(rope["original_max_position_embeddings"]),
            "mscale": float(rope.get("mscale") or 1.0),
            "mscale_all_dim": float(rope.get("mscale_all_dim") or 0.0)}


def model_to_config(model: ModelConfig) -> dict[str, Any]:
    out = {**H.model_common_to_hf(model),
           "n_routed_experts": model.num_experts,
           "moe_intermediate_size": model.moe_ffn_hidden_size,
           "num_experts_per_tok": model.moe_router_topk,
           "n_shared_experts": model.moe_shared_expert_size // (model.moe_ffn_hidden_size or 1),
           "first_k_dense_replace": model.moe_first_dense_layers,
           "routed_scaling_factor": model.moe_router_topk_scaling_factor or 1.0,
           "n_group": model.moe_router_num_groups or 1,
           "topk_group": model.moe_router_group_topk or 1,
           "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
           "q_lora_rank": model.q_lora_rank, "kv_lora_rank": model.kv_lora_rank,
           "qk_nope_head_dim": model.qk_head_dim, "qk_rope_head_dim": model.qk_pos_emb_head_dim,
           "v_head_dim": model.v_head_dim, "num_key_value_heads": model.num_attention_heads,
           "rope_theta": model.rotary_base, "rope_interleave": True,
           "num_nextn_predict_layers": 0, "attention_bias": False}
    if model.position_embedding == "yarn":
        out["rope_scaling"] = {
            "type": "yarn", "factor": model.rotary_scaling_factor,
            "original_max_position_embeddings": model.original_max_position_embeddings,
            "beta_fast": 32, "beta_slow": 1, "mscale": model.mscale,
            "mscale_all_dim": model.mscale_all_dim}
    return out


FAMILY = Family(name="deepseek_v3", architectures=("DeepseekV3ForCausalLM",),
                model_type="deepseek_v3", rules=RULES, config_to_model=config_to_model,
                model_to_config=model_to_config, skips=SKIPS)
