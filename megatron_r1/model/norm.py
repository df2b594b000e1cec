"""PyTorch LayerNorm/RMSNorm for megatron-core's local layer spec, sequence-parallel aware.

Layer L2. megatron-core's `WrappedTorchNorm` refuses sequence parallelism, which megatron-core
requires for MoE with TP > 1. With sequence parallelism each TP rank normalises a different
slice of the sequence, so its norm weights get a partial gradient that finalize_model_grads
must all-reduce over the TP group; it does so for parameters tagged `sequence_parallel`, as
Transformer Engine's norms are. Without the tag TP=2 trains, but diverges from TP=1.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class SequenceParallelTorchNorm:
    """Factory with WrappedTorchNorm's signature returning a tagged torch.nn norm."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                normalization: str = "LayerNorm") -> torch.nn.Module:  # type: ignore[misc]
        if config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centered gamma is not supported by the torch norm")
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}.get(
            config.normalization)
        if norm_cls is None:
            raise ValueError(f"normalization {config.normalization!r} is not supported")
        norm = norm_cls(normalized_shape=hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]
        return norm
