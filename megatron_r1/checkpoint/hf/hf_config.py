"""Hugging Face config.json <-> ModelConfig: reading, normalising, checking, deriving.

Layer L0/L1. The model config of a converted checkpoint is derived from the Hugging Face
config, never typed twice: each family file supplies `config_to_model` (HF keys -> the
architecture fields of ModelConfig) and `model_to_config` (the inverse), built from the
helpers here. A user's --config/--set may change training knobs (params_dtype, recompute,
make_vocab_size_divisible_by, ...), but an architecture field that contradicts the HF config
is an error naming both values. A feature megatron-r1 cannot represent (sliding-window
attention, an unsupported RoPE scaling, biases megatron does not have) is an error naming the
HF key, never silently dropped.

Both config.json styles are read: transformers 4 (`rope_theta`, `rope_scaling`,
`torch_dtype`) and transformers 5 (`rope_parameters`, `dtype`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from megatron_r1.config.schema import ModelConfig

CONFIG_FILE = "config.json"

# ModelConfig fields that define the architecture: always taken from the HF config.
ARCH_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "vocab_size", "max_position_embeddings", "position_embedding", "rotary_base",
    "normalization", "norm_epsilon", "activation", "qk_layernorm", "tie_embeddings",
    "num_experts", "moe_ffn_hidden_size", "moe_router_topk", "moe_shared_expert_size",
    "moe_first_dense_layers", "moe_router_score_function", "moe_router_pre_softmax",
    "moe_router_topk_scaling_factor", "moe_router_expert_bias", "moe_router_num_groups",
    "moe_router_group_topk", "multi_latent_attention", "q_lora_rank", "kv_lora_rank",
    "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rotary_scaling_factor",
    "original_max_position_embeddings", "mscale", "mscale_all_dim", "mtp_num_layers",
    "add_qkv_bias",
)
# Derived from the HF config, but a user may override them.
DERIVED_DEFAULTS = ("params_dtype", "init_method_std")

_HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
MODEL_TO_HF_DTYPE = {v: k for k, v in _HF_DTYPES.items()}


def read_hf_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json of a Hugging Face model directory.

    Raises:
        FileNotFoundError: no config.json.
        ValueError: not a JSON object.
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (is {directory} a Hugging Face model "
                                "directory?)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return cfg


def unsupported(key: str, value: object, why: str) -> ValueError:
    return ValueError(f"Hugging Face config {key}={value!r}: {why}")


def require_value(cfg: dict[str, Any], key: str, allowed: tuple[Any, ...], why: str) -> None:
    """Raise unless cfg[key] (absent counts as None) is one of `allowed`."""
    value = cfg.get(key)
    if value not in allowed:
        raise unsupported(key, value, why)


def get(cfg: dict[str, Any], key: str, default: Any = None, *, required: bool = False) -> Any:
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if required:
        raise ValueError(f"Hugging Face config: required key {key!r} is missing")
    return default


def rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings in transformers-5 form: {"rope_type", "rope_theta", ...scaling keys}."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params = {**scaling, **params}
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.pop("type", None)
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return params


def hf_dtype(cfg: dict[str, Any]) -> str | None:
    """The checkpoint's declared dtype name (`bfloat16`, ...), if any."""
    value = cfg.get("dtype") or cfg.get("torch_dtype")
    return value if isinstance(value, str) else None


