"""`megatron-r1 rm`: reward models trained end to end through the CLI.

- Layout: TP=2 with sequence parallelism reproduces the single-process pairwise run from the
  same policy checkpoint (loss, accuracy, margin, grad norm, held-out metrics), and a reward
  checkpoint loads at PP=2. Tolerance: relative 1e-5, as tests/e2e/test_sft_parallel.py:
  everything is fp32 (unit roundoff 6e-8) and another layout only reorders sums (measured
  at most 1.5e-6 relative; the margin, a mean difference of nearly equal scores, 1e-8
  absolute, hence abs=1e-7). Summing the gathered sequence's gradient over TP ranks (the
  gather's default backward) instead of taking this rank's slice doubles the gradient norm
  (measured 0.338 -> 0.651).
- Learning: on the generated arithmetic preferences (correct final answer preferred over a
  wrong one) the held-out pairwise accuracy goes from chance to well above it.
- Resume after a stop continues the same run, bitwise (CPU).
- Pointwise runs report held-out accuracy and AUC; a bad data line is one error naming
  file:line (exit code 2); a policy checkpoint cannot bring its optimizer state along.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from procs import read_rows, run_module

RTOL = 1e-5
QUIET = ["--set", "logging.progress_bar=false", "--set", "logging.tensorboard=false"]
# the held-out set of 32 pairs is cut into whole rounds of micro_batch_size x DP
PARITY = ["train.steps=3", "data.num_train_samples=256", "data.num_eval_samples=32",
          "data.template=none", "data.seq_length=64"]


def rm(run_dir: Path, *overrides: str, nproc: int = 1, config: str | None = None,
       check: bool = True):
    args = ["rm", *QUIET, "--set", f"logging.run_dir={run_dir}"]
    if config:
        args += ["--config", config]
    for item in overrides:
        args += ["--set", item]
    return run_module(args, nproc=nproc, check=check)


def from_policy(checkpoint: Path) -> list[str]:
    return [f"checkpoint.load_dir={checkpoint}", "checkpoint.load_optimizer=false"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, initial) -> Path:
    run = tmp_path_factory.mktemp("rm1")
    rm(run, *PARITY, *from_policy(initial))
    return run


def test_tp2_sequence_parallel_matches_single_process(tmp_path, initial, single):
    rm(tmp_path, *PARITY, *from_policy(initial), "parallel.tensor=2",
       "parallel.sequence_parallel=true", nproc=2)
    got, want = read_rows(tmp_path), read_rows(single)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1, 2, 3, 3]
    for g, w in zip(got, want):
        for key in ("loss", "accuracy", "margin", "grad_norm", "eval_loss", "eval_accuracy",
                    "eval_margin"):
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=RTOL, abs=1e-7), (g["step"], key)


def test_reward_checkpoint_records_itself_and_loads_at_pp2(tmp_path, single):
    meta = json.loads((single / "checkpoints/step_0000003/megatron_r1.json").read_text())
    assert meta["reward_model"] == {"objective": "pairwise", "template": "none",
                                    "max_length": 64}
    assert meta["model"]["hidden_size"] == 64
    assert (single / "checkpoints/hf_assets/tokenizer.json").is_file()
    final = [r for r in read_rows(single) if "eval_loss" in r][-1]
    rm(tmp_path, *PARITY, "train.steps=1", *from_policy(single / "checkpoints"),
       "parallel.pipeline=2", nproc=2)
    first = read_rows(tmp_path)[0]
    assert first["step"] == 0
    for key in ("eval_loss", "eval_accuracy", "eval_margin"):
        assert first[key] == pytest.approx(final[key], rel=RTOL, abs=1e-7), key


def test_resume_continues_the_same_run(tmp_path, initial, single):
    """Stopped after step 2 and requeued with the same command: the resumed run (weights,
    optimizer, data position from its own checkpoint) logs exactly the straight run's rows."""
    rm(tmp_path, *PARITY, *from_policy(initial), "train.stop_at_step=2")
    rm(tmp_path, *PARITY, *from_policy(initial))
    timing = {"step_time_s", "tokens_per_s"}
    got, want = ([{k: v for k, v in r.items() if k not in timing} for r in read_rows(run)]
                 for run in (tmp_path, single))
    # the resumed run logs its held-out metrics again at its start (step 2)
    assert [r for r in got if r["step"] != 2 or "loss" in r] == want


def test_pairwise_arithmetic_preferences_are_learned(tmp_path):
    """The demo model from scratch, 60 steps of 32 pairs: held-out accuracy over 128 pairs
    measured 0.625 -> 0.906 (chance is 0.5; one standard error at 128 pairs is 0.044)."""
    proc = rm(tmp_path, "train.steps=60", "train.global_batch_size=32",
              "data.num_train_samples=2048", "data.num_eval_samples=128", "data.template=none",
              "data.seq_length=64", "optim.lr_warmup_steps=5", config="configs/demo_sft.yaml")
    evals = [r for r in read_rows(tmp_path) if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 60]
    assert evals[-1]["eval_accuracy"] >= 0.75, evals
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.2, evals
    assert "held-out accuracy" in proc.stderr


def test_pointwise_run_reports_accuracy_and_auc(tmp_path):
    """20 steps from scratch on 'is the final answer correct' labels: held-out AUC measured
    0.355 -> 0.615 and BCE 0.720 -> 0.661 over 32 responses (a start, not a trained model)."""
    rm(tmp_path, "reward_model.objective=pointwise", *PARITY, "train.steps=20")
    rows = read_rows(tmp_path)
    evals = [r for r in rows if "eval_auc" in r]
    assert [r["step"] for r in evals] == [0, 20]
    for r in evals:
        assert 0.0 <= r["eval_auc"] <= 1.0 and (r["eval_accuracy"] * 32).is_integer()
    assert evals[1]["eval_auc"] > evals[0]["eval_auc"] + 0.1, evals
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"], evals
    assert all("accuracy" in r and "margin" not in r for r in rows if "loss" in r)
    meta = json.loads((tmp_path / "checkpoints/step_0000020/megatron_r1.json").read_text())
    assert meta["reward_model"]["objective"] == "pointwise"


def test_bad_data_line_is_one_error_naming_file_and_line(tmp_path):
    data = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    data.write_text(f"{good}\n{good}\n{json.dumps({'prompt': 'p', 'chosen': 'a'})}\n")
    proc = rm(tmp_path / "run", "data.source=jsonl", f"data.path={data}", "train.steps=1",
              check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"megatron-r1 rm: error: {data}:3: missing key 'rejected'")


def test_policy_optimizer_state_is_refused(tmp_path, initial):
    proc = rm(tmp_path, *PARITY, f"checkpoint.load_dir={initial}", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "has no output_layer.weight (a policy checkpoint for a reward model?)" in last
    assert "checkpoint.load_optimizer=false" in last
