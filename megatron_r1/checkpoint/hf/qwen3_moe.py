"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3 attention, softmax-routed experts, no shared expert.

Layer L1, declarative. Experts are stored per expert on the Hugging Face side
(`mlp.experts.{e}.gate_proj.weight`) and per expert in megatron's dist checkpoint, so one
expert is the unit of conversion. `norm_topk_prob=true` (renormalise the top-k weights) is
megatron's default top-k-then-softmax; `false` is softmax-then-top-k (`moe_router_pre_softmax`).
Layers listed in `mlp_only_layers` or a `decoder_sparse_step` other than 1 are refused.
"""

from __future__ import annotations

from typing import Any

from megatron_r1.checkpoint.hf import hf_config as H
from megatron_r1.checkpoint.hf import qwen3
from megatron_r1.checkpoint.hf.llama import HF, L
from megatron_r1.checkpoint.hf.rules import GATE_UP, Family, Rule
from megatron_r1.config.schema import ModelConfig

EXPERT = f"{L}.mlp.experts"
HF_EXPERT = f"{HF}.mlp.experts.{{expert}}"

# Megatron spells a routed expert `experts.local_experts.{e}.linear_fc1.weight` (SequentialMLP,
# local spec) or `experts.linear_fc1.weight{e}` (TEGroupedMLP).
MOE_RULES = (
    Rule(f"{L}.mlp.router.weight", f"{HF}.mlp.gate.weight", scope="moe"),
    Rule((f"{EXPERT}.local_experts.{{expert}}.linear_fc1.weight",
          f"{EXPERT}.linear_fc1.weight{{expert}}"),
         (f"{HF_EXPERT}.gate_proj.weight", f"{HF_EXPERT}.up_proj.weight"), GATE_UP,
         scope="expert"),
    Rule((f"{EXPERT}.local_experts.{{expert}}.linear_fc2.weight",
          f"{EXPERT}.linear_fc2.weight{{expert}}"),
         f"{HF_EXPERT}.down_proj.weight", scope="expert"),
)
RULES = (*qwen3.RULES, *MOE_RULES)


def config_to_model(cfg: dict[str, Any]) -> dict[str, Any]:
    H.require_value(cfg, "attention_bias", (False, None),
                    "Qwen3 attention biases (q/k/v/o) are not supported")
    H.require_value(cfg, "mlp_only_layers", ([], None),
                    "dense layers between MoE layers are not supported (only the first "
                    "layers may be dense)")
    H.require_value(cfg, "decoder_sparse_step", (1, None), "every layer must be an MoE layer")
    moe = {
        # transformers 5 writes `num_local_experts`, released configs `num_experts`.
        "num_experts": H.get(cfg, "num_experts") or H.get(cfg, "num_local_experts", required=True),
        "moe_ffn_hidden_size": H.get(cfg, "moe_intermediate_size", required=True),
        "moe_router_topk": H.get(cfg, "num_experts_per_tok", required=True),
        "moe_shared_expert_size": 0, "moe_first_dense_layers": 0,
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": not H.get(cfg, "norm_topk_prob", False),
        "moe_router_topk_scaling_factor": None, "moe_router_expert_bias": False,
        "moe_router_num_groups": None, "moe_router_group_topk": None,
    }
    return {**H.common_fields(cfg), **H.gqa_attention(cfg, qk_layernorm=True),
            **H.plain_rope(cfg), **moe, **H.qkv_bias(False)}


def model_to_config(model: ModelConfig) -> dict[str, Any]:
    return {**H.model_common_to_hf(model), **H.model_gqa_to_hf(model),
            "attention_bias": False, "use_sliding_window": False,
            "num_experts": model.num_experts, "moe_intermediate_size": model.moe_ffn_hidden_size,
            "num_experts_per_tok": model.moe_router_topk,
            "norm_topk_prob": not model.moe_router_pre_softmax, "decoder_sparse_step": 1,
            "mlp_only_layers": []}


FAMILY = Family(name="qwen3_moe", architectures=("Qwen3MoeForCausalLM",), model_type="qwen3_moe",
                rules=RULES, config_to_model=config_to_model, model_to_config=model_to_config)
