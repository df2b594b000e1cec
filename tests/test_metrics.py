"""metrics.jsonl and TensorBoard: rows per step, and a resume drops what a crashed run logged
after its last checkpoint."""

import math

from megatron_r1.metrics import NONFINITE_METRICS, MetricsWriter, count_nonfinite, read_metrics


def test_rows_and_tensorboard(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=True)
    writer.log(1, {"loss": 2.5, "grad_norm": math.nan})
    writer.log(2, {"loss": 2.0})
    writer.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": 2.5, "grad_norm": None}, {"step": 2, "loss": 2.0}]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_truncates_rows_after_the_checkpoint(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    for step in range(1, 6):
        writer.log(step, {"loss": float(step)})
    resumed = MetricsWriter(tmp_path, enabled=True, tensorboard=False, start_step=3)
    resumed.log(4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_disabled_writer_writes_nothing(tmp_path):
    MetricsWriter(tmp_path, enabled=False, tensorboard=True).log(1, {"loss": 1.0})
    assert not list(tmp_path.iterdir())


def test_nonfinite_step_metrics_are_logged_as_null_and_counted(tmp_path):
    """A NaN entropy or clip fraction reaches metrics.jsonl (as null) with a count beside it,
    so a test that checks every logged value can see it; a healthy step adds no column."""
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    writer.log(1, count_nonfinite({"loss": 0.5, "entropy": math.nan, "clip_fraction": math.inf}))
    writer.log(2, count_nonfinite({"loss": 0.4, "entropy": 1.5}))
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": 0.5, "entropy": None, "clip_fraction": None,
         NONFINITE_METRICS: 2.0},
        {"step": 2, "loss": 0.4, "entropy": 1.5}]
