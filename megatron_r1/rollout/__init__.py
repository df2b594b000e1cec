"""Rollout engines: the Protocol (types), where engines live (placement), who generates what
and how rows reach the ranks that train them (dispatch), CUDA IPC hand-off (cuda_ipc), all L1;
the vLLM adapter and its worker extension (L2)."""
