"""`megatron-r1 sft` on a two-source mix: per-source counts logged as drawn, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

from e2e.test_sft_resume import sft, without_timing

from megatron_r1.data.arithmetic import make_splits, write_solution
from megatron_r1.data.mix import source_draws

from procs import read_rows

STEPS, GLOBAL_BATCH, SEED = 4, 16, 1234  # train.global_batch_size and data.seed defaults


def _write_sources(tmp_path: Path) -> str:
    """A reasoning source (worked steps, 40 lines + a 12-line eval file) and a short-answer
    source (24 lines, 5 held out by data.eval_fraction), as `--set data.sources=...`."""
    splits = make_splits(num_train=64, num_eval=12, min_ops=1, max_ops=2, max_operand=10,
                         seed=0)

    def write(path: Path, rows: list[tuple[str, str]]) -> Path:
        path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                                for p, c in rows))
        return path

    reasoning = write(tmp_path / "reasoning.jsonl",
                      [(p.question, write_solution(p)) for p in splits.train[:40]])
    held_out = write(tmp_path / "reasoning_eval.jsonl",
                     [(p.question, write_solution(p)) for p in splits.eval])
    general = write(tmp_path / "general.jsonl",
                    [(p.question, f"<think> </think> <answer> {p.answer} </answer>")
                     for p in splits.train[40:]])
    return (f"data.sources=[{{path: {reasoning}, weight: 3, eval_path: {held_out}}}, "
            f"{{path: {general}, weight: 1}}]")


def test_mix_logs_per_source_counts_and_resumes_exactly(tmp_path: Path) -> None:
    mix = ["data.source=jsonl", _write_sources(tmp_path), "data.eval_fraction=0.2",
           f"train.steps={STEPS}", "checkpoint.save_interval=2", "checkpoint.keep_last=0"]
    sft(tmp_path / "straight", *mix)
    # A second run restored from the straight run's step-2 checkpoint (optimizer, scheduler,
    # RNG and the data state: the mix position) trains steps 3 and 4 again.
    step2 = tmp_path / "straight" / "checkpoints" / "step_0000002"
    sft(tmp_path / "resumed", *mix, f"checkpoint.load_dir={step2}")

    straight = without_timing(read_rows(tmp_path / "straight"))
    resumed = without_timing(read_rows(tmp_path / "resumed"))
    train_rows = [r for r in straight if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    # Exact float equality: the same samples in the same order, the same state.
    assert [r for r in resumed if "loss" in r] == train_rows[2:]
    assert resumed[-1] == straight[-1]

    draws = source_draws([3.0, 1.0], SEED, 0, STEPS * GLOBAL_BATCH)
    for row in train_rows:
        window = draws[(row["step"] - 1) * GLOBAL_BATCH:row["step"] * GLOBAL_BATCH]
        so_far = draws[:row["step"] * GLOBAL_BATCH]
        assert (row["data/reasoning_samples"], row["data/general_samples"]) == (
            window.count(0), window.count(1))
        assert (row["data/reasoning_consumed_samples"], row["data/general_consumed_samples"]) == (
            so_far.count(0), so_far.count(1))

    evals = [r for r in straight if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, STEPS]
    for row in evals:
        per_source = [row["eval_loss/reasoning"], row["eval_loss/general"]]
        # The overall loss weighs the sources by their loss tokens: it lies between them.
        assert min(per_source) < row["eval_loss"] < max(per_source)
    assert evals[-1]["eval_loss/reasoning"] < evals[0]["eval_loss/reasoning"]
    assert evals[-1]["eval_loss/general"] < evals[0]["eval_loss/general"]
