"""Metric sinks of a run: metrics.jsonl (one JSON object per logged step) and TensorBoard.

Layer L1. Only rank 0 writes. On resume from step k the JSONL keeps the lines of steps <= k
and drops those a crashed run logged after its last checkpoint, so the file reads as one
uninterrupted run; TensorBoard gets the same purge (`purge_step`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

NONFINITE_METRICS = "nonfinite_metrics"
"""How many of a step's logged values are NaN or infinite (each written as null)."""


def count_nonfinite(metrics: dict[str, float]) -> dict[str, float]:
    """`metrics` with every value kept, non-finite ones included (MetricsWriter writes them
    as null), and NONFINITE_METRICS counting them, so that a NaN entropy or clip fraction is
    seen in metrics.jsonl instead of dropped. The count is logged only when it is non-zero
    (0 on every healthy step would add a column that says nothing)."""
    bad = sum(1 for v in metrics.values() if not math.isfinite(v))
    return {**metrics, NONFINITE_METRICS: float(bad)} if bad else dict(metrics)


class MetricsWriter:
    """Append step metrics to <run_dir>/metrics.jsonl and TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: str | os.PathLike[str], *, enabled: bool, tensorboard: bool,
                 start_step: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb: Any = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                     purge_step=start_step + 1)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        fd, tmp = tempfile.mkstemp(prefix=".metrics.", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Write one step's metrics (non-finite values are written as null in JSON)."""
        if not self.enabled:
            return
        row = {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
