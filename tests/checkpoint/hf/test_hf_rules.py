"""Layout transforms are exact inverses and produce megatron's layouts; rules expand to the
right megatron/HF names per layer and expert."""

from __future__ import annotations

import pytest
import torch

from megatron_r1.checkpoint.hf import FAMILIES
from megatron_r1.checkpoint.hf.rules import (
    GATE_UP,
    QKV,
    VOCAB,
    MapContext,
    RopeRows,
    expand_rules,
)
from megatron_r1.config.schema import ModelConfig

GQA = ModelConfig(hidden_size=8, num_attention_heads=4, num_query_groups=2, kv_channels=2,
                  vocab_size=10, make_vocab_size_divisible_by=8, num_experts=0,
                  moe_ffn_hidden_size=None)


def test_hf_qkv_is_grouped_by_kv_head() -> None:
    ctx = MapContext(GQA, {})
    # Row r of q belongs to query head r // 2; fill each row with a tag: q 0..7, k 100.., v 200..
    q = torch.arange(8.0)[:, None].expand(8, 8)
    k = 100 + torch.arange(4.0)[:, None].expand(4, 8)
    v = 200 + torch.arange(4.0)[:, None].expand(4, 8)
    fused = QKV.to_mcore([q, k, v], ctx)
    # group 0: q heads 0,1 (rows 0..3), k head 0, v head 0; then group 1.
    assert fused[:, 0].tolist() == [0, 1, 2, 3, 100, 101, 200, 201,
                                    4, 5, 6, 7, 102, 103, 202, 203]
    assert all(torch.equal(a, b) for a, b in zip(QKV.to_hf(fused, ctx), [q, k, v]))
    bias = [torch.randn(8), torch.randn(4), torch.randn(4)]
    assert all(torch.equal(a, b) for a, b in zip(QKV.to_hf(QKV.to_mcore(bias, ctx), ctx), bias))


def test_hf_gate_up_and_vocab_padding_round_trip() -> None:
    ctx = MapContext(GQA, {})
    gate, up = torch.randn(6, 8), torch.randn(6, 8)
    fc1 = GATE_UP.to_mcore([gate, up], ctx)
    assert torch.equal(fc1[:6], gate) and torch.equal(fc1[6:], up)
    assert all(torch.equal(a, b) for a, b in zip(GATE_UP.to_hf(fc1, ctx), [gate, up]))
    emb = torch.randn(10, 8)
    padded = VOCAB.to_mcore([emb], ctx)
    assert padded.shape == (16, 8) and torch.equal(padded[:10], emb) and not padded[10:].any()
    assert torch.equal(VOCAB.to_hf(padded, ctx)[0], emb)


@pytest.mark.parametrize("interleaved", [True, False])
def test_hf_rope_rows_are_interleaved_for_megatron(interleaved: bool) -> None:
    model = ModelConfig(multi_latent_attention=True, qk_head_dim=2, qk_pos_emb_head_dim=4,
                        num_experts=0, moe_ffn_hidden_size=None, qk_layernorm=True)
    ctx = MapContext(model, {"rope_interleave": interleaved})
    rows = RopeRows(lambda c: c.model.qk_head_dim + c.model.qk_pos_emb_head_dim)
    # Two heads of [2 no-rope rows, 4 rope rows]; half-split rope rows are (x0, x1, y0, y1).
    w = torch.arange(12.0)[:, None]
    got = rows.to_mcore([w], ctx)
    expected = w if interleaved else torch.tensor([0, 1, 2, 4, 3, 5, 6, 7, 8, 10, 9, 11.0])[:, None]
    assert torch.equal(got, expected)
    assert torch.equal(rows.to_hf(got, ctx)[0], w)


def test_hf_rules_expand_over_layers_and_experts() -> None:
    model = ModelConfig(num_layers=3, num_experts=8, moe_ffn_hidden_size=4,
                        moe_first_dense_layers=1, moe_shared_expert_size=4,
                        moe_router_expert_bias=True, multi_latent_attention=True, q_lora_rank=8,
                        qk_layernorm=True, tie_embeddings=False)
    pairs = expand_rules(FAMILIES["deepseek_v3"], MapContext(model, {}))
    names = [p.mcore[0] for p in pairs]
    assert names[0] == "embedding.word_embeddings.weight"
    assert names[-2:] == ["decoder.final_layernorm.weight", "output_layer.weight"]
    experts = [p for p in pairs if "local_experts" in p.mcore[0]]
    assert len(experts) == 2 * 2 * 8  # fc1 + fc2, 2 MoE layers, 8 experts
    assert experts[0].hf == ("model.layers.1.mlp.experts.0.gate_proj.weight",
                             "model.layers.1.mlp.experts.0.up_proj.weight")
    assert experts[0].mcore[1] == "decoder.layers.1.mlp.experts.linear_fc1.weight0"
    assert "decoder.layers.0.mlp.linear_fc1.weight" in names  # the dense layer
    assert "decoder.layers.0.mlp.router.weight" not in names
    assert names.count("decoder.layers.2.mlp.router.expert_bias") == 1
    assert len(names) == len(set(names))
    tied = expand_rules(FAMILIES["llama"], MapContext(
        ModelConfig(num_experts=0, moe_ffn_hidden_size=None, tie_embeddings=True), {}))
    assert "output_layer.weight" not in [p.mcore[0] for p in tied]
