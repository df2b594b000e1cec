"""Checkpoints: megatron dist_checkpointing save/resume (L2)."""
