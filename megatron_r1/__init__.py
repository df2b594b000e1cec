"""megatron-r1: DeepSeek-R1 style GRPO training for Mixture-of-Experts LLMs on megatron-core."""

import warnings as _warnings

__version__ = "0.1.0"

# Warnings every run would print, on every rank, that ask nothing of the user; filtered here
# because any import of megatron-core through this package comes after this line.
# megatron-core announces at import each optional accelerator it falls back from (six lines
# without Apex and Transformer Engine); megatron_compat.apply() says once, in one line, what
# runs instead.
EXPECTED_WARNINGS = (
    r"(Transformer Engine and )?Apex (is|are) not installed.*",
    r".*full scope is deprecated.*",
    # torch 2.13 deprecates the collective names megatron-core 0.16 calls
    r".*`torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated.*",
    # megatron's DDP reads .grad of its bucket views
    r".*The .grad attribute of a Tensor that is not a leaf Tensor is being accessed.*",
    # megatron's grad-buffer offload resizes storages through the TypedStorage API
    r".*TypedStorage is deprecated.*",
)
for _pattern in EXPECTED_WARNINGS:
    _warnings.filterwarnings("ignore", message=_pattern)
