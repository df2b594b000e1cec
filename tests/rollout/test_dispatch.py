"""Rows, and what reward models read of them, travel from the engine groups' leaders to the
ranks that train (or score) them, exactly, with all_to_all over gloo at world size 4. (The
rollout's rewards and metrics are computed on every rank from one all-reduced table; the GRPO
runs of tests/e2e/test_grpo_scaleout.py compare them with world size 1.)"""

from __future__ import annotations

from procs import REPO, run_script


def test_rows_reach_the_ranks_that_asked_for_them():
    proc = run_script(REPO / "tests/rollout/dispatch_worker.py", [], nproc=4, timeout=300)
    assert proc.stdout.count("RESULT ok") == 4, proc.stdout[-2000:]


def test_a_row_a_reward_model_cannot_score_falls_below_the_rollouts_scores():
    """Logits run negative here (as a reward model's often do): the old fallback, 0, paid a
    row without a summary more than every row the model read. Now such a row (or a NaN
    score) gets the model's lowest score of the rollout minus its margin; rows of kinds the
    model does not score stay 0 (its component does not enter their total)."""
    import math

    import torch

    from megatron_r1.rollout.dispatch import scores_with_fallback

    nan = math.nan
    scores_RM = torch.tensor([[-3.0, 0.5], [-5.0, nan], [nan, 2.0], [-4.0, 1.0], [nan, nan]],
                             dtype=torch.float64)
    read_RM = torch.tensor([[1, 1], [1, 1], [0, 1], [1, 1], [0, 0]], dtype=torch.bool)
    applies_RM = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 1], [0, 1]], dtype=torch.bool)
    got = scores_with_fallback(scores_RM, read_RM, applies_RM, [1.0, 0.25])
    # model 0 read rows 0, 1, 3 (lowest -5): row 2 has no summary -> -6; row 4 not its kind
    # model 1: row 1 NaN and row 4 unread -> lowest read 0.5 minus 0.25
    assert got.tolist() == [[-3.0, 0.5], [-5.0, 0.25], [-6.0, 2.0], [-4.0, 1.0], [0.0, 0.25]]
    assert got[2, 0] < scores_RM[read_RM[:, 0], 0].min()
    nothing = scores_with_fallback(torch.full((2, 1), nan, dtype=torch.float64),
                                   torch.zeros(2, 1, dtype=torch.bool),
                                   torch.ones(2, 1, dtype=torch.bool), [2.0])
    assert nothing.tolist() == [[-2.0], [-2.0]]  # nothing scored: -margin


def test_ranks_wait_for_a_long_generation_on_the_host_not_in_a_collective():
    """A generation longer than the collective timeout (4 s against 2 s, as a 32K-token
    rollout against parallel.timeout_minutes): with the rollout's EngineWait (a monitored
    barrier in a gloo group of its own) every rank gets the rollout; without it the rank that
    has no engine times out inside the first all-reduce, as NCCL's watchdog would abort the
    job; a wait longer than rollout.engine_wait_minutes stops naming that field."""
    import json

    proc = run_script(REPO / "tests/rollout/engine_wait_worker.py", [], nproc=2, timeout=300)
    results = {r["rank"]: r for r in (json.loads(line[len("RESULT "):])
                                      for line in proc.stdout.splitlines()
                                      if line.startswith("RESULT "))}
    assert set(results) == {0, 1}
    for r in results.values():
        assert r["waited"]["rows"] == 4 and r["waited"]["accuracy"] == 1.0
    assert results[0]["waited"]["seconds"] >= 4.0  # the leader generated for 4 s
    assert "rollout.engine_wait_minutes=0.0333333" in results[1]["wait_too_short"]
    assert "Timed out waiting 2000ms" in results[1]["unwaited"], results[1]["unwaited"]
    assert "engine_wait_minutes" not in results[1]["unwaited"]
