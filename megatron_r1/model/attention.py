"""Core attention of megatron-core's local (non-TE) spec: torch's fused attention, packed
sequences, and MLA.

Layer L2. megatron-core 0.16.1's local DotProductAttention computes attention unfused
(`baddbmm`, a masked softmax that materialises [b, heads, s, s] scores, `bmm`) and has two
gaps; a subclass swapped into the local layer spec (model/build.py) closes all three:

- Speed: where the call is plain causal self-attention (no explicit mask or bias, vanilla
  softmax, no sliding window, no attention dropout: what every caller here passes), it runs
  `torch.nn.functional.scaled_dot_product_attention` (`is_causal=True`, grouped-query heads
  via `enable_gqa`), which on the CPU is a fused flash kernel. Same math: megatron's mask fills
  -10000 where SDPA uses -inf, and a causal row always keeps its diagonal, so both give the
  masked keys probability 0 (exp underflows); the measured difference is float roundoff.
  Anything else falls back to megatron's own forward.
- Packed sequences (`thd`, train.pack_sequences). megatron's attention layers already handle
  the packed layout (queries squeezed to [t, heads, dim], RoPE restarted per sequence from
  `cu_seqlens`), but the local core attention refuses `packed_seq_params`: only Transformer
  Engine's accepts it. Here the pack is scattered into a zero-padded [sequences, heads,
  longest, dim] batch with one index copy, attended by one causal SDPA call (each sequence
  sees only itself), and gathered back: no Python loop over sequences. It costs
  sequences x longest^2 rather than sum(s_i^2), which the packer keeps close (it fills a pack
  with rows of similar lengths); a block-diagonal [t, t] mask was 10-40x slower on this CPU
  (SDPA's masked path is not fused) and nested tensors refuse causal attention in torch 2.13.
  On GPUs with TE, TE's fused attention does the same.
- Multi-head Latent Attention passes `k_channels` (query/key head size) and `v_channels` (value
  head size) to its core attention, which only TE accepted; the local attention computes the
  scores from the query's own size and the context from the value's, only its output width
  assumes the two equal. `LatentDotProductAttention` sizes the output by the value head.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class PackedDotProductAttention(DotProductAttention):
    """DotProductAttention through torch's fused attention that also takes megatron's packed
    (`thd`) sequences."""

    def _fused_applies(self, attention_mask: torch.Tensor | None, attn_mask_type: Any,
                       attention_bias: torch.Tensor | None) -> bool:
        """Whether SDPA computes exactly what megatron's forward would (see the module doc):
        causal self-attention with nothing megatron's softmax adds on top."""
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        dropout = self.attention_dropout.p if self.training else 0.0
        return (attention_mask is None and attention_bias is None
                and mask_type == AttnMaskType.causal and dropout == 0.0
                and self.softmax_offset is None
                and self.scale_mask_softmax.window_size is None)

    def _softmax_scale(self) -> float:
        # megatron divides the scores by the layer number under apply_query_key_layer_scaling
        # and its softmax multiplies them back (FusedScaleMaskSoftmax's `scale`): net effect
        # softmax_scale x coeff
        return float(self.softmax_scale * (self.scale_mask_softmax.scale or 1.0))

    def _attend(self, query_BNSD: torch.Tensor, key_BGSD: torch.Tensor,
                value_BGSD: torch.Tensor) -> torch.Tensor:
        """Causal SDPA, grouped-query heads broadcast; [b, heads, s, value dim]."""
        return F.scaled_dot_product_attention(
            query_BNSD, key_BGSD, value_BGSD, is_causal=True, scale=self._softmax_scale(),
            enable_gqa=key_BGSD.shape[1] != query_BNSD.shape[1])

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: Any = None,
                attention_bias: torch.Tensor | None = None,
                packed_seq_params: Any = None) -> torch.Tensor:
        """Unpacked: query [sq, b, heads, dim], key/value [sk, b, groups, dim]; returns
        [sq, b, heads x value dim], as megatron's. Packed: query/key/value [t, heads, dim]
        holding the sequences cu_seqlens_q delimits; returns [t, 1, heads x value dim]."""
        fused = self._fused_applies(attention_mask, attn_mask_type, attention_bias)
        if packed_seq_params is None:
            fused = fused and query.shape[0] == key.shape[0]  # megatron's causal mask: sq == sk
            if not fused:
                return super().forward(query, key, value, attention_mask,  # type: ignore[no-any-return]
                                       attn_mask_type, attention_bias)
            # [s, b, heads, dim] -> [b, heads, s, dim]
            context_BNSD = self._attend(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3),
                                        value.permute(1, 2, 0, 3))
            sq, b = query.shape[:2]
            return context_BNSD.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed sequences in format {packed_seq_params.qkv_format!r}: "
                             "the local attention takes 'thd' only")
        if not fused:
            return self._packed_loop(query, key, value, attn_mask_type, attention_bias,
                                     packed_seq_params)
        return self._packed_fused(query, key, value, packed_seq_params)

    def _packed_fused(self, query_TND: torch.Tensor, key_TGD: torch.Tensor,
                      value_TGD: torch.Tensor, packed_seq_params: Any) -> torch.Tensor:
        """One SDPA call over the pack scattered into a padded batch (module doc)."""
        cu_seqlens = packed_seq_params.cu_seqlens_q
        t = query_TND.shape[0]
        n = cu_seqlens.numel() - 1
        longest = int(packed_seq_params.max_seqlen_q)
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        # token i of the pack -> slot (its sequence, its position) of the padded batch
        sequence_T = torch.repeat_interleave(torch.arange(n, device=cu_seqlens.device), lengths,
                                             output_size=t)
        slot_T = sequence_T * longest + torch.arange(t, device=cu_seqlens.device) \
            - cu_seqlens[:-1].long()[sequence_T]

        def padded(x_TXD: torch.Tensor) -> torch.Tensor:  # -> [n, heads, longest, dim]
            out = x_TXD.new_zeros((n * longest, *x_TXD.shape[1:])).index_copy_(0, slot_T, x_TXD)
            return out.view(n, longest, *x_TXD.shape[1:]).transpose(1, 2)

        context_BNSD = self._attend(padded(query_TND), padded(key_TGD), padded(value_TGD))
        context_TND = context_BNSD.transpose(1, 2).reshape(n * longest, *context_BNSD.shape[1::2])
        return context_TND.index_select(0, slot_T).reshape(t, 1, self.hidden_size_per_partition)

    def _packed_loop(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attn_mask_type: Any, attention_bias: torch.Tensor | None,
                     packed_seq_params: Any) -> torch.Tensor:
        """megatron's forward once per sequence of the pack (what SDPA cannot reproduce)."""
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
