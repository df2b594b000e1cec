"""Benchmark: per-token GRPO loss, forward + backward, every implementation in ONE run.

Implementations (each computes per-token loss/KL/clip flags and d loss / d logits):
  eager        megatron_r1.ops.grpo_token_loss_reference (fp32 upcast, log_softmax, gather,
               entropy) + autograd: the spec, as eager code writes it
  compile      torch.compile of the same function (GPU, TP=1 shapes unless --compile-all)
  liger        Liger-Kernel 0.8.5 triton_grpo_loss, inplace=True, reduce=False (GPU; needs
               the wheel on PYTHONPATH, see csrc/NOTES.md)
  ours_fused   grpo_token_loss(grad_scale=w, inplace_grad=True): gradient computed in the
               forward while the row is on chip, written over the logits (1 read + 1 write)
  ours_3pass   grpo_token_loss(inplace_grad=True): stats in the forward, gradient in the
               backward (1 read, then 1 read + 1 write), Liger's byte count
  ours_vp      the per-rank kernels of the vocab-parallel path (grpo_stats, [N] math,
               grpo_grad_), i.e. the TP forward with grad_scale minus its all-reduces

Shapes: B x L tokens (default 8 x 2048), vocabularies V (151,936 Qwen, 129,280 DeepSeek-V3)
split by TP degrees 1, 4, 8: each run is one rank's problem [B*L, V/tp]. Timing: per-iteration
device events around forward+backward only (the logits are redrawn from a fixed seed before
each iteration, outside the timed region, since in-place variants consume them; one
[B, L+1, V] buffer serves every variant, ours use its first B*L rows), median of --repeat
after --warmup. The copy bandwidth of the device (bytes read + written by a
large device-to-device copy) gives the floors: 2 passes = 2 * N * V * itemsize / copy_bw,
3 passes = 1.5x that. Rows go to benchmarks/results/grpo_loss_<device>_<time>.csv (or --out)
with device, commit, torch version and shape; a table is printed last.

  python benchmarks/bench_grpo_loss.py                 # GPU: the issue's shapes
  python benchmarks/bench_grpo_loss.py --quick         # small shapes, seconds
  python benchmarks/bench_grpo_loss.py --device cpu    # CPU: C++ kernels vs eager
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance import commit  # noqa: E402

from megatron_r1.ops import grpo_loss_kernels as kernels  # noqa: E402
from megatron_r1.ops import grpo_token_loss, grpo_token_loss_reference  # noqa: E402
from megatron_r1.ops.grpo_loss import fused_kernels_available  # noqa: E402
from megatron_r1.ops.grpo_loss_reference import token_terms  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
LOSS_KW = dict(clip_low=0.2, clip_high=0.2, kl_coef=0.001, kl_estimator="k3", temperature=1.0)



def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu x{torch.get_num_threads()} threads"


# ---- timing ---------------------------------------------------------------------------------
class Timer:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure(self, prepare: Callable[[], object], run: Callable[[object], object],
                warmup: int, repeat: int) -> tuple[list[float], object]:
        """Times of `run(prepare())` in ms (prepare untimed), and run's last result."""
        times, out = [], None
        for i in range(warmup + repeat):
            inp = prepare()
            self.sync()
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                out = run(inp)
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                out = run(inp)
                ms = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times.append(ms)
        return times, out


def copy_bandwidth(device: torch.device, timer: Timer, gib: float) -> float:
    """GB/s of a device-to-device copy, counting bytes read + written (median of 10)."""
    n = int(gib * 2**30) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    times, _ = timer.measure(lambda: None, lambda _: dst.copy_(src), warmup=3, repeat=10)
    return 2 * n * 4 / (statistics.median(times) * 1e-3) / 1e9


# ---- problem ------------------------------------------------------------------------------
@dataclass
class Problem:
    batch: int
    seqlen: int
    vocab: int      # full vocabulary
    tp: int
    dtype: torch.dtype
    device: torch.device

    @property
    def n(self) -> int:
        return self.batch * self.seqlen

    @property
    def v_local(self) -> int:
        return self.vocab // self.tp

    def bytes_2pass(self) -> int:
        return 2 * self.n * self.v_local * torch.empty(0, dtype=self.dtype).element_size()


