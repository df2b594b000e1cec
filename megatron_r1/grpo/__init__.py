"""GRPO math (L1): group advantages, loss aggregation, rollout batching."""
