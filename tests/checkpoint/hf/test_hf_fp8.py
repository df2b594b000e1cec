"""FP8 128x128 block (de)quantisation against an independent block-by-block reference."""

from __future__ import annotations

import pytest
import torch

from megatron_r1.checkpoint.hf.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_blocks,
    quantize_blocks,
    scale_shape,
)


def _dequantize_loop(q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """Reference: one block at a time, as DeepSeek's inference code defines it."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = q[rows, cols].to(torch.float32) * scale[i, j]
    return out


def test_hf_fp8_dequantize_matches_the_block_loop_with_partial_edge_blocks() -> None:
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(300, 200, generator=g) * 100).to(FP8_DTYPE)  # 3x2 blocks, ragged edges
    scale = torch.rand(3, 2, generator=g) + 0.01
    assert scale_shape((300, 200)) == (3, 2)
    got = dequantize_blocks(q, scale, torch.float32)
    assert torch.equal(got, _dequantize_loop(q, scale, 128))
    assert dequantize_blocks(q, scale, torch.bfloat16).dtype == torch.bfloat16


def test_hf_fp8_quantize_uses_block_amax_and_round_trips_to_fp8_precision() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(256, 160, generator=g)
    w[:128, 128:] = 0.0  # an all-zero block keeps scale 1
    q, scale = quantize_blocks(w)
    assert q.dtype == FP8_DTYPE and scale.shape == (2, 2) and scale.dtype == torch.float32
    assert scale[0, 1] == 1.0
    assert torch.allclose(scale[1, 0], w[128:, :128].abs().max() / FP8_MAX)
    back = _dequantize_loop(q, scale, 128)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of each element (normal range).
    err = (back - w).abs()
    assert (err <= w.abs() * 2**-4 + scale.max() * 2**-9).all()
    # Quantising an already-quantised weight gives it back.
    q2, scale2 = quantize_blocks(back)
    assert torch.equal(_dequantize_loop(q2, scale2, 128), back)


def test_hf_fp8_scale_shape_mismatch_names_the_tensor() -> None:
    q = torch.zeros(300, 200).to(FP8_DTYPE)
    with pytest.raises(ValueError, match=r"layers.0.mlp.up_proj.weight_scale_inv: shape \[2, 2\] "
                                         r"does not match weight \[300, 200\] with 128x128 blocks \(expected \[3, 2\]\)"):
        dequantize_blocks(q, torch.ones(2, 2), torch.float32, name="layers.0.mlp.up_proj.weight")
