"""Layer L1 ops: reference math (the executable spec) and the fused csrc/ kernels' wrappers.

Imports torch and torch.distributed only (never megatron or vllm).
"""

from megatron_r1.ops.grpo_loss import FusedMode, fused_kernels_available, grpo_token_loss
from megatron_r1.ops.grpo_loss_reference import (
    KL_ESTIMATORS,
    GRPOTokenLoss,
    KLEstimator,
    grpo_token_loss_reference,
)

__all__ = [
    "KL_ESTIMATORS",
    "FusedMode",
    "GRPOTokenLoss",
    "KLEstimator",
    "fused_kernels_available",
    "grpo_token_loss",
    "grpo_token_loss_reference",
]
