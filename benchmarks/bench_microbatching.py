"""Padding and step time of one GRPO optimizer step on an R1-like long-tailed rollout.

Before this change every rollout row was padded to data.seq_length; now each micro-batch is
padded to its own longest row, or formed by a token budget, or packed. The script runs the
real GRPO train step (megatron_r1.train_step with the GRPO loss) on the same synthetic
rollout under each layout and reports the share of computed positions that are padding, the
median step time and the trained tokens per second, as a ratio to the padded-to-seq_length
baseline measured in the same run.

Response lengths follow R1's shape: log-normal (most responses a small fraction of the limit,
a long tail), capped at the limit, after a fixed-length prompt.

    python benchmarks/bench_microbatching.py                      # CPU, tiny MoE, fp32
    python benchmarks/bench_microbatching.py --device cuda --dtype bf16 --seq-length 8192 \\
        --set model.hidden_size=1024 ...                          # on a GPU

Writes benchmarks/results/microbatching_<device>_<time>.csv (device, commit, shapes).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance import commit, cpu_name  # noqa: E402

from megatron_r1.batching import (  # noqa: E402
    MicroBatching,
    MicroBatchPlan,
    padding_fraction,
    plan_microbatches,
    rank_microbatches,
)
from megatron_r1.config import load_config  # noqa: E402
from megatron_r1.grpo import forward  # noqa: E402
from megatron_r1.grpo.rollout_batch import (  # noqa: E402
    pack_rollout,
    train_inputs,
    train_microbatch,
)
from megatron_r1.rollout.types import Completion  # noqa: E402
from megatron_r1.session import end_session, start_session  # noqa: E402
from megatron_r1.train_step import train_step  # noqa: E402


def r1_like_lengths(rows: int, limit: int, seed: int) -> list[int]:
    """Response lengths: log-normal with median limit / 8 and sigma 1, capped at `limit`."""
    rng = random.Random(seed)
    median = limit / 8
    return [max(1, min(limit, int(rng.lognormvariate(0.0, 1.0) * median))) for _ in range(rows)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rows", type=int, default=64, help="rollout rows in the step")
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per layout")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra config overrides (model shape)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here", file=sys.stderr)
        return 2
    seq, b = args.seq_length, args.micro_batch_size
    run_dir = tempfile.mkdtemp(prefix="bench_microbatching_")
    cfg = load_config(None, [
        f"data.seq_length={seq}", f"model.max_position_embeddings={max(seq, 4096)}",
        f"model.params_dtype={args.dtype}", f"train.global_batch_size={args.rows}",
        f"train.micro_batch_size={b}", "grpo.kl_coef=0.001", f"logging.run_dir={run_dir}",
        "logging.tensorboard=false", f"parallel.backend={'nccl' if args.device == 'cuda' else 'gloo'}",
        *args.overrides])
    os.environ.setdefault("MASTER_PORT", "29533")
    session = start_session(cfg)
    ctx = session.ctx

    lengths = r1_like_lengths(args.rows, seq + 1 - args.prompt, seed=0)
    g = torch.Generator().manual_seed(0)
    vocab = cfg.model.vocab_size
    groups = [[Completion(tuple(torch.randint(3, vocab, (n,), generator=g).tolist()),
                          (0.0,) * n, "", "stop")] for n in lengths]
    prompts = [torch.randint(3, vocab, (args.prompt,), generator=g).tolist()] * args.rows
    rollout = pack_rollout(prompts, groups, seq, pad_id=0)
    logp = -2.0 - torch.rand(rollout.tokens_RS.shape, generator=g)
    inputs = train_inputs(rollout, torch.randn(args.rows, generator=g), logp, logp + 0.01,
                          cfg.grpo.loss_aggregation, seq)
    used = dict(enumerate(rollout.length_R.tolist()))
    rows = list(range(args.rows))
    budget = b * seq
    layouts = {
        # the old layout: megatron's slices, every row padded to data.seq_length
        "padded_to_seq_length": [[MicroBatchPlan(tuple(m), seq) for m in
                                  rank_microbatches(rows, b, 0, 1)]],
        "own_longest_row": plan_microbatches(rows, rollout.length_R.tolist(), 1,
                                             MicroBatching(b)),
        "token_budget": plan_microbatches(rows, rollout.length_R.tolist(), 1,
                                          MicroBatching(b, max_tokens=budget)),
        "token_budget_packed": plan_microbatches(rows, rollout.length_R.tolist(), 1,
                                                 MicroBatching(b, max_tokens=budget, pack=True)),
    }
    step_fn = forward.loss_step(cfg.grpo, 1.0, ctx.tp_group)
    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    results = []
    for name, plans in layouts.items():
        batches = [train_microbatch(rollout, p, inputs) for p in plans[0]]
        train_step(session.model, session.optimizer, session.scheduler, batches, step_fn,
                   forward.LOSS_METRICS, ctx)  # warm-up
        times = []
        for _ in range(args.steps):
            if args.device == "cuda":
                torch.cuda.synchronize()
            result = train_step(session.model, session.optimizer, session.scheduler, batches,
                                step_fn, forward.LOSS_METRICS, ctx)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(result.metrics["step_time_s"])
        median = statistics.median(times)
        results.append({
            "device": device, "commit": commit(), "dtype": args.dtype, "layout": name,
            "rows": args.rows, "seq_length": seq, "prompt": args.prompt,
            "micro_batch_size": b, "token_budget": budget if "budget" in name else "",
            "microbatches": len(plans[0]), "positions": sum(p.positions for p in plans[0]),
            "tokens": sum(used.values()),
            "padding_fraction": round(padding_fraction(plans, used), 4),
            "median_step_s": round(median, 4), "tokens_per_s": round(sum(used.values()) / median),
            "hidden": cfg.model.hidden_size, "layers": cfg.model.num_layers,
            "experts": cfg.model.num_experts})
    base = results[0]["median_step_s"]
    for row in results:
        row["speedup_vs_padded"] = round(base / row["median_step_s"], 2)
        print(row, flush=True)
    end_session(session)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"microbatching_{args.device}_{stamp}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
