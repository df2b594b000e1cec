"""Peak activation memory of one training micro-batch: measured on a GPU vs the planner.

For each case (model shape x recompute setting) the script builds the policy with
megatron_r1's own builder on one CUDA device (NCCL, world size 1), wraps it for training
(megatron DDP, distributed optimizer), runs one warm-up step so that gradient buffers and
optimizer states exist, then measures `torch.cuda.max_memory_allocated()` during one
forward + backward of one micro-batch, minus what was allocated before it. The planner's
estimate for the same micro-batch (megatron_r1.plan.activations, attention="unfused" since
the local spec runs without Transformer Engine) is written beside it.

    python benchmarks/bench_plan_memory.py                 # on a CUDA machine
    python benchmarks/bench_plan_memory.py --cpu-smoke     # code path only, no measurement

Writes benchmarks/results/plan_memory_<device>_<time>.csv (device, commit, shapes, bytes).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance import commit  # noqa: E402

from megatron_r1.config import load_config  # noqa: E402
from megatron_r1.layout import padded_vocab_size, resolve_layout  # noqa: E402
from megatron_r1.plan.activations import (  # noqa: E402
    MicroBatchShape,
    kept_layer_bytes,
    layer_bytes,
    loss_bytes,
)
from megatron_r1.plan.counts import LayerKind  # noqa: E402

# (name, overrides): small enough for one 80 GB GPU, large enough that activations dominate.
CASES: list[tuple[str, list[str]]] = [
    ("gqa_moe", ["model.num_layers=4", "model.hidden_size=1024", "model.ffn_hidden_size=2816",
                 "model.num_attention_heads=16", "model.num_query_groups=4",
                 "model.kv_channels=64", "model.num_experts=8", "model.moe_ffn_hidden_size=512",
                 "model.moe_router_topk=2", "model.vocab_size=32000",
                 "model.moe_first_dense_layers=1"]),
    ("mla_moe", ["model.num_layers=4", "model.hidden_size=1024", "model.ffn_hidden_size=2816",
                 "model.num_attention_heads=16", "model.multi_latent_attention=true",
                 "model.q_lora_rank=384", "model.kv_lora_rank=128", "model.qk_head_dim=64",
                 "model.qk_pos_emb_head_dim=32", "model.v_head_dim=64",
                 "model.qk_layernorm=true", "model.num_experts=8",
                 "model.moe_ffn_hidden_size=512", "model.moe_router_topk=2",
                 "model.moe_shared_expert_size=512", "model.moe_first_dense_layers=1",
                 "model.moe_router_score_function=sigmoid", "model.vocab_size=32000"]),
]
SEQ_LENGTHS = (2048, 4096)
RECOMPUTE = ("none", "selective", "full")



def estimate(cfg, seq: int) -> float:  # type: ignore[no-untyped-def]
    """The planner's activation bytes of one micro-batch on a one-stage, one-GPU layout."""
    m = cfg.model
    shape = MicroBatchShape(micro_batch_size=cfg.train.micro_batch_size, seq_length=seq,
                            tensor=1, context=1, expert_tensor=1, sequence_parallel=False,
                            act_bytes=2 if m.params_dtype != "fp32" else 4, attention="unfused",
                            moe_imbalance=1.0)
    kinds: list[LayerKind] = ["dense" if i < m.moe_first_dense_layers else "moe"
                              for i in range(m.num_layers)]
    kept = sum(kept_layer_bytes(m, shape, k == "moe", m.recompute) for k in kinds)
    working = max(layer_bytes(m, shape, k == "moe", "none") for k in set(kinds))
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, 1)
    return kept + working + loss_bytes(m, shape, vocab)


def measure(cfg, seq: int, device: str) -> float | None:  # type: ignore[no-untyped-def]
    """Peak bytes allocated by one forward + backward beyond what was allocated before."""
    from megatron_r1.model.build import build_model
    from megatron_r1.optim import build_optimizer, wrap_for_training
    from megatron_r1.parallel.init import destroy_parallel, init_parallel
    from megatron_r1.parallel.launch_env import discover

    layout = resolve_layout(cfg.parallel, cfg.model, cfg.train, 1, seq)
    ctx = init_parallel(layout, cfg.parallel, discover({}), cfg.train.seed)
    try:
        model = wrap_for_training(build_model(cfg.model, cfg.parallel, ctx), cfg.model,
                                  cfg.parallel, ctx)
        optimizer, _ = build_optimizer(model, cfg.optim, cfg.model, cfg.parallel, 10, ctx)
        b = cfg.train.micro_batch_size
        tokens = torch.randint(0, cfg.model.vocab_size, (b, seq), device=ctx.device)
        positions = torch.arange(seq, device=ctx.device).expand(b, seq)

        def step() -> None:
            loss = model[0](tokens, positions, None, labels=tokens)
            loss.float().mean().backward()

        step()  # warm-up: gradient buffers, optimizer states, allocator pools
        optimizer.step()
        optimizer.zero_grad()
        if device != "cuda":
            step()
            return None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    finally:
        destroy_parallel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run every case's step on CPU (tiny sequence), no measurement")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke, or on the GPU machine", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"plan_memory_{name.replace(' ', '_')}_{stamp}.csv"
    rows = []
    seqs = (64,) if args.cpu_smoke else SEQ_LENGTHS
    # On CPU, recomputation fails: megatron's checkpointed forward re-runs in autograd's
    # backward thread, where megatron_compat's CUDA-literal redirection (a thread-local
    # TorchFunctionMode) is not active. GPUs need no redirection.
    recomputes = ("none",) if args.cpu_smoke else RECOMPUTE
    for case, overrides in CASES:
        for seq in seqs:
            for recompute in recomputes:
                dtype = "fp32" if args.cpu_smoke else "bf16"
                cfg = load_config(None, [*overrides, f"model.recompute={recompute}",
                                         f"model.params_dtype={dtype}",
                                         "model.transformer_impl=local",
                                         f"data.seq_length={seq}", "train.micro_batch_size=1",
                                         "train.global_batch_size=1"])
                est = estimate(cfg, seq)
                got = measure(cfg, seq, device)
                row = {"device": name, "commit": commit(), "case": case, "seq": seq,
                       "micro_batch": 1, "recompute": recompute, "dtype": dtype,
                       "estimated_bytes": int(est),
                       "measured_bytes": "" if got is None else int(got),
                       "estimated_over_measured": "" if got is None else f"{est / got:.3f}"}
                rows.append(row)
                print(row, flush=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
