"""config.json -> ModelConfig derivation (both transformers config styles), its inverse, and
errors that name the unsupported key or the contradicting field."""

from __future__ import annotations

from typing import Any

import pytest

from megatron_r1.checkpoint.hf import FAMILIES, family_for
from megatron_r1.checkpoint.hf import hf_config as H
from megatron_r1.config.schema import ModelConfig


def _derive(hf: dict[str, Any], base: ModelConfig | None = None,
            explicit: frozenset[str] = frozenset()) -> ModelConfig:
    return H.derive_model_config(family_for(hf).config_to_model(hf), hf, base or ModelConfig(),
                                 set(explicit))


def test_hf_config_derives_each_family(hf_configs: dict[str, dict[str, Any]]) -> None:
    llama = _derive(hf_configs["llama"])
    assert (llama.num_query_groups, llama.kv_channels, llama.rotary_base) == (2, 16, 500000.0)
    assert (llama.num_experts, llama.qk_layernorm, llama.params_dtype) == (0, False, "fp32")
    qwen3 = _derive(hf_configs["qwen3"])
    assert qwen3.kv_channels == 24 and qwen3.qk_layernorm  # head_dim != hidden / heads
    moe = _derive(hf_configs["qwen3_moe"])  # transformers 5 writes num_local_experts
    assert (moe.num_experts, moe.moe_router_topk, moe.moe_ffn_hidden_size) == (4, 2, 32)
    assert moe.moe_router_pre_softmax is False and moe.moe_router_score_function == "softmax"
    ds = _derive(hf_configs["deepseek_v3"])
    assert ds.multi_latent_attention and ds.qk_layernorm and ds.q_lora_rank == 32
    assert (ds.moe_first_dense_layers, ds.moe_shared_expert_size) == (1, 32)
    assert (ds.moe_router_num_groups, ds.moe_router_group_topk) == (4, 2)
    assert ds.moe_router_expert_bias and ds.moe_router_topk_scaling_factor == 2.5
    assert (ds.position_embedding, ds.rotary_scaling_factor) == ("yarn", 4.0)
    assert (ds.original_max_position_embeddings, ds.mscale_all_dim) == (64, 1.0)
    assert ds.mtp_num_layers == 0


def test_hf_config_reads_transformers4_style_configs() -> None:
    # DeepSeek-V3's released config.json (abridged): rope_theta + rope_scaling "type".
    released = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8,
        "topk_group": 4, "first_k_dense_replace": 3, "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 129280,
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "num_nextn_predict_layers": 1, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                "quant_method": "fp8", "weight_block_size": [128, 128]},
    }
    ds = _derive(released)
    assert (ds.num_layers, ds.num_experts, ds.moe_router_topk, ds.params_dtype) == (
        61, 256, 8, "bf16")
    assert (ds.rotary_scaling_factor, ds.original_max_position_embeddings) == (40.0, 4096)
    assert ds.moe_shared_expert_size == 2048 and ds.moe_first_dense_layers == 3


@pytest.mark.parametrize(("family", "change", "message"), [
    ("qwen3", {"use_sliding_window": True}, r"use_sliding_window=True: sliding-window"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}},
     r"rope_scaling='llama3': RoPE scaling is not supported for this family"),
    ("llama", {"attention_bias": True}, r"attention_bias=True: Llama attention biases"),
    ("llama", {"hidden_act": "gelu"}, r"hidden_act='gelu': only SwiGLU"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, r"mlp_only_layers=\[1\]: dense layers between"),
    ("deepseek_v3", {"num_experts_per_tok": 3},
     r"topk_group=2: group-limited routing needs num_experts_per_tok = 2 x topk_group"),
    ("deepseek_v3", {"norm_topk_prob": False}, r"norm_topk_prob=False: megatron renormalises"),
    ("deepseek_v3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                         "original_max_position_embeddings": 64,
                                         "beta_fast": 16}},
     r"rope_scaling.beta_fast=16: megatron-core's YaRN uses beta_fast=32"),
])
def test_hf_config_refuses_what_megatron_cannot_represent(
        hf_configs: dict[str, dict[str, Any]], family: str, change: dict[str, Any],
        message: str) -> None:
    with pytest.raises(ValueError, match=rf"Hugging Face config {message}"):
        _derive({**hf_configs[family], **change})


def test_hf_config_unknown_architecture_names_it() -> None:
    with pytest.raises(ValueError, match=r"unknown architecture \['MambaForCausalLM'\]: supported "
                                         r"are DeepseekV3ForCausalLM, LlamaForCausalLM, "):
        family_for({"architectures": ["MambaForCausalLM"]})


def test_hf_config_user_overrides_keep_training_knobs_and_refuse_contradictions(
        hf_configs: dict[str, dict[str, Any]]) -> None:
    hf = hf_configs["qwen3_moe"]
    base = ModelConfig(params_dtype="bf16", moe_aux_loss_coeff=0.01, hidden_size=64)
    got = _derive(hf, base, frozenset({"params_dtype", "moe_aux_loss_coeff", "hidden_size"}))
    assert (got.params_dtype, got.moe_aux_loss_coeff, got.hidden_size) == ("bf16", 0.01, 64)
    with pytest.raises(ValueError, match=r"model.num_experts=8 \(from --config/--set\) "
                                         r"contradicts the Hugging Face config, which gives 4"):
        _derive(hf, ModelConfig(num_experts=8), frozenset({"num_experts"}))
    # A default the user did not set is simply replaced.
    assert _derive(hf, ModelConfig(num_experts=8)).num_experts == 4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_config_inverse_derives_the_same_model(
        hf_configs: dict[str, dict[str, Any]], family: str) -> None:
    model = _derive(hf_configs[family])
    hf = {"architectures": list(FAMILIES[family].architectures),
          **FAMILIES[family].model_to_config(model)}
    again = _derive(hf)
    assert {k: getattr(again, k) for k in H.ARCH_FIELDS} == {
        k: getattr(model, k) for k in H.ARCH_FIELDS}
