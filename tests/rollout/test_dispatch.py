"""Rows, and what reward models read of them, travel from the engine groups' leaders to the
ranks that train (or score) them, exactly, with all_to_all over gloo at world size 4. (The
rollout's rewards and metrics are computed on every rank from one all-reduced table; the GRPO
runs of tests/e2e/test_grpo_scaleout.py compare them with world size 1.)"""

from __future__ import annotations

from procs import REPO, run_script


def test_rows_reach_the_ranks_that_asked_for_them():
    proc = run_script(REPO / "tests/rollout/dispatch_worker.py", [], nproc=4, timeout=300)
    assert proc.stdout.count("RESULT ok") == 4, proc.stdout[-2000:]
