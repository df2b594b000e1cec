"""Hugging Face <-> megatron checkpoint mappings, one declarative file per model family.

Layer L2 as a package (mcore_io imports megatron.core); the mapping files, the safetensors
reader/writer, the config derivation, FP8 blocks and the memory budget are plain torch (L1)
and import without megatron. Entry points live in megatron_r1.convert.
"""

from __future__ import annotations

from typing import Any

from megatron_r1.checkpoint.hf import deepseek_v3, llama, qwen2, qwen3, qwen3_moe
from megatron_r1.checkpoint.hf.rules import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (
    llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, qwen3_moe.FAMILY, deepseek_v3.FAMILY)}


def family_for(hf_config: dict[str, Any]) -> Family:
    """The family of a Hugging Face config.json (by `architectures`, else `model_type`).

    Raises:
        ValueError: an architecture no family covers (names it and the supported ones).
    """
    archs = hf_config.get("architectures") or []
    for family in FAMILIES.values():
        if any(a in family.architectures for a in archs):
            return family
    if not archs:
        for family in FAMILIES.values():
            if hf_config.get("model_type") == family.model_type:
                return family
    supported = sorted(a for f in FAMILIES.values() for a in f.architectures)
    raise ValueError(f"unknown architecture {archs or hf_config.get('model_type')!r}: "
                     f"supported are {', '.join(supported)}")
