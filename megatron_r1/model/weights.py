"""Copy weights between two builds of the same model on this rank (policy -> reference).

Layer L2. The policy is wrapped (megatron's DDP, and Float16Module for bf16/fp16 models), the
reference model is not; megatron-core's `unwrap_model` reaches the GPTModel inside each, so
the parameter names match whatever the dtype.
"""

from __future__ import annotations

import torch
from megatron.core.utils import unwrap_model


def copy_weights(source: list[torch.nn.Module], target: list[torch.nn.Module]) -> None:
    """target <- source, parameter by parameter and buffer by buffer (same layout on this
    rank; the expert-bias buffers of aux-loss-free routing are part of the routing).

    Raises:
        ValueError: naming the first tensor the two models do not share.
    """
    with torch.no_grad():
        for src, dst in zip(unwrap_model(source), unwrap_model(target)):
            src_state = dict(src.named_parameters()) | dict(src.named_buffers())
            for name, tensor in (*dst.named_parameters(), *dst.named_buffers()):
                if name not in src_state or src_state[name].shape != tensor.shape:
                    raise ValueError(f"copy_weights: {name} of the target has no counterpart "
                                     "of the same shape in the source")
                tensor.copy_(src_state[name])
