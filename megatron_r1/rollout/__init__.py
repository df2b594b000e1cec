"""Rollout engines: the Protocol (types, L1) and the vLLM adapter (L2)."""
