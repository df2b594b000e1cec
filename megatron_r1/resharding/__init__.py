"""Moving trainer weights to rollout engines (L2): plan, then execute."""
