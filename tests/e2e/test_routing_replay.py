"""MoE routing replay (megatron-core's RouterReplay, model/routing_replay.py) under every
parallel layout: the ids follow the rows through micro-batching (padded and packed), sequence
parallelism (TP), pipeline stages (with full recomputation, where 1F1B keeps several
micro-batches in flight) and expert parallelism, in fp32 and bf16. gloo, world sizes 1 and 2,
the tiny MoE.

Checked per layout against world size 1 from the same initial weights:
- recording (R2's old pass) does not change the routing or the log-probs, and replaying the
  recorded ids gives the natural log-probs exactly (the same routed computation);
- the recorded ids equal world size 1's on every (row, position, MoE layer);
- replaying foreign ids (drawn at random, as a differently-routing engine would give)
  changes the log-probs, identically on every layout, and one GRPO step under them gives
  world size 1's loss, KL and gradient norm.
Tolerance: 1e-5 relative / 1e-5 nats, as tests/e2e/test_grpo_loss_parallel.py (only the
order of floating-point sums changes with the layout); replaying the recorded ids on the same
layout is exact (the same kernels on the same inputs)."""

from __future__ import annotations

import json

import pytest

from procs import REPO, run_script

RTOL, ATOL = 1e-5, 1e-5
LAYOUTS = {
    "tp2_packed": ["parallel.tensor=2", "train.micro_batch_size=8",
                   "train.pack_sequences=true", "train.max_tokens_per_microbatch=256"],
    "pp2_recompute": ["parallel.pipeline=2", "train.micro_batch_size=2",
                      "model.recompute=full"],
    "ep2": ["parallel.expert=2", "train.micro_batch_size=4"],
}


def replay_run(tmp_path, initial, nproc, *overrides, env=None):
    start = [] if initial is None else [f"checkpoint.load_dir={initial}",
                                        "checkpoint.load_optimizer=false"]
    args = [f"logging.run_dir={tmp_path}", *start, "train.global_batch_size=16",
            "grpo.kl_coef=0.05", *overrides]
    proc = run_script(REPO / "tests/e2e/routing_replay_worker.py", args, nproc=nproc, env=env)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def max_gap(a, b):
    assert a.keys() == b.keys()
    return max(abs(x - y) for row in a for x, y in zip(a[row], b[row]))


def as_sets(recorded):
    """Per row, position and layer the set of experts (order inside top-k carries no
    meaning)."""
    return [[[sorted(k) for k in position] for position in row] for row in recorded]


@pytest.fixture(scope="module")
def base(tmp_path_factory, initial):
    return replay_run(tmp_path_factory.mktemp("one"), initial, 1, "train.micro_batch_size=4")


def test_replay_at_world_size_1(base, tmp_path, initial):
    assert max_gap(base["recorded_pass"], base["natural"]) == 0.0
    assert max_gap(base["replayed"], base["natural"]) == 0.0
    assert max_gap(base["replayed_foreign"], base["natural"]) > 1e-3
    natural = replay_run(tmp_path, initial, 1, "train.micro_batch_size=4",
                         env={"STEP_ROUTING": "natural"})
    # the step replayed: the foreign routing moves loss, KL and gradient norm by ~1e-4
    # relative (the tiny model's small init makes routing matter little), a hundred times
    # what any layout changes them by (~1e-7)
    for key in ("loss", "kl", "grad_norm"):
        assert abs(natural[key] / base[key] - 1) > 1e-5, key


@pytest.mark.parametrize("layout", LAYOUTS)
def test_replay_follows_the_rows_through_every_layout(base, tmp_path, initial, layout):
    got = replay_run(tmp_path, initial, 2, *LAYOUTS[layout])
    assert max_gap(got["replayed"], got["natural"]) == 0.0
    assert max_gap(got["recorded_pass"], got["natural"]) == 0.0
    assert as_sets(got["recorded"]) == as_sets(base["recorded"])
    assert max_gap(got["replayed_foreign"], base["replayed_foreign"]) <= ATOL
    for key in ("loss", "kl", "grad_norm"):
        assert got[key] == pytest.approx(base[key], rel=RTOL), key


def test_replay_in_bf16_at_tp2(tmp_path):
    """bf16 weights and sequence-parallel TP2 (its own initial weights: fp32 checkpoints are
    not loaded into bf16 models here): recording leaves the forward as it was, replaying the
    recorded ids reproduces it exactly, and foreign ids move it."""
    got = replay_run(tmp_path, None, 2, "parallel.tensor=2", "train.micro_batch_size=8",
                     "model.params_dtype=bf16")
    assert max_gap(got["recorded_pass"], got["natural"]) == 0.0
    assert max_gap(got["replayed"], got["natural"]) == 0.0
    assert max_gap(got["replayed_foreign"], got["natural"]) > 1e-3
