"""Rule-based rewards of the R1 recipe (L1): accuracy, format, language consistency, scoring.

Import from the submodules (`megatron_r1.reward.scoring`, ...); nothing is re-exported here, so
that a reward worker process that unpickles `accuracy_reward` imports math-verify and sympy but
not torch.
"""
