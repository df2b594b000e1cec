"""Distil the demo's GRPO policy into a tiny dense Qwen2 student, end to end, and record it.

Not part of CI (about 10 minutes on 2 CPU cores). Needs `make demo` first (the teacher:
runs/demo/grpo/checkpoints). Runs the documented commands as subprocesses, in order:

  megatron-r1 eval    teacher held-out pass@1 (configs/distill_teacher.yaml)
  megatron-r1 sample  teacher data (configs/distill_teacher.yaml)
  python -m megatron_r1.student, megatron-r1 convert hf-to-mcore   the student
  megatron-r1 eval    student before SFT (the converted random weights)
  megatron-r1 sft     student (configs/distill_student_qwen2.yaml)
  megatron-r1 eval    student after SFT
  megatron-r1 convert mcore-to-hf   export

and writes benchmarks/results/distill_cpu_<UTC time>.json (commit, device, shapes, counts,
pass@1 before/after, wall times). Usage: `python benchmarks/bench_distill.py [--root DIR]
[--set-teacher K=V ...] [--set-student K=V ...]`; outputs go under --root (runs/distill).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from provenance import REPO, commit, cpu_name

TEACHER = "configs/distill_teacher.yaml"
STUDENT = "configs/distill_student_qwen2.yaml"


def _run(args: list[str]) -> float:
    """Run one command from the repository root; returns its wall time."""
    start = time.perf_counter()
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=REPO, check=True)
    return time.perf_counter() - start


def _pass_at_1(run_dir: Path) -> dict[str, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="runs/distill", type=Path)
    parser.add_argument("--set-teacher", action="append", default=[], metavar="K=V")
    parser.add_argument("--set-student", action="append", default=[], metavar="K=V")
    args = parser.parse_args()
    root = args.root
    hf, mc, sft = root / "student" / "hf", root / "student" / "mcore", root / "student" / "sft"
    teacher_sets = [x for kv in [f"logging.run_dir={root / 'teacher'}", *args.set_teacher]
                    for x in ("--set", kv)]
    student_sets = [x for kv in [f"data.path={root / 'teacher' / 'rejection_sampled.jsonl'}",
                                 f"data.tokenizer={hf}", f"checkpoint.load_dir={mc}",
                                 f"logging.run_dir={sft}", *args.set_student]
                    for x in ("--set", kv)]
    student_base = root / "student.yaml"  # the student config on this root's model.yaml
    cli = ["-m", "megatron_r1"]
    times: dict[str, float] = {}
    times["teacher_eval"] = _run([*cli, "eval", "--config", TEACHER, *teacher_sets,
                                  "--set", f"logging.run_dir={root / 'teacher_eval'}"])
    times["sample"] = _run([*cli, "sample", "--config", TEACHER, *teacher_sets])
    times["student_init"] = _run(["-m", "megatron_r1.student", "--out", str(hf)])
    times["convert_in"] = _run([*cli, "convert", "hf-to-mcore", "--hf", str(hf),
                                "--out", str(mc)])
    import yaml

    student = yaml.safe_load((REPO / STUDENT).read_text())
    student["base"] = str((REPO / mc / "model.yaml").resolve())
    student_base.write_text(yaml.safe_dump(student, sort_keys=False))
    evaluate = [*cli, "eval", "--config", str(student_base), *student_sets,
                "--set", "data.source=arithmetic"]
    times["student_eval_before"] = _run([*evaluate, "--set",
                                         f"logging.run_dir={root / 'student' / 'eval_before'}"])
    times["student_sft"] = _run([*cli, "sft", "--config", str(student_base), *student_sets])
    times["student_eval_after"] = _run([*evaluate, "--set", f"checkpoint.load_dir={sft}/checkpoints",
                                        "--set",
                                        f"logging.run_dir={root / 'student' / 'eval_after'}"])
    times["convert_out"] = _run([*cli, "convert", "mcore-to-hf", "--ckpt",
                                 str(sft / "checkpoints"), "--out", str(root / "student" / "export")])

    report = json.loads((root / "teacher" / "rejection_sampled.jsonl.report.json").read_text())
    sft_rows = [json.loads(x) for x in (sft / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in sft_rows if "loss" in r]
    config = yaml.safe_load((sft / "config.yaml").read_text())
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    # A copy of the tree without .git (another machine) names its commit in the environment.
    head = os.environ.get("MEGATRON_R1_COMMIT_FULL") or subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, text=True, capture_output=True).stdout.strip()
    dirty = os.environ.get("MEGATRON_R1_DIRTY") == "1" or subprocess.run(
        ["git", "status", "--porcelain"], cwd=REPO, text=True,
        capture_output=True).stdout.strip() != ""
    result: dict[str, Any] = {
        "time_utc": stamp, "device": "cpu 2 cores", "cpu": cpu_name(),
        "commit": head, "commit_short": commit(), "dirty": dirty,
        "configs": [TEACHER, STUDENT],
        "overrides": {"teacher": args.set_teacher, "student": args.set_student},
        "teacher": {"checkpoint": "runs/demo/grpo/checkpoints", "family": "qwen3_moe",
                    "shape": "2 layers, hidden 128, 4 experts top-2, vocab 512 (built-in "
                             "arithmetic tokenizer, with bos)",
                    "held_out": _pass_at_1(root / "teacher_eval")},
        "samples": {k: v for k, v in report.items() if k.startswith(("sample/", "time/"))},
        "student": {
            "family": "qwen2",
            "shape": {k: config["model"][k] for k in (
                "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "kv_channels", "vocab_size", "add_qkv_bias",
                "tie_embeddings")},
            "tokenizer": "Qwen2-style BPE, no bos, <|endoftext|> eos (megatron_r1.student)",
            "sft": {k: config["train"][k] for k in ("steps", "global_batch_size")} | {
                "lr": config["optim"]["lr"], "seq_length": config["data"]["seq_length"],
                "loss_first": losses[0], "loss_last": losses[-1]},
            "held_out_before": _pass_at_1(root / "student" / "eval_before"),
            "held_out_after": _pass_at_1(root / "student" / "eval_after"),
        },
        "eval_protocol": "128 held-out arithmetic questions x 4 samples, temperature 0.6, "
                         "top-p 0.95, a seed per question",
        "wall_time_s": {k: round(v, 1) for k, v in times.items()},
    }
    out = REPO / "benchmarks" / "results" / f"distill_cpu_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
