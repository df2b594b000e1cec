"""Every tensor that meets the model is on the model's device: the trainer's forward steps run
with the model on `meta` standing in for CUDA while the batches are built on the host, so a
batch (or a loss input, or packed-sequence metadata) left behind fails here as it would on
the first CUDA forward (tests/e2e/device_guard_worker.py)."""

from __future__ import annotations

import json

from procs import REPO, run_script


def test_batches_reach_the_model_on_its_device_and_strays_are_refused(tmp_path):
    proc = run_script(REPO / "tests/e2e/device_guard_worker.py", [f"logging.run_dir={tmp_path}"])
    report = json.loads(next(x for x in proc.stdout.splitlines()
                             if x.startswith("RESULT "))[len("RESULT "):])
    assert report["model_device"] == "meta"
    assert report["sft"] == "meta"  # SFT forward and backward
    assert report["grpo"] == ["meta", "meta"]  # scoring, then the loss forward and backward
    assert report["packed"] == ["meta"]  # every tensor of a packed batch, cu_seqlens too
    assert report["reward_model"] == ["meta", "meta"]  # a pairwise step, then serving's scores
    # the guard bites: what the door would have moved, handed over directly, is refused
    assert report["host_batch"].startswith("refused: a (2, "), report
    assert report["host_labels"].startswith("refused"), report
    assert report["host_loss_mask"].startswith("refused"), report