def make_inputs(p: Problem, seed: int = 0) -> dict[str, torch.Tensor]:
    """The logits buffer and per-token tensors like a real GRPO micro-batch."""
    g = torch.Generator(device=p.device).manual_seed(seed)
    dev, b, sl, v = p.device, p.batch, p.seqlen, p.v_local
    logits = torch.empty(b, sl + 1, v, dtype=p.dtype, device=dev)  # Liger wants L + 1 rows
    target = torch.randint(0, v, (b, sl), device=dev, generator=g)
    typical = -math.log(v)
    old = typical + 0.3 * torch.randn(b, sl, device=dev, generator=g)
    ref = typical + 0.3 * torch.randn(b, sl, device=dev, generator=g)
    adv_b = torch.randn(b, device=dev, generator=g)
    lengths = torch.randint(sl // 2, sl + 1, (b,), device=dev, generator=g)
    mask = torch.arange(sl, device=dev)[None, :] < lengths[:, None]
    # seq-mean-token-mean weights: the upstream gradient of each per-token loss
    w = mask.float() / mask.sum(-1, keepdim=True).clamp(min=1) / b
    return dict(logits=logits, target=target, old=old, ref=ref, adv_b=adv_b,
                adv=adv_b[:, None].expand(b, sl).contiguous(), mask=mask, w=w,
                generator=torch.Generator(device=p.device))


# ---- implementations ------------------------------------------------------------------------
@dataclass
class Impl:
    algo_bytes: int                        # bytes its algorithm must move (2 or 3 passes)
    prepare: Callable[[], torch.Tensor]    # fresh logits leaf (untimed)
    run: Callable[[torch.Tensor], torch.Tensor]  # forward + backward -> per-token loss [B, L]
    layout: str = "flat"                   # which rows of the buffer it reads: flat | liger
    chunk_kb: int | None = None            # MEGATRON_R1_GRPO_CHUNK_KB while it runs


def variants(p: Problem, inp: dict, names: list[str], compile_ok: bool) -> dict[str, Impl]:
    b, sl, v = p.batch, p.seqlen, p.v_local
    work = inp["logits"]
    e = work.element_size()
    two, three = 2 * p.n * v * e, 3 * p.n * v * e
    rows = (inp["target"], inp["old"], inp["ref"], inp["adv"], inp["mask"])
    w = inp["w"]

    def fresh() -> torch.Tensor:
        """A leaf [B*L, V] aliasing the buffer, so an in-place gradient needs no copy."""
        redraw(inp)
        return work.view(-1, v)[: p.n].detach().requires_grad_()

    def fresh_liger() -> torch.Tensor:
        redraw(inp)
        return work.detach().requires_grad_()

    def ref_loss(x: torch.Tensor, *r: torch.Tensor) -> torch.Tensor:
        return grpo_token_loss_reference(x.view(b, sl, v), *r, **LOSS_KW).loss

    def run_eager(x: torch.Tensor, fn: Callable = ref_loss) -> torch.Tensor:
        loss = fn(x, *rows)
        (loss * w).sum().backward()
        return loss.detach()

    out: dict[str, Impl] = {}
    if "eager" in names:
        out["eager"] = Impl(three, fresh, run_eager)
    if "compile" in names and compile_ok:
        compiled = torch.compile(ref_loss, dynamic=False)
        out["compile"] = Impl(three, fresh, lambda x: run_eager(x, compiled))
    if "liger" in names and p.device.type == "cuda":
        liger = load_liger()
        if isinstance(liger, str):
            print(f"  liger skipped: {liger}")
        else:
            mask_i32 = inp["mask"].int()

            def run_liger(x: torch.Tensor) -> torch.Tensor:
                loss, _, _ = liger(x, inp["old"], inp["ref"], inp["target"], inp["adv_b"],
                                   mask_i32)
                (loss * w).sum().backward()
                return loss.detach()
            out["liger"] = Impl(three, fresh_liger, run_liger, layout="liger")
    if fused_kernels_available(p.device):
        def run_ours(x: torch.Tensor, fused_grad: bool) -> torch.Tensor:
            res = grpo_token_loss(x.view(b, sl, v), *rows, **LOSS_KW, fused="on",
                                  grad_scale=w if fused_grad else None, inplace_grad=True)
            (res.loss * w).sum().backward()
            return res.loss.detach()

        if "ours_fused" in names:
            out["ours_fused"] = Impl(two, fresh, lambda x: run_ours(x, True))
        if "ours_3pass" in names:
            out["ours_3pass"] = Impl(three, fresh, lambda x: run_ours(x, False))
        if "ours_vp" in names:
            flat = [t.reshape(-1).float() if t.is_floating_point() else t.reshape(-1)
                    for t in rows]
            w_n = w.reshape(-1)

            def run_vp(x: torch.Tensor) -> torch.Tensor:
                x = x.detach()
                t = LOSS_KW["temperature"]
                row_max, sum_exp, _, tgt = kernels.grpo_stats(x, flat[0], t, 0)
                # (the vocab-parallel path all-reduces row_max, sum_exp, ... here)
                log_norm = sum_exp.log()
                logp = (tgt - row_max) / t - log_norm
                terms = token_terms(logp, flat[1], flat[2], flat[3], flat[4],
                                    **{k: LOSS_KW[k] for k in ("clip_low", "clip_high",
                                                               "kl_coef", "kl_estimator")})
                kernels.grpo_grad_(x, flat[0], row_max, log_norm,
                                   (w_n * terms.dlogp_N).contiguous(), t, 0)
                return terms.loss_N.view(b, sl)
            out["ours_vp"] = Impl(three, fresh, run_vp)
    elif any(n.startswith("ours") for n in names):
        print(f"  ours skipped: kernels not built for {p.device.type}")
    return out


def redraw(inp: dict) -> None:
    """The same random logits before every iteration (in-place variants consume them)."""
    with torch.no_grad():
        inp["logits"].normal_(0.0, 2.0, generator=inp["generator"].manual_seed(1))


def reference_losses(p: Problem, inp: dict) -> dict[str, torch.Tensor]:
    """Per-token reference loss (no grad) for each row layout, to check every variant."""
    redraw(inp)
    b, sl, v = p.batch, p.seqlen, p.v_local
    rows = (inp["target"], inp["old"], inp["ref"], inp["adv"], inp["mask"])
    with torch.no_grad():
        flat = inp["logits"].view(-1, v)[: p.n].view(b, sl, v)
        return {"flat": grpo_token_loss_reference(flat, *rows, **LOSS_KW).loss,
                "liger": grpo_token_loss_reference(inp["logits"][:, :sl], *rows,
                                                   **LOSS_KW).loss}


def load_liger() -> Callable | str:
    """Liger's triton_grpo_loss bound to our loss settings, or the reason it is missing."""
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except Exception as exc:  # any import failure means "not available"
        return f"{type(exc).__name__}: {exc}"

    def call(logits, old, ref, target, adv_b, mask):
        return triton_grpo_loss(logits, old, ref, target, adv_b, mask,
                                temperature=LOSS_KW["temperature"], beta=LOSS_KW["kl_coef"],
                                eps_low=LOSS_KW["clip_low"], eps_high=LOSS_KW["clip_high"],
                                inplace=True, loss_type="grpo", reduce=False)
    return call


# ---- main ---------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--vocab", type=int, nargs="+", default=None)
    ap.add_argument("--tp", type=int, nargs="+", default=None)
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    ap.add_argument("--variants", nargs="+",
                    default=["eager", "compile", "liger", "ours_fused", "ours_3pass", "ours_vp"])
    ap.add_argument("--compile-all", action="store_true", help="torch.compile every TP degree")
    ap.add_argument("--chunk-kb", type=int, nargs="*", default=[],
                    help="also time ours_fused with MEGATRON_R1_GRPO_CHUNK_KB at these values")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="small shapes")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch or (8 if gpu and not args.quick else 2)
    seqlen = args.seqlen or (2048 if gpu and not args.quick else 256)
    vocabs = args.vocab or ([151936, 129280] if gpu and not args.quick else [151936])
    tps = args.tp or ([1, 4, 8] if gpu else [8, 4])
    timer = Timer(device)
    torch.manual_seed(0)
    copy_gbps = copy_bandwidth(device, timer, gib=4.0 if gpu else 0.25)
    print(f"device {device_name(device)}, torch {torch.__version__}, commit {commit()}, "
          f"copy bandwidth {copy_gbps:.0f} GB/s (read + write)")

    rows, stamp = [], dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    for dname in args.dtypes:
        for vocab in vocabs:
            for tp in tps:
                p = Problem(batch, seqlen, vocab, tp, DTYPES[dname], device)
                print(f"\n{dname} B={batch} L={seqlen} V={vocab} tp={tp} -> [{p.n}, {p.v_local}]")
                inp = make_inputs(p)
                names = list(args.variants)
                impls = variants(p, inp, names, compile_ok=gpu and (tp == 1 or args.compile_all))
                for kb in args.chunk_kb:
                    if "ours_fused" in impls:
                        base_impl = impls["ours_fused"]
                        impls[f"ours_fused@{kb}KB"] = Impl(base_impl.algo_bytes,
                                                           base_impl.prepare, base_impl.run,
                                                           chunk_kb=kb)
                refs = reference_losses(p, inp)
                for name, impl in impls.items():
                    nbytes = impl.algo_bytes
                    if impl.chunk_kb is not None:
                        os.environ["MEGATRON_R1_GRPO_CHUNK_KB"] = str(impl.chunk_kb)
                    if gpu:
                        torch.cuda.empty_cache()
                        base = torch.cuda.memory_allocated(device)
                        torch.cuda.reset_peak_memory_stats(device)
                    try:
                        times, loss = timer.measure(impl.prepare, impl.run, args.warmup,
                                                    args.repeat)
                    except torch.OutOfMemoryError:
                        print(f"  {name:>16}: out of memory")
                        continue
                    finally:
                        os.environ.pop("MEGATRON_R1_GRPO_CHUNK_KB", None)
                    extra = (torch.cuda.max_memory_allocated(device) - base) / 1e9 if gpu else float("nan")
                    med = statistics.median(times)
                    diff = (loss.float() - refs[impl.layout].float()).abs().max().item()
                    row = dict(
                        time_utc=stamp, device=device_name(device), commit=commit(),
                        torch=torch.__version__, impl=name, dtype=dname, batch=batch,
                        seqlen=seqlen, n_tokens=p.n, vocab=vocab, tp=tp, v_local=p.v_local,
                        median_ms=round(med, 4), min_ms=round(min(times), 4),
                        repeats=len(times), algo_bytes=nbytes,
                        algo_gbps=round(nbytes / (med * 1e-3) / 1e9, 1),
                        pct_of_copy_bw=round(100 * nbytes / (med * 1e-3) / 1e9 / copy_gbps, 1),
                        copy_gbps=round(copy_gbps, 1),
                        floor_2pass_ms=round(p.bytes_2pass() / copy_gbps / 1e6, 4),
                        floor_3pass_ms=round(1.5 * p.bytes_2pass() / copy_gbps / 1e6, 4),
                        extra_peak_gb=round(extra, 3), max_abs_diff_loss_vs_ref=diff,
                        speedup_vs_liger=float("nan"), speedup_vs_eager=float("nan"))
                    rows.append(row)
                    print(f"  {name:>16}: {med:9.3f} ms  {row['algo_gbps']:7.1f} GB/s "
                          f"({row['pct_of_copy_bw']:5.1f}% copy)  extra {extra:6.2f} GB  "
                          f"|loss - ref| {diff:.2e}")
                cfg = [r for r in rows if (r["dtype"], r["vocab"], r["tp"]) == (dname, vocab, tp)]
                base_ms = {r["impl"]: r["median_ms"] for r in cfg}
                for r in cfg:
                    if "liger" in base_ms:
                        r["speedup_vs_liger"] = round(base_ms["liger"] / r["median_ms"], 3)
                    if "eager" in base_ms:
                        r["speedup_vs_eager"] = round(base_ms["eager"] / r["median_ms"], 3)
                del inp, impls, refs
                if gpu:
                    torch.cuda.empty_cache()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"grpo_loss_{device.type}_{stamp}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {len(rows)} rows to {path}\n")
    print(f"{'dtype':>5} {'V':>7} {'tp':>2} {'impl':>16} {'ms':>9} {'%copy':>6} {'xLiger':>7} "
          f"{'xEager':>7} {'floor2':>7} {'extraGB':>7}")
    for r in rows:
        print(f"{r['dtype']:>5} {r['vocab']:>7} {r['tp']:>2} {r['impl']:>16} "
              f"{r['median_ms']:9.3f} {r['pct_of_copy_bw']:6.1f} {r['speedup_vs_liger']:7.3f} "
              f"{r['speedup_vs_eager']:7.3f} {r['floor_2pass_ms']:7.3f} {r['extra_peak_gb']:7.2f}")


if __name__ == "__main__":
    main()
