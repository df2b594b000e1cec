"""Launch discovery and process groups (launch_env is L1; init is the L2 megatron seam)."""
