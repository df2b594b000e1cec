"""The GRPO run at a glance: reward, accuracy, response length and KL curves in one PNG.

Layer L1 (matplotlib, headless Agg backend). Reads metrics.jsonl, so it can also be run on a
finished or running run directory: `python -m megatron_r1.plot RUN_DIR`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes or CI
import matplotlib.pyplot as plt

from megatron_r1.metrics import read_metrics

PANELS = (
    ("Reward", ("reward/total_mean", "reward/accuracy_mean", "reward/format_mean")),
    ("Accuracy", ("reward/accuracy_mean", "eval/pass@1")),
    ("Response length (tokens)", ("response/length_mean",)),
    ("KL to reference", ("kl",)),
)


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_grpo_curves(metrics_path: str | os.PathLike[str],
                     out_path: str | os.PathLike[str]) -> Path:
    """Write the four-panel PNG and return its path."""
    rows = read_metrics(metrics_path)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for key in keys:
            steps, values = _series(rows, key)
            if steps:
                style = "o-" if key.startswith("eval/") else "-"
                ax.plot(steps, values, style, label=key, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    out = Path(out_path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    run = Path(sys.argv[1])
    print(plot_grpo_curves(run / "metrics.jsonl", run / "grpo_curves.png"))
