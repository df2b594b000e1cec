"""The trainer on one GPU: SFT steps and a GRPO step from a recorded rollout; tokens/s and MFU.

Nothing of the trainer ran on a GPU before this script; it runs the real stages' pieces on
CUDA without vLLM (which the lent GPU machine lacks): the session (NCCL, world size 1, the
model built and moved to the GPU, megatron's DDP and optimizer), then
  1. SFT: train steps on the recorded rows as supervised samples (prompt + completion, loss
     on the completion), through megatron_r1.train_step with the SFT loss;
  2. GRPO, phase by phase as grpo_trainer runs them: old and reference log-probs of every row
     (forward only, the reference model built beside the policy), then one optimizer step per
     mini-batch with the GRPO loss (the fused kernel where it is built: grpo.fused_loss=on,
     since `auto` keeps CUDA on the PyTorch path until this check has passed; --set
     grpo.fused_loss=off measures the PyTorch path).
The rows come from a rollout recorded in the experience store on the CPU machine
(tests/gpu/data/demo_rollout.zarr: 256 real rollout rows of the tiny model's task); every
tensor is built on the host and reaches the GPU through megatron_r1.schedule, as in training.

MFU counts the model FLOPs of the real (unpadded) tokens: 6 x activated parameters per token
plus causal attention (3 x 2 x heads x (qk + v head dims) x context per token and layer), over
the step time, against the device's dense bf16 peak (H100/H200 SXM: 989.5 TFLOPS).

    python benchmarks/bench_trainer_gpu.py --config tiny      # the demo model
    python benchmarks/bench_trainer_gpu.py --config mid       # a ~1.2B-parameter MoE
    python benchmarks/bench_trainer_gpu.py --device cpu --steps 1   # the code path, on CPU

On the lent GPU machine (Python 3.12, CUDA torch, no network): `bash benchmarks/gpu_wheels.sh`
here downloads what the package imports besides torch (35 MB, the .venv's versions); carry
gpu_wheels/ and run the one command its header gives (install, build the extension, the gpu
tests, then this script with --config tiny and mid).
Writes benchmarks/results/trainer_<device>_<time>.csv and prints RESULT lines.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from megatron.core.utils import unwrap_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance import commit, cpu_name  # noqa: E402

from megatron_r1.batching import MicroBatchPlan, build_microbatch, plan_microbatches  # noqa: E402
from megatron_r1.config import Config, load_config  # noqa: E402
from megatron_r1.experience import read_experience  # noqa: E402
from megatron_r1.grpo import forward  # noqa: E402
from megatron_r1.grpo.rollout_batch import (  # noqa: E402
    RolloutTensors,
    minibatch_order,
    stored_rollout,
    train_inputs,
    train_microbatch,
)
from megatron_r1.logprobs import REF_MODEL, dense, reference_models, score_rows  # noqa: E402
from megatron_r1.model.build import count_parameters  # noqa: E402
from megatron_r1.model.weights import copy_weights  # noqa: E402
from megatron_r1.ops import fused_kernels_available  # noqa: E402
from megatron_r1.session import end_session, micro_batching, start_session  # noqa: E402
from megatron_r1.sft import METRIC_KEYS, sft_forward_step  # noqa: E402
from megatron_r1.train_step import train_step  # noqa: E402

ROLLOUT = REPO / "tests" / "gpu" / "data" / "demo_rollout.zarr"
CONFIGS = {
    "tiny": [],  # configs/demo_sft.yaml's model (the defaults)
    "mid": ["model.num_layers=8", "model.hidden_size=2048",
            "model.ffn_hidden_size=5632", "model.num_attention_heads=16",
            "model.num_query_groups=4", "model.kv_channels=128", "model.num_experts=16",
            "model.moe_ffn_hidden_size=1408", "model.moe_router_topk=2",
            "model.moe_first_dense_layers=1", "model.vocab_size=32000",
            "model.init_method_std=0.01"],
}
PEAK_BF16_TFLOPS = {"H100": 989.5, "H200": 989.5, "H800": 989.5, "A100": 312.0}


def peak_tflops(device_name: str, given: float | None) -> float | None:
    if given:
        return given
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def train_flops(cfg: Config, activated: int, lengths: list[int]) -> float:
    """Model FLOPs of a training step (forward + backward) over sequences of these lengths."""
    m = cfg.model
    if m.multi_latent_attention:
        qk, v = m.qk_head_dim + m.qk_pos_emb_head_dim, m.v_head_dim
    else:
        qk = v = m.kv_channels or m.hidden_size // m.num_attention_heads
    tokens = sum(lengths)
    # causal: position t attends to t + 1 positions; forward 2 FLOPs per multiply-add
    attention = sum(n * (n + 1) / 2 for n in lengths) * 2 * m.num_attention_heads * (qk + v)
    return 6.0 * activated * tokens + 3.0 * attention * m.num_layers


def sft_batches(rollout: RolloutTensors, plans: list[MicroBatchPlan]) -> list[dict]:
    return [build_microbatch(p, rollout.length_R, per_token={
        "tokens": rollout.tokens_RS, "labels": rollout.labels_RS,
        "loss_mask": rollout.loss_mask_RS}) for p in plans]


def timed(fn, device: str):  # type: ignore[no-untyped-def]
    """(fn(), wall seconds), with the GPU's queued work finished on both sides."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--rollout", type=Path, default=ROLLOUT)
    parser.add_argument("--steps", type=int, default=5, help="timed SFT steps")
    parser.add_argument("--tile", type=int, default=4,
                        help="each recorded row appears this many times in the step")
    parser.add_argument("--max-tokens", type=int, default=8192,
                        help="train.max_tokens_per_microbatch")
    parser.add_argument("--pack", action="store_true", help="train.pack_sequences")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for the code path", file=sys.stderr)
        return 2
    columns = read_experience(args.rollout)
    rollout, _, _, _ = stored_rollout(columns)
    rows = len(rollout) * args.tile
    tile = torch.arange(rows) % len(rollout)
    rollout = RolloutTensors(**{k: getattr(rollout, k)[tile] for k in (
        "tokens_RS", "labels_RS", "loss_mask_RS", "sampler_logp_RS", "length_R",
        "prompt_len_R", "completion_len_R", "prompt_index_R")})
    seq = int(columns["tokens"].shape[1])
    run_dir = tempfile.mkdtemp(prefix="bench_trainer_")
    cfg = load_config(None, [
        *CONFIGS[args.config], f"model.params_dtype={args.dtype}", f"data.seq_length={seq}",
        f"train.global_batch_size={rows // 4}", "train.micro_batch_size=1",
        f"train.max_tokens_per_microbatch={max(args.max_tokens, seq)}",
        f"train.pack_sequences={str(args.pack).lower()}", "grpo.group_size=8",
        f"grpo.prompts_per_rollout={rows // 8}", "grpo.kl_coef=0.001", "optim.lr=1e-5",
        "optim.lr_warmup_steps=0", f"logging.run_dir={run_dir}", "logging.tensorboard=false",
        f"parallel.backend={'nccl' if args.device == 'cuda' else 'gloo'}",
        # the GPU check of the CUDA kernel in the trainer: `auto` would not pick it on CUDA
        f"grpo.fused_loss={'on' if fused_kernels_available(args.device) else 'off'}",
        *args.overrides])
    os.environ.setdefault("MASTER_PORT", "29547")
    session = start_session(cfg, extra_models=reference_models(cfg))
    ctx = session.ctx
    ref_model = session.extra_models[REF_MODEL]
    copy_weights(session.model, ref_model)
    activated = count_parameters(unwrap_model(session.model), cfg.model).activated
    how = micro_batching(cfg, ctx.layout)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    peak = peak_tflops(device_name, args.peak_tflops)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    results = []

    def report(phase: str, seconds: float, lengths: list[int], flops: float | None,
               **extra: object) -> None:
        row = {"device": device_name, "commit": commit(), "config": args.config,
               "dtype": cfg.model.params_dtype, "phase": phase, "rows": len(lengths),
               "tokens": sum(lengths), "seq_length": seq, "max_tokens": how.max_tokens,
               "packed": how.pack, "activated_params": activated, "seconds": round(seconds, 5),
               "tokens_per_s": round(sum(lengths) / seconds),
               "mfu": round(flops / seconds / (peak * 1e12), 4) if flops and peak else "",
               **extra}
        results.append(row)
        print("RESULT " + json.dumps(row), flush=True)

    # 1. SFT on the recorded rows (one global batch per step)
    order = minibatch_order(rows, cfg.train.global_batch_size, seed=0, rollout_index=0)
    step_lengths = [rollout.length_R[idx].tolist() for idx in order]
    sft_plans = [plan_microbatches(idx.tolist(), lens, 1, how)[0]
                 for idx, lens in zip(order, step_lengths)]
    times = []
    for i in range(args.steps + 1):  # the first is the warm-up
        batches = sft_batches(rollout, sft_plans[i % len(sft_plans)])
        result, seconds = timed(lambda b=batches: train_step(
            session.model, session.optimizer, session.scheduler, b, sft_forward_step,
            METRIC_KEYS, ctx), args.device)
        if i:
            times.append(seconds)
    lengths = step_lengths[0]
    report("sft_step", statistics.median(times), lengths, train_flops(cfg, activated, lengths),
           loss=round(result.metrics["loss"], 4))

    # 2. GRPO: old and reference log-probs of every row, then one step per mini-batch
    plans = [plan_microbatches(idx.tolist(), lens, 1, how)[0]
             for idx, lens in zip(order, step_lengths)]
    every = [p for per_step in plans for p in per_step]
    all_lengths = rollout.length_R.tolist()
    old, logp_s = timed(lambda: score_rows(session.model, rollout, every, session, 1.0),
                        args.device)
    ref, _ = timed(lambda: score_rows(ref_model, rollout, every, session, 1.0), args.device)
    report("grpo_logprob", logp_s, all_lengths, train_flops(cfg, activated, all_lengths) / 3)
    shape = rollout.tokens_RS.shape
    gen = torch.Generator().manual_seed(0)
    inputs = train_inputs(rollout, torch.randn(rows, generator=gen), dense(old, shape),
                          dense(ref, shape), cfg.grpo.loss_aggregation, seq)
    loss_step = forward.loss_step(cfg.grpo, 1.0, ctx.tp_group)
    times, metrics = [], {}
    for m, per_step in enumerate(plans):
        batches = [train_microbatch(rollout, p, inputs) for p in per_step]
        result, seconds = timed(lambda b=batches: train_step(
            session.model, session.optimizer, session.scheduler, b, loss_step,
            forward.LOSS_METRICS, ctx), args.device)
        if m:
            times.append(seconds)
        metrics = result.metrics
    lengths = step_lengths[-1]
    report("grpo_step", statistics.median(times or [seconds]), lengths,
           train_flops(cfg, activated, lengths), loss=round(metrics["loss"], 4),
           kl=round(metrics["kl"], 6), nonfinite=result.nonfinite or "")
    if args.device == "cuda":
        report("peak_memory", 1.0, [0], None,
               peak_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2))
    end_session(session)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"trainer_{args.device}_{args.config}_{stamp}.csv"
    fields = list(dict.fromkeys(k for r in results for k in r))  # every column, first seen first
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(results)
    print(f"wrote {path}")
    return 0 if all(r.get("nonfinite", "") == "" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
