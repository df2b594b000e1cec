"""NaN and inf cannot pass silently: a step with a non-finite loss or gradient is skipped
(no update, the weights unchanged), counted and named; train.max_consecutive_nonfinite in a
row stop the run naming the step and the quantity; a checkpoint is never written from
non-finite weights, and `latest` keeps pointing at the last finite one. World sizes 1 and 2
(tests/e2e/nonfinite_worker.py)."""

from __future__ import annotations

import json

import pytest

from procs import REPO, run_script


@pytest.mark.parametrize(("nproc", "layout"), [
    (1, []),
    (2, ["parallel.tensor=2"]),
    (2, ["parallel.expert=2", "train.max_tokens_per_microbatch=128"]),
], ids=["single", "tp2", "ep2-budget"])
def test_nonfinite_steps_are_skipped_named_and_never_saved(tmp_path, nproc, layout):
    proc = run_script(REPO / "tests/e2e/nonfinite_worker.py", [
        f"logging.run_dir={tmp_path}", "logging.tensorboard=false", "train.global_batch_size=8",
        *layout], nproc=nproc)
    r = json.loads(next(x for x in proc.stdout.splitlines()
                        if x.startswith("RESULT "))[len("RESULT "):])
    assert r["clean"] == [True, None, {}]
    skipped = {"nonfinite_skipped": 1.0, "nonfinite_skipped_total": 1.0}
    # NaN loss: no update, weights untouched, no gradient norm reported
    assert r["nan_loss"] == [False, "loss", skipped, True, False]
    # finite loss, NaN gradients: found in the gradient buffers and named by parameter
    updated, what, counted, loss_finite, unchanged = r["nan_grad"]
    assert not updated and what.startswith("the gradient of ") and loss_finite and unchanged
    assert counted["nonfinite_skipped_total"] == 2.0
    assert r["stopped"].startswith("step 4: loss is not finite (3 skipped steps in a row, "
                                   "train.max_consecutive_nonfinite=3)")
    assert r["saved_nan"].startswith("step 5: embedding.word_embeddings.weight holds "
                                     "non-finite values; no checkpoint is written")
    assert r["latest"] == "step_0000001" and r["left_behind"] == []
