"""The GRPO run at a glance: reward, accuracy, response length, KL and the train/rollout
mismatch (with its importance-sampling correction) in one PNG.

Layer L1 (matplotlib, headless Agg backend). Reads metrics.jsonl, so it can also be run on a
finished or running run directory: `python -m megatron_r1.plot RUN_DIR`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from megatron_r1.metrics import read_metrics

PANELS = (
    ("Reward", ("reward/total_mean", "reward/accuracy_mean", "reward/format_mean")),
    ("Accuracy", ("reward/accuracy_mean", "eval/pass@1")),
    ("Response length (tokens)", ("response/length_mean",)),
    ("KL to reference", ("kl",)),
    ("Train/rollout mismatch (nats)", ("mismatch/logp_abs_diff_mean",
                                       "mismatch/k3_kl_sampler_trainer",
                                       "mismatch/above_threshold_fraction")),
    ("pi_old / pi_sampler", ("mismatch/ratio_min", "mismatch/ratio_mean", "mismatch/ratio_max",
                             "correction/tis_weight_mean",
                             "correction/masked_sequence_fraction")),
)


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def panel_series(rows: list[dict]) -> list[tuple[str, dict[str, tuple[list[int], list[float]]]]]:
    """Every panel's title and the curves it draws (metrics with at least one point)."""
    panels = []
    for title, keys in PANELS:
        curves = {key: _series(rows, key) for key in keys}
        panels.append((title, {k: v for k, v in curves.items() if v[0]}))
    return panels


def plot_grpo_curves(metrics_path: str | os.PathLike[str],
                     out_path: str | os.PathLike[str]) -> Path:
    """Write the PNG (a panel per entry of PANELS) and return its path."""
    rows = read_metrics(metrics_path)
    # Imported here: matplotlib costs about a second at start-up on every rank, and only the
    # logging rank draws, once, at the end.
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes or CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(11, 10), constrained_layout=True)
    for ax, (title, curves) in zip(axes.flat, panel_series(rows)):
        for key, (steps, values) in curves.items():
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
