"""`megatron-r1 plan`: memory and layout plan of a config on N GPUs, before any GPU is used.

Layer L2 (measures parameter counts on megatron-core modules). `add_plan_parser` adds the
sub-command to the CLI's sub-parsers; `run_plan(cfg, args)` prints the per-GPU table of the
configured layout, its weight sync (bytes and predicted seconds per rollout) and the layouts
that fit, best first. Exit codes: 0 the configured layout fits, 3 it does not (the table says
why), 2 bad input (raised as ValueError for the CLI).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from megatron_r1.config.schema import Config, ModelConfig
from megatron_r1.layout import resolve_layout
from megatron_r1.plan.activations import AttentionImpl
from megatron_r1.plan.counts import ShardCounts
from megatron_r1.plan.memory import (
    INFINIBAND_BYTES_PER_S,
    NVLINK_BYTES_PER_S,
    Candidate,
    Plan,
    PlanOptions,
    WeightsDtype,
    plan_layout,
)
from megatron_r1.plan.params import shard_counts
from megatron_r1.plan.report import (
    format_plan,
    format_ranking,
    format_sync,
    parse_size,
    plan_to_dict,
    sync_to_dict,
)
from megatron_r1.plan.search import RECOMPUTE, search
from megatron_r1.plan.sync import SyncCost, sync_cost

EXIT_DOES_NOT_FIT = 3
def _size(text: str) -> float:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def add_plan_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `plan` to the CLI's sub-parsers (argparse `add_subparsers()` result)."""
    p = subparsers.add_parser(
        "plan", help="memory and layout plan for N GPUs (no GPU needed)",
        description="Per-GPU memory of the configured layout (trainer: weights, gradients, "
                    "distributed-optimizer states, activations per pipeline stage; colocated "
                    "rollout engine: weights at the inference TP, KV cache, offload while "
                    "sleeping), the weight sync per rollout (bytes per GPU of the full-tensor "
                    "and the TP_e-slice paths, predicted seconds from the link bandwidths) "
                    "and the layouts that fit, best first. Exit code 0: the "
                    "configured layout fits; 3: it does not; 2: bad input.")
    p.add_argument("--config", metavar="YAML", help="sparse YAML override of the defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one config value; repeatable")
    p.add_argument("--gpus", type=int, required=True, help="GPUs of the job")
    p.add_argument("--gpu-memory", type=_size, default=parse_size("80GB"), metavar="SIZE",
                   help="memory per GPU (default 80GB; an H800/H100 80GB reports 81559MiB)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--host-memory", type=_size, default=parse_size("1TB"), metavar="SIZE",
                   help="host memory per node for offloaded state (default 1TB)")
    p.add_argument("--reserve", type=_size, default=parse_size("6GB"), metavar="SIZE",
                   help="per GPU, for CUDA context, NCCL buffers, allocator slack (6GB)")
    p.add_argument("--moe-imbalance", type=float, default=1.25,
                   help="tokens on the busiest EP rank relative to the mean (1.25)")
    p.add_argument("--attention", choices=["auto", "flash", "unfused"], default="auto",
                   help="auto: unfused for model.transformer_impl=local, else flash (TE)")
    p.add_argument("--rollout-concurrency", type=int, default=1, metavar="N",
                   help="full-length sequences each engine must hold in its KV cache (default "
                        "1, vLLM's own start-up check; the ranking prefers more)")
    p.add_argument("--rollout-weights", choices=["auto", "fp8", "bf16", "fp32"],
                   default="auto",
                   help="the engine's weight dtype. auto: what the engine loads, the policy's "
                        "params dtype (FP8 training included: the export writes no quantized "
                        "weights); fp8 prices a quantizing export that does not exist yet")
    p.add_argument("--kv-cache-dtype", choices=["bf16", "fp8"], default="bf16")
    p.add_argument("--rollout-overhead", type=_size, default=parse_size("3GB"), metavar="SIZE",
                   help="awake engine beyond weights and KV: CUDA graphs, workspace (3GB)")
    p.add_argument("--nvlink-bandwidth", type=_size, default=NVLINK_BYTES_PER_S,
                   metavar="GB/S",
                   help="weight sync: GB/s one GPU receives over NVLink, per direction "
                        f"(default {NVLINK_BYTES_PER_S / 1e9:.0f}: H800 as DeepSeek-V3's "
                        "report gives it; spec 200 each way, H100 450)")
    p.add_argument("--ib-bandwidth", type=_size, default=INFINIBAND_BYTES_PER_S,
                   metavar="GB/S",
                   help="weight sync: GB/s one GPU receives over InfiniBand from other "
                        f"nodes (default {INFINIBAND_BYTES_PER_S / 1e9:.0f}: one 400 Gb/s NDR "
                        "NIC per GPU)")
    p.add_argument("--first-stage-layers", type=int, default=None, metavar="N",
                   help="plan an uneven pipeline: layers of the first stage (overrides "
                        "parallel.first_stage_layers and parallel.last_stage_layers)")
    p.add_argument("--last-stage-layers", type=int, default=None, metavar="N",
                   help="layers of the last stage (as --first-stage-layers)")
    p.add_argument("--even-stages-only", action="store_true",
                   help="suggest only pipelines whose stages hold the same number of layers")
    p.add_argument("--top", type=int, default=10, help="layouts to list (default 10)")
    p.add_argument("--no-search", action="store_true", help="only the configured layout")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="also write the configured plan and the ranking as JSON")
    return p


