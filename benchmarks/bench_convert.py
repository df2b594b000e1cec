"""Benchmark: Hugging Face <-> megatron conversion throughput and peak host memory, and the
DeepSeek-V3 671B figures estimated from them.

The model is DeepSeek-V3-shaped (MLA, a dense first layer, routed + shared experts, group-
limited sigmoid routing, YaRN), scaled to a few GB, and stored as DeepSeek releases it: linear
weights FP8 with 128x128 block scales, the rest bf16 (router bias fp32). Random weights are
written straight to sharded safetensors (no model in memory). Then, each in a fresh process
(so its resident set is the conversion's own):
  hf-to-mcore   FP8 safetensors -> bf16 megatron dist checkpoint (dequantised)
  mcore-to-hf   that checkpoint -> bf16 safetensors
  mcore-to-hf   that checkpoint -> FP8 block safetensors (--fp8)
each under --budget. A row per conversion goes to benchmarks/results/convert_<device>_<time>.csv
with device, commit, shapes, bytes read/written, seconds, GB/s, the accounted peak (tensor
bytes held at once) and the process's resident memory before and at peak (VmHWM), plus the
disk's plain sequential write speed for scale. The 671B rows apply the measured rates to
DeepSeek-V3's released config (bytes from its shapes; the memory a conversion needs is the
largest unit's working set, computed with the same rules the converter uses).

  python benchmarks/bench_convert.py                   # ~2.4B params, ~2.5 GB FP8 source
  python benchmarks/bench_convert.py --layers 3        # smaller, faster
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance import commit, cpu_name  # noqa: E402

from megatron_r1.checkpoint.hf import FAMILIES  # noqa: E402
from megatron_r1.checkpoint.hf import hf_config as H  # noqa: E402
from megatron_r1.checkpoint.hf.budget import format_size, parse_size  # noqa: E402
from megatron_r1.checkpoint.hf.fp8 import SCALE_SUFFIX, quantize_blocks, scale_shape  # noqa: E402
from megatron_r1.checkpoint.hf.plan import (  # noqa: E402
    HTensor,
    MTensor,
    bind,
    check_hf_names,
    export_working_bytes,
    import_working_bytes,
)
from megatron_r1.checkpoint.hf.rules import MapContext  # noqa: E402
from megatron_r1.checkpoint.hf.safetensors_io import (  # noqa: E402
    ShardedSafetensorsWriter,
    TensorSpec,
)
from megatron_r1.config.schema import ModelConfig  # noqa: E402

FAMILY = FAMILIES["deepseek_v3"]
FP8_NAMES = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj",
             "up_proj", "down_proj")

# DeepSeek-V3's released config.json (the fields that set shapes and dtypes).
DEEPSEEK_V3_671B: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8,
    "topk_group": 4, "first_k_dense_replace": 3, "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "vocab_size": 129280, "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6, "rope_theta": 10000, "tie_word_embeddings": False,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "num_nextn_predict_layers": 1, "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}




def bench_config(layers: int, experts: int) -> dict[str, Any]:
    """A DeepSeek-V3-shaped config, scaled down."""
    return {**DEEPSEEK_V3_671B, "hidden_size": 2048, "intermediate_size": 5632,
            "moe_intermediate_size": 768, "num_hidden_layers": layers, "num_attention_heads": 16,
            "num_key_value_heads": 16, "n_routed_experts": experts, "first_k_dense_replace": 1,
            "q_lora_rank": 768, "kv_lora_rank": 256, "qk_nope_head_dim": 64,
            "qk_rope_head_dim": 32, "v_head_dim": 64, "vocab_size": 32000,
            "max_position_embeddings": 16384,
            "rope_scaling": {**DEEPSEEK_V3_671B["rope_scaling"], "factor": 4,
                             "original_max_position_embeddings": 4096},
            "num_nextn_predict_layers": 0}


def released_tensors(cfg: dict[str, Any]) -> dict[str, HTensor]:
    """Name -> (shape, dtype) of a DeepSeek-V3 checkpoint as released: FP8 linear weights with
    block scales, bf16 embeddings/norms/router, fp32 router bias. Shapes come from
    transformers' own model built on the meta device (its fused in-memory experts are split
    back into the released per-expert tensors)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg))
    block = tuple(cfg["quantization_config"]["weight_block_size"])
    out: dict[str, HTensor] = {}

    def add(name: str, shape: tuple[int, ...]) -> None:
        if name.endswith(".weight") and name.split(".")[-2] in FP8_NAMES:
            out[name] = HTensor(shape, torch.float8_e4m3fn)
            out[name + SCALE_SUFFIX] = HTensor(scale_shape(shape, block), torch.float32)
        elif name.endswith("e_score_correction_bias"):
            out[name] = HTensor(shape, torch.float32)
        else:
            out[name] = HTensor(shape, torch.bfloat16)

    for name, t in model.state_dict().items():
        prefix, _, last = name.rpartition(".")
        if prefix.endswith("mlp.experts") and last in ("gate_up_proj", "down_proj"):
            experts, rows, cols = t.shape
            for e in range(experts):
                if last == "gate_up_proj":
                    add(f"{prefix}.{e}.gate_proj.weight", (rows // 2, cols))
                    add(f"{prefix}.{e}.up_proj.weight", (rows // 2, cols))
                else:
                    add(f"{prefix}.{e}.down_proj.weight", (rows, cols))
        else:
            add(name, tuple(t.shape))
    return out


def write_source(directory: Path, cfg: dict[str, Any]) -> int:
    """Random weights in the release format, written tensor by tensor; returns bytes."""
    tensors = released_tensors(cfg)
    order = [n for n in tensors if not n.endswith(SCALE_SUFFIX)]
    specs = []
    for name in order:
        specs.append(TensorSpec(name, tensors[name].dtype, tensors[name].shape))
        if name + SCALE_SUFFIX in tensors:
            scale = tensors[name + SCALE_SUFFIX]
            specs.append(TensorSpec(name + SCALE_SUFFIX, scale.dtype, scale.shape))
    writer = ShardedSafetensorsWriter(directory, specs, max_shard_bytes=2 * 1000**3)
    gen = torch.Generator().manual_seed(0)
    for name in order:
        spec = tensors[name]
        if "norm" in name:
            value = torch.ones(spec.shape)
        else:
            value = torch.randn(spec.shape, generator=gen) * 0.02
        if spec.dtype == torch.float8_e4m3fn:
            q, scale = quantize_blocks(value)
            writer.write(name, q)
            writer.write(name + SCALE_SUFFIX, scale)
        else:
            writer.write(name, value.to(spec.dtype))
    writer.close()
    (directory / "config.json").write_text(json.dumps(cfg, indent=1))
    return sum(math.prod(t.shape) * t.dtype.itemsize for t in tensors.values())


_RUNNER = """
import dataclasses, json, sys, logging
logging.basicConfig(level=logging.WARNING)
from megatron_r1.convert import hf_to_mcore, mcore_to_hf
args = json.loads(sys.argv[1])
if args["direction"] == "hf-to-mcore":
    report = hf_to_mcore(args["src"], args["out"], memory_budget=args["budget"])
else:
    report = mcore_to_hf(args["src"], args["out"], memory_budget=args["budget"], fp8=args["fp8"])
print("REPORT " + json.dumps(dataclasses.asdict(report)))
"""


def convert(direction: str, src: Path, out: Path, budget: int, fp8: bool = False
            ) -> dict[str, Any]:
    """One conversion in a fresh process; its ConversionReport."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = json.dumps({"direction": direction, "src": str(src), "out": str(out),
                       "budget": budget, "fp8": fp8})
    proc = subprocess.run([sys.executable, "-c", _RUNNER, args], env=env, text=True,
                          capture_output=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{direction} failed:\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


def disk_write_gbps(directory: Path, nbytes: int = 1024**3) -> float:
    """Sequential write speed of the disk under `directory` (1 GiB, fsync'd)."""
    path = directory / "disk_probe.bin"
    block = os.urandom(16 * 1024**2)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return nbytes / seconds / 1e9


def plan_671b() -> dict[str, Any]:
    """Bytes and per-unit working sets of converting the released DeepSeek-V3 (no weights:
    the rules run on meta tensors)."""
    hf = DEEPSEEK_V3_671B
    model = H.derive_model_config(FAMILY.config_to_model(hf), hf, ModelConfig(), set())
    ctx = MapContext(model, hf)
    source = released_tensors({**hf, "num_nextn_predict_layers": 0})
    pairs = check_hf_names(FAMILY, ctx, source)
    table = {}
    for pair in pairs:
        parts = [torch.empty(source[n].shape, device="meta") for n in pair.hf]
        mtensor = pair.rule.transform.to_mcore(parts, ctx)
        dtype = torch.float32 if pair.mcore[0].endswith("expert_bias") else torch.bfloat16
        table[pair.mcore[0]] = MTensor(tuple(mtensor.shape), dtype)
    units = bind(FAMILY, pairs, ctx, table)
    largest = max(u.mcore_bytes for u in units)
    return {
        "params": sum(u.numel_hf for u in units),
        "hf_fp8_bytes": sum(math.prod(t.shape) * t.dtype.itemsize for t in source.values()),
        "mcore_bytes": sum(u.mcore_bytes for u in units),
        "hf_bf16_bytes": sum(u.numel_hf * (4 if u.mtensor.dtype == torch.float32 else 2)
                             for u in units),
        "import_need": max(import_working_bytes(u, source) for u in units),
        "export_need": max(largest + u.mcore_bytes + export_working_bytes(u, 2) for u in units),
        "export_fp8_need": max(largest + u.mcore_bytes + export_working_bytes(u, 2, fp8=True)
                               for u in units),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--budget", default="1GiB", help="memory budget of each conversion")
    parser.add_argument("--workdir", default="/tmp/bench_convert")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--out", help="CSV path (default benchmarks/results/convert_*.csv)")
    args = parser.parse_args()
    budget = parse_size(args.budget)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    common = {"time_utc": stamp, "device": cpu_name(), "commit": commit(),
              "torch": torch.__version__}

    cfg = bench_config(args.layers, args.experts)
    t0 = time.perf_counter()
    source_bytes = write_source(work / "hf_fp8", cfg)
    print(f"source: {format_size(source_bytes)} FP8 safetensors written in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    disk = disk_write_gbps(work)
    shape = (f"deepseek_v3-like L={args.layers} E={args.experts} hidden=2048 "
             f"moe_ffn=768 vocab=32000")
    rows = []
    runs = [("hf-to-mcore", work / "hf_fp8", work / "mcore", False),
            ("mcore-to-hf", work / "mcore", work / "hf_bf16", False),
            ("mcore-to-hf", work / "mcore", work / "hf_fp8_again", True)]
    for direction, src, out, fp8 in runs:
        r = convert(direction, src, out, budget, fp8)
        seconds = r["seconds"]
        rows.append({**common, "model": shape, "direction": direction + (" fp8" if fp8 else ""),
                     "tensors": r["tensors_read"], "bytes_read": r["bytes_read"],
                     "bytes_written": r["bytes_written"], "seconds": round(seconds, 2),
                     "read_gbps": round(r["bytes_read"] / seconds / 1e9, 3),
                     "write_gbps": round(r["bytes_written"] / seconds / 1e9, 3),
                     "budget_bytes": budget, "accounted_peak_bytes": r["accounted_peak_bytes"],
                     "rss_start_bytes": r["rss_start_bytes"], "rss_peak_bytes": r["rss_peak_bytes"],
                     "rss_growth_bytes": r["rss_peak_bytes"] - r["rss_start_bytes"],
                     "disk_write_gbps": round(disk, 3), "estimate": False})
        print(f"{rows[-1]['direction']}: {format_size(r['bytes_read'])} -> "
              f"{format_size(r['bytes_written'])} in {seconds:.1f} s "
              f"({rows[-1]['write_gbps']} GB/s written); held {format_size(r['accounted_peak_bytes'])}"
              f" of {format_size(budget)}; RSS {format_size(r['rss_start_bytes'])} -> "
              f"{format_size(r['rss_peak_bytes'])}", flush=True)

    plan = plan_671b()
    by_dir = {row["direction"]: row for row in rows}
    estimates = [
        ("hf-to-mcore", plan["hf_fp8_bytes"], plan["mcore_bytes"], plan["import_need"]),
        ("mcore-to-hf", plan["mcore_bytes"], plan["hf_bf16_bytes"], plan["export_need"]),
        ("mcore-to-hf fp8", plan["mcore_bytes"], plan["hf_fp8_bytes"], plan["export_fp8_need"]),
    ]
    for direction, read, written, need in estimates:
        measured = by_dir[direction]
        # The conversion is bound by whichever side it streams slower here.
        seconds = max(read / (measured["read_gbps"] * 1e9), written / (measured["write_gbps"] * 1e9))
        rss_base = measured["rss_start_bytes"]
        rows.append({**common, "model": f"deepseek_v3 671B ({plan['params'] / 1e9:.0f}B params, "
                                         "MTP skipped)",
                     "direction": direction, "tensors": "", "bytes_read": read,
                     "bytes_written": written, "seconds": round(seconds),
                     "read_gbps": measured["read_gbps"], "write_gbps": measured["write_gbps"],
                     "budget_bytes": need, "accounted_peak_bytes": need,
                     "rss_start_bytes": rss_base, "rss_peak_bytes": rss_base + need,
                     "rss_growth_bytes": need, "disk_write_gbps": round(disk, 3),
                     "estimate": True})
        print(f"671B {direction}: {format_size(read)} -> {format_size(written)}, ~{seconds / 3600:.1f} h "
              f"at the rates above (one process); needs a budget of {format_size(need)} "
              f"(RSS ~{format_size(rss_base + need)})", flush=True)

    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / \
        f"convert_cpu_{stamp}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
