"""Rows travel from the engine groups' leaders to the ranks that train them, exactly, with
all_to_all over gloo at world size 4; metrics reduced over the leaders equal the ones computed
on the whole rollout in one process."""

from __future__ import annotations

from procs import REPO, run_script


def test_rows_reach_the_ranks_that_asked_for_them():
    proc = run_script(REPO / "tests/rollout/dispatch_worker.py", [], nproc=4, timeout=300)
    assert proc.stdout.count("RESULT ok") == 4, proc.stdout[-2000:]
