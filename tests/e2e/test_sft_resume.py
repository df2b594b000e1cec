"""Resume is exact: N steps straight equal N/2 + checkpoint + resume + N/2, bitwise on CPU."""

from __future__ import annotations

from procs import read_rows, run_module

STEPS = 6
TIMING = {"step_time_s", "tokens_per_s"}


def sft(run_dir, *overrides):
    args = ["sft", "--set", f"train.steps={STEPS}", "--set", f"logging.run_dir={run_dir}",
            "--set", "logging.progress_bar=false", "--set", "checkpoint.keep_last=1"]
    for item in overrides:
        args += ["--set", item]
    return run_module(args)


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_resume_continues_the_same_run_bitwise(tmp_path):
    sft(tmp_path / "straight")
    sft(tmp_path / "split", f"train.stop_at_step={STEPS // 2}")
    first_half = read_rows(tmp_path / "split")
    assert [r["step"] for r in first_half if "loss" in r] == [1, 2, 3]
    sft(tmp_path / "split")  # the requeued job: same command, resumes from step 3

    straight = without_timing(read_rows(tmp_path / "straight"))
    split = without_timing(read_rows(tmp_path / "split"))
    # Exact float equality: same data, same optimizer state, same order of operations.
    assert [r for r in split if "loss" in r] == [r for r in straight if "loss" in r]
    assert split[-1] == straight[-1] == {"step": STEPS, "eval_loss": straight[-1]["eval_loss"]}

    ckpts = tmp_path / "split" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_0000006"
    # keep_last=1; hf_assets/ (the tokenizer, for the export to Hugging Face) is kept.
    assert sorted(p.name for p in ckpts.iterdir()) == ["hf_assets", "latest", "step_0000006"]


def test_training_lowers_the_held_out_loss(tmp_path):
    sft(tmp_path / "run")
    evals = [r["eval_loss"] for r in read_rows(tmp_path / "run") if "eval_loss" in r]
    assert evals[-1] < evals[0] - 0.5  # measured: 6.22 -> 5.3 after 6 steps