def options_from_args(cfg: Config, args: argparse.Namespace) -> PlanOptions:
    if args.gpus < 1 or args.gpus_per_node < 1:
        raise ValueError(f"--gpus={args.gpus} and --gpus-per-node={args.gpus_per_node} must "
                         "be >= 1")
    if args.nvlink_bandwidth <= 0 or args.ib_bandwidth <= 0:
        raise ValueError(f"--nvlink-bandwidth={args.nvlink_bandwidth / 1e9:g} and "
                         f"--ib-bandwidth={args.ib_bandwidth / 1e9:g} GB/s must be > 0")
    attention: AttentionImpl = args.attention if args.attention != "auto" else (
        "unfused" if cfg.model.transformer_impl == "local" else "flash")
    # The engine loads the exported config's dtype, the policy's params dtype: EngineExport
    # writes no quantization_config, so an FP8-trained policy still serves in bf16.
    weights: WeightsDtype = args.rollout_weights if args.rollout_weights != "auto" else (
        "fp32" if cfg.model.params_dtype == "fp32" else "bf16")
    return PlanOptions(
        gpus=args.gpus, gpu_memory=args.gpu_memory, gpus_per_node=args.gpus_per_node,
        host_memory=args.host_memory, reserve=args.reserve, moe_imbalance=args.moe_imbalance,
        attention=attention,
        rollout_concurrency=args.rollout_concurrency,
        rollout_weights=weights, kv_cache_bytes=1 if args.kv_cache_dtype == "fp8" else 2,
        rollout_overhead=args.rollout_overhead, nvlink_bandwidth=args.nvlink_bandwidth,
        infiniband_bandwidth=args.ib_bandwidth)


def configured_candidate(cfg: Config, gpus: int, first: int | None = None,
                         last: int | None = None) -> Candidate:
    """The layout the config asks for (`first`/`last` override parallel.first_stage_layers /
    parallel.last_stage_layers); checked by the same rules as a training start."""
    par = cfg.parallel
    if first is not None or last is not None:
        par = replace(par, first_stage_layers=first, last_stage_layers=last)
    resolve_layout(par, cfg.model, cfg.train, gpus, cfg.data.seq_length)
    return Candidate(
        tensor=par.tensor, pipeline=par.pipeline, context=par.context, expert=par.expert,
        expert_tensor=par.expert_tensor or par.tensor, recompute=cfg.model.recompute,
        rollout_tensor=cfg.rollout.tensor_parallel, virtual_pipeline=par.virtual_pipeline,
        first_stage_layers=par.first_stage_layers, last_stage_layers=par.last_stage_layers)


def run_plan(cfg: Config, args: argparse.Namespace) -> int:
    """Print the plan of the configured layout and the ranked layouts; return the exit code."""
    options = options_from_args(cfg, args)
    cand = configured_candidate(cfg, args.gpus, args.first_stage_layers, args.last_stage_layers)

    def counts(model: ModelConfig, tp: int, ep: int, etp: int) -> ShardCounts:
        # FP8 and TE change no parameter shape; the local spec builds anywhere (no CUDA).
        return shard_counts(replace(model, fp8="none", transformer_impl="local"), tp, ep, etp)

    def sync_of(p: Plan) -> SyncCost | None:
        try:
            return sync_cost(cfg, p, counts)
        except ValueError:
            return None  # the engine groups do not fit: the plan's problems say why

    def with_sync(p: Plan, s: SyncCost | None) -> dict[str, Any]:
        return dict(plan_to_dict(p), sync=None if s is None else sync_to_dict(s))

    plan = plan_layout(cfg, cand, options, counts)
    title = (f"megatron-r1 plan: {args.config or 'defaults'} on {args.gpus} GPUs x "
             f"{options.gpu_memory / 1e9:.1f} GB ({options.gpus_per_node} per node)")
    print(format_plan(plan, title))
    sync = sync_of(plan)
    if sync is not None:
        print()
        print(format_sync(sync))
    ranked = []
    if not args.no_search:
        ranked = search(cfg, options, counts, RECOMPUTE,
                        allow_uneven=not args.even_stages_only)
        print()
        print(format_ranking(ranked, args.top))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "configured": with_sync(plan, sync),
            "ranked": [dict(with_sync(r.plan, sync_of(r.plan)), step_cost=r.step_cost)
                       for r in ranked[:args.top]]}, indent=1))
    sys.stdout.flush()
    return 0 if plan.fits else EXIT_DOES_NOT_FIT
