"""The policy as megatron-core GPTModel chunks (L2)."""
