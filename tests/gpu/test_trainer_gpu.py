"""The trainer's GPU script (benchmarks/bench_trainer_gpu.py): SFT steps, the GRPO log-prob
phase and GRPO steps from the recorded rollout in tests/gpu/data. On CPU the same code path
runs (bf16, padded and packed) so that the script cannot rot where no GPU is; on CUDA it is
the check the lent GPU machine runs (marked `gpu`, skipped elsewhere)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from procs import REPO, run_script

SCRIPT = REPO / "benchmarks" / "bench_trainer_gpu.py"


def results(proc):
    return {r["phase"]: r for r in (json.loads(line[len("RESULT "):])
                                    for line in proc.stdout.splitlines()
                                    if line.startswith("RESULT "))}


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_the_gpu_script_runs_its_phases_on_cpu(tmp_path, pack):
    proc = run_script(SCRIPT, ["--device", "cpu", "--steps", "1", "--tile", "1",
                               "--out", str(tmp_path), *(["--pack"] if pack else [])])
    got = results(proc)
    assert set(got) == {"sft_step", "grpo_logprob", "grpo_step"}
    assert got["grpo_logprob"]["rows"] == 256 and got["grpo_logprob"]["tokens"] > 256 * 20
    for row in got.values():
        assert row["dtype"] == "bf16" and row["packed"] == pack and row["tokens_per_s"] > 0
    assert math.isfinite(got["sft_step"]["loss"]) and got["grpo_step"]["nonfinite"] == ""
    assert len(list(tmp_path.glob("trainer_cpu_tiny_*.csv"))) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", ["tiny", "mid"])
def test_the_trainer_trains_on_cuda(tmp_path, config):
    proc = run_script(SCRIPT, ["--config", config, "--out", str(tmp_path)], timeout=900)
    got = results(proc)
    assert got["grpo_step"]["nonfinite"] == "" and math.isfinite(got["grpo_step"]["loss"])
    assert got["sft_step"]["mfu"] != ""
