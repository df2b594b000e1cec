"""megatron-r1: DeepSeek-R1 style GRPO training for Mixture-of-Experts LLMs on megatron-core."""

__version__ = "0.1.0"
