"""Core attention of megatron-core's local (non-TE) spec: packed sequences, and MLA.

Layer L2. Two gaps of megatron-core 0.16.1's local DotProductAttention, each closed by a
subclass swapped into the local layer spec (model/build.py):

- Packed sequences (`thd`, train.pack_sequences). megatron's attention layers already handle
  the packed layout (queries squeezed to [t, heads, dim], RoPE restarted per sequence from
  `cu_seqlens`), but the local core attention refuses `packed_seq_params`: only Transformer
  Engine's accepts it. `PackedDotProductAttention` runs the local causal attention once per
  sequence of the pack, so each attends only to itself, at the cost of the sequences' own
  lengths (sum of s_i^2, not t^2). On GPUs with TE, TE's fused attention does the same.
- Multi-head Latent Attention passes `k_channels` (query/key head size) and `v_channels` (value
  head size) to its core attention, which only TE accepted; the local attention computes the
  scores from the query's own size and the context from the value's, only its output width
  assumes the two equal. `LatentDotProductAttention` sizes the output by the value head.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention


class PackedDotProductAttention(DotProductAttention):
    """DotProductAttention that also takes megatron's packed (`thd`) sequences."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: Any = None,
                attention_bias: torch.Tensor | None = None,
                packed_seq_params: Any = None) -> torch.Tensor:
        """Unpacked: as megatron's. Packed: query/key/value [t, heads, dim] holding the
        sequences cu_seqlens_q delimits; returns [t, 1, heads x value dim]."""
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type,  # type: ignore[no-any-return]
                                   attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed sequences in format {packed_seq_params.qkv_format!r}: "
                             "the local attention takes 'thd' only")
        bounds = packed_seq_params.cu_seqlens_q.tolist()
        parts = []
        for start, stop in itertools.pairwise(bounds):
            if stop > start:  # [s_i, 1, heads, dim]: one causal sequence of batch size 1
                parts.append(super().forward(
                    query[start:stop].unsqueeze(1), key[start:stop].unsqueeze(1),
                    value[start:stop].unsqueeze(1), None, attn_mask_type, attention_bias))
        return torch.cat(parts, dim=0)


class LatentDotProductAttention(PackedDotProductAttention):
    """Packed-capable DotProductAttention whose value head size may differ from the
    query/key head size (MLA)."""

    def __init__(self, *args: Any, k_channels: int | None = None,
                 v_channels: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The scores use the query's last dimension directly (k_channels is implied); the
        # context is [sq, b, heads_per_partition * v_channels].
        if v_channels is not None:
            self.hidden_size_per_partition = self.num_attention_heads_per_partition * v_channels
