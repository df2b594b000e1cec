"""The GRPO curves PNG is drawn from metrics.jsonl."""

import json

from megatron_r1.plot import plot_grpo_curves


def test_png_from_metrics(tmp_path):
    rows = [{"step": s, "reward/total_mean": 0.1 * s, "reward/accuracy_mean": 0.05 * s,
             "response/length_mean": 20 + s, "kl": 0.01 * s} for s in range(1, 6)]
    rows.append({"step": 5, "eval/pass@1": 0.4})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_grpo_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
