"""Core attention for Multi-head Latent Attention on megatron-core's local (non-TE) spec.

Layer L2. megatron-core 0.16.1's MLASelfAttention passes `k_channels` (the query/key head
size, nope + rope parts) and `v_channels` (the value head size) to its core attention; only
Transformer Engine's attention accepts them, so MLA could not run without TE (on CPU). The
local DotProductAttention already computes scores from the query's own head size and the
context from the value's; only its output width assumes the two are equal. This subclass
accepts the two arguments and sizes the output by the value head.
"""

from __future__ import annotations

from typing import Any

from megatron.core.transformer.dot_product_attention import DotProductAttention


class LatentDotProductAttention(DotProductAttention):
    """DotProductAttention whose value head size may differ from the query/key head size."""

    def __init__(self, *args: Any, k_channels: int | None = None,
                 v_channels: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The scores use the query's last dimension directly (k_channels is implied); the
        # context is [sq, b, heads_per_partition * v_channels].
        if v_channels is not None:
            self.hidden_size_per_partition = self.num_attention_heads_per_partition * v_channels
