"""FP8 128x128 block quantisation, as DeepSeek-V3/R1 release their linear weights.

Layer L1. A quantised weight `W [out, in]` is stored as `float8_e4m3fn` plus
`weight_scale_inv [ceil(out/128), ceil(in/128)]` (float32); the real weight is
`W_q.float() * scale_inv` blockwise (edge blocks are partial). Quantising takes each block's
absolute maximum to the e4m3 maximum (448): `scale_inv = amax / 448`, `W_q = W / scale_inv`.
Dequantising then re-quantising is not bitwise the identity in general (the product
`W_q * scale_inv` is rounded to the working dtype), so an FP8 export reproduces the weights
to FP8 precision, not the original bytes.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
DEFAULT_BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"


def _blocked(t: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
    """Zero-pad [out, in] to whole blocks and view it as [out_b, bo, in_b, bi]."""
    out, inp = t.shape
    bo, bi = block
    pad_o, pad_i = -out % bo, -inp % bi
    if pad_o or pad_i:
        t = torch.nn.functional.pad(t, (0, pad_i, 0, pad_o))
    return t.view((out + pad_o) // bo, bo, (inp + pad_i) // bi, bi), out, inp


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    """Shape of the `weight_scale_inv` that goes with a weight of `shape`."""
    out, inp = shape
    return -(-out // block[0]), -(-inp // block[1])


def dequantize_blocks(weight_q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype,
                      block: tuple[int, int] = DEFAULT_BLOCK, name: str = "weight") -> torch.Tensor:
    """`weight_q [out, in]` (float8) times its per-block `scale_inv`, as `dtype`.

    Raises:
        ValueError: the scale's shape does not fit the weight and block size (names `name`).
    """
    if weight_q.dim() != 2:
        raise ValueError(f"{name}: FP8 block scales need a 2-D weight, got shape "
                         f"{list(weight_q.shape)}")
    expected = scale_shape(tuple(weight_q.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"{name}{SCALE_SUFFIX}: shape {list(scale_inv.shape)} does not match "
                         f"weight {list(weight_q.shape)} with {block[0]}x{block[1]} blocks "
                         f"(expected {list(expected)})")
    blocks, out, inp = _blocked(weight_q.to(torch.float32), block)
    blocks = blocks * scale_inv.to(torch.float32)[:, None, :, None]
    return blocks.reshape(blocks.shape[0] * block[0], -1)[:out, :inp].to(dtype)


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, float32 scale_inv) of a 2-D weight, one scale per block."""
    blocks, out, inp = _blocked(weight.to(torch.float32), block)
    amax = blocks.abs().amax(dim=(1, 3))
    # An all-zero block keeps scale 1 (any scale reproduces zeros).
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.reshape(blocks.shape[0] * block[0], -1)[:out, :inp]
    return q.to(FP8_DTYPE).contiguous(), scale_inv
