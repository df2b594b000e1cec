"""Activation memory of one training micro-batch: what megatron-core keeps for the backward.

Layer L0 (pure arithmetic). An estimate, term by term, of the tensors autograd saves in each
layer of megatron-core's GPTModel (MLA or GQA attention, dense or MoE FFN), so that a term
that disagrees with a measurement (benchmarks/bench_plan_memory.py) can be found and fixed on
its own. Not counted: tensors whose size does not grow with the tokens (RoPE tables, masks),
and the pipeline's send/receive buffers (two layer inputs).

Legend: T = tokens of one micro-batch on this rank (micro_batch_size x seq / CP);
Ts = T / TP under sequence parallelism (layer norms, residual stream, linear inputs are split
along the sequence), else T; h = hidden size; a = bytes per activation element (2 for bf16).

Recompute settings (megatron's recompute_granularity):
- none: every term below is kept for every layer of every in-flight micro-batch.
- selective: megatron-core's default `core_attn` module is recomputed: the attention
  probabilities (unfused attention) or the softmax statistics (flash attention) are dropped.
- full (uniform, one layer per checkpoint): only each layer's input is kept; the backward
  recomputes one layer at a time, so one layer's full set is added once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_r1.config.schema import ModelConfig

AttentionImpl = Literal["flash", "unfused"]
"""flash: Transformer Engine's fused attention (no score matrix kept); unfused: megatron's
local DotProductAttention (keeps the softmax probabilities, s x s per head)."""
Recompute = Literal["none", "selective", "full"]

ROUTER_BYTES = 4  # megatron runs the router in fp32 (model.moe_router_dtype)
LOSS_BYTES = 4  # the vocab-parallel cross-entropy / log-prob works on fp32 logits


@dataclass(frozen=True, slots=True)
class MicroBatchShape:
    """How one micro-batch lies on one rank."""

    micro_batch_size: int
    seq_length: int
    tensor: int
    context: int
    expert_tensor: int
    sequence_parallel: bool
    act_bytes: int
    """2 for bf16/fp16 models, 4 for fp32."""
    attention: AttentionImpl
    moe_imbalance: float = 1.0
    """Tokens reaching the busiest expert-parallel rank, relative to the mean."""

    @property
    def tokens(self) -> int:
        """T: tokens of the micro-batch on this rank (after the context-parallel split)."""
        return self.micro_batch_size * self.seq_length // self.context

    @property
    def seq_tokens(self) -> float:
        """Ts: tokens of the sequence-split tensors (layer norms, residual, linear inputs)."""
        return self.tokens / (self.tensor if self.sequence_parallel else 1)


def _attention_bytes(m: ModelConfig, s: MicroBatchShape, recompute: Recompute) -> float:
    T, Ts, t, a = s.tokens, s.seq_tokens, s.tensor, s.act_bytes
    heads = m.num_attention_heads / t
    kept = 2 * Ts * m.hidden_size * a  # input norm: its input and output (the QKV input)
    if m.multi_latent_attention:
        qk_dim = m.qk_head_dim + m.qk_pos_emb_head_dim
        if m.q_lora_rank is not None:
            kept += 2 * Ts * m.q_lora_rank * a  # q latent before and after its norm
        kept += 2 * Ts * m.kv_lora_rank * a  # kv latent before and after its norm
        kept += T * m.qk_pos_emb_head_dim * a  # shared rotary key (gathered)
        kept += T * heads * (2 * qk_dim + m.v_head_dim) * a  # q, k, v for the core
        v_dim = m.v_head_dim
    else:
        head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
        groups = (m.num_query_groups or m.num_attention_heads) / t
        kept += T * (heads + 2 * groups) * head_dim * a  # q, k, v
        if m.qk_layernorm:
            kept += T * (heads + groups) * head_dim * a  # q, k before their norms
        v_dim = head_dim
    kept += T * heads * v_dim * a  # core output = input of the output projection
    if recompute == "none":
        if s.attention == "unfused":
            # softmax probabilities: [b, heads, s / CP, s]
            kept += s.micro_batch_size * heads * (s.seq_length / s.context) * s.seq_length * a
        else:
            kept += T * heads * 4  # flash attention's fp32 log-sum-exp per query and head
    return kept


def _ffn_bytes(m: ModelConfig, s: MicroBatchShape, moe: bool) -> float:
    T, Ts, t, a = s.tokens, s.seq_tokens, s.tensor, s.act_bytes
    up = 2 if m.activation == "swiglu" else 1  # fc1 width multiplier (gate and up)
    kept = 2 * Ts * m.hidden_size * a  # pre-FFN norm: its input and output
    if not moe:
        f = m.ffn_hidden_size / t
        return kept + T * f * (up + 1) * a  # fc1 output and activation output (fc2 input)
    kept += 2 * Ts * m.num_experts * ROUTER_BYTES  # router logits and scores
    # Tokens that reach this rank's experts: each of the ETP ranks of an expert sees every
    # token routed to it, topk copies per token, averaged over the EP ranks.
    routed = Ts * m.moe_router_topk * s.expert_tensor * s.moe_imbalance
    f_e = (m.moe_ffn_hidden_size or 0) / s.expert_tensor
    kept += routed * m.hidden_size * a  # permuted tokens (fc1 input)
    kept += routed * f_e * (up + 1) * a  # fc1 output and activation output
    kept += routed * m.hidden_size * a  # fc2 output, kept to weight by the routing scores
    if m.moe_shared_expert_size:
        kept += T * m.moe_shared_expert_size / t * (up + 1) * a
    return kept


def layer_bytes(m: ModelConfig, s: MicroBatchShape, moe: bool, recompute: Recompute) -> float:
    """Bytes one layer keeps for the backward of one micro-batch (`full` excluded: see
    `kept_layer_bytes`)."""
    return _attention_bytes(m, s, recompute) + _ffn_bytes(m, s, moe)


def kept_layer_bytes(m: ModelConfig, s: MicroBatchShape, moe: bool,
                     recompute: Recompute) -> float:
    """Bytes a layer keeps between its forward and its backward under `recompute`."""
    if recompute == "full":
        return s.seq_tokens * m.hidden_size * s.act_bytes  # the checkpointed layer input
    return layer_bytes(m, s, moe, recompute)


def loss_bytes(m: ModelConfig, s: MicroBatchShape, padded_vocab: int) -> float:
    """Peak of the output head and loss on the last stage: final norm, the logits in the
    model's dtype and their fp32 working copies (softmax kept for the backward)."""
    logits = s.tokens * padded_vocab / s.tensor
    return 2 * s.seq_tokens * m.hidden_size * s.act_bytes + logits * (s.act_bytes + 2 * LOSS_BYTES)


def in_flight_microbatches(pipeline: int, stage: int, num_microbatches: int,
                           virtual_pipeline: int | None) -> float:
    """Micro-batches whose activations a stage holds at its peak, in units of the stage's
    whole layer set (1F1B: the first stage holds `pipeline`, the last one; the interleaved
    schedule holds more model chunks of 1/v of the stage each)."""
    if virtual_pipeline is None or virtual_pipeline == 1:
        return float(min(num_microbatches, pipeline - stage))
    v = virtual_pipeline
    chunks = (pipeline - stage - 1) * 2 + (v - 1) * pipeline + 1
    return min(num_microbatches * v, chunks) / v