def common_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """Fields every supported decoder-only family spells the same way."""
    require_value(cfg, "hidden_act", ("silu", None), "only SwiGLU (silu) MLPs are supported")
    return {
        "num_layers": get(cfg, "num_hidden_layers", required=True),
        "hidden_size": get(cfg, "hidden_size", required=True),
        "ffn_hidden_size": get(cfg, "intermediate_size", required=True),
        "num_attention_heads": get(cfg, "num_attention_heads", required=True),
        "vocab_size": get(cfg, "vocab_size", required=True),
        "max_position_embeddings": get(cfg, "max_position_embeddings", 4096),
        "norm_epsilon": float(get(cfg, "rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(get(cfg, "tie_word_embeddings", False)),
        "normalization": "RMSNorm",
        "activation": "swiglu",
        "mtp_num_layers": 0,
    }


def plain_rope(cfg: dict[str, Any]) -> dict[str, Any]:
    """Fields of an unscaled RoPE (Llama 3.0, Qwen2/2.5, Qwen3)."""
    rope = rope_parameters(cfg)
    if rope["rope_type"] != "default":
        raise unsupported("rope_scaling", rope["rope_type"],
                          "RoPE scaling is not supported for this family yet (Llama 3.1 "
                          "'llama3' scaling needs a model.rope_scaling_factor schema field)")
    return {"position_embedding": "rope", "rotary_base": float(rope["rope_theta"]),
            "rotary_scaling_factor": 1.0, "original_max_position_embeddings": 4096,
            "mscale": 1.0, "mscale_all_dim": 0.0}


def gqa_attention(cfg: dict[str, Any], *, qk_layernorm: bool) -> dict[str, Any]:
    """Fields of standard grouped-query attention (no MLA)."""
    heads = get(cfg, "num_attention_heads", required=True)
    if get(cfg, "use_sliding_window", False):
        raise unsupported("use_sliding_window", True, "sliding-window attention is not supported")
    return {
        "num_query_groups": get(cfg, "num_key_value_heads", heads),
        "kv_channels": get(cfg, "head_dim", get(cfg, "hidden_size", required=True) // heads),
        "qk_layernorm": qk_layernorm,
        "multi_latent_attention": False,
        "q_lora_rank": None, "kv_lora_rank": 512, "qk_head_dim": 128, "qk_pos_emb_head_dim": 64,
        "v_head_dim": 128,
    }


NO_MOE: dict[str, Any] = {
    "num_experts": 0, "moe_ffn_hidden_size": None, "moe_router_topk": 2,
    "moe_shared_expert_size": 0, "moe_first_dense_layers": 0,
    "moe_router_score_function": "softmax", "moe_router_pre_softmax": False,
    "moe_router_topk_scaling_factor": None, "moe_router_expert_bias": False,
    "moe_router_num_groups": None, "moe_router_group_topk": None,
}


def qkv_bias(enabled: bool) -> dict[str, Any]:
    """The `add_qkv_bias` field."""
    return {"add_qkv_bias": enabled}


def model_common_to_hf(model: ModelConfig) -> dict[str, Any]:
    """The inverse of common_fields (+ dtype)."""
    return {
        "num_hidden_layers": model.num_layers, "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_attention_heads": model.num_attention_heads, "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon, "tie_word_embeddings": model.tie_embeddings,
        "hidden_act": "silu", "initializer_range": model.init_method_std,
        "torch_dtype": MODEL_TO_HF_DTYPE[model.params_dtype],
    }


def model_gqa_to_hf(model: ModelConfig) -> dict[str, Any]:
    return {
        "num_key_value_heads": model.num_query_groups or model.num_attention_heads,
        "head_dim": model.kv_channels or model.hidden_size // model.num_attention_heads,
        "rope_theta": model.rotary_base,
    }


def derive_model_config(family_fields: dict[str, Any], hf: dict[str, Any], base: ModelConfig,
                        explicit: set[str]) -> ModelConfig:
    """ModelConfig = `base` (defaults + the user's --config/--set) with the architecture
    taken from the HF config.

    Args:
        family_fields: the family's `config_to_model(hf)`.
        explicit: model fields the user set explicitly; one that contradicts the HF config
            is an error.

    Raises:
        ValueError: naming the contradicting field and both values.
    """
    missing = [f for f in ARCH_FIELDS if f not in family_fields]
    assert not missing, f"family config map misses {missing}"
    derived = dict(family_fields)
    dtype = _HF_DTYPES.get(hf_dtype(hf) or "")
    defaults = {"params_dtype": dtype, "init_method_std": hf.get("initializer_range")}
    for key, value in defaults.items():
        if value is not None and key not in explicit:
            derived[key] = value
    for key in sorted(explicit & set(family_fields)):
        mine, theirs = getattr(base, key), family_fields[key]
        if not _same(mine, theirs):
            raise ValueError(f"model.{key}={mine!r} (from --config/--set) contradicts the "
                             f"Hugging Face config, which gives {theirs!r}; leave it unset")
    try:
        return dataclasses.replace(base, **derived)
    except (TypeError, ValueError) as err:
        raise ValueError(f"the Hugging Face config gives an invalid model config: {err}") from err


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b))  # type: ignore[arg-type]
    return a == b
