"""Weight sync to 1, 2 and 4 engine groups: bytes every rank receives and the transfer's time.

World size 4 on gloo, the policy at TP2 x DP2 (random weights; what moves does not depend on
the values). For each engine-group size (4, 2, 1 ranks: 1, 2, 4 engines) every group's leader
assembles the full Hugging Face-layout tensors its engine needs (TP_e = 1), from its own
group's ranks first (resharding/gather.py, as megatron_r1.weight_sync runs it after every
rollout). Reported per rank: bytes received from other ranks, copied from its own shards, sent,
the ratio of what it assembled to what its engine needs (1.0 for leaders, 0 elsewhere), and the
median time of the transfer over 3 repetitions. The engine's own load (vLLM's layerwise
reload) is not included: `time/sync_s` in a GRPO run's metrics has the whole sync.

    python benchmarks/bench_weight_sync.py             # tiny and mid-size model, about 2 min

Writes benchmarks/results/weight_sync_cpu_<time>.csv (device, commit, shapes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance import commit, cpu_name, write_rows  # noqa: E402

MODELS = {
    "tiny": ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
             "model.num_experts=4", "model.moe_ffn_hidden_size=64"],
    "mid": ["model.num_layers=4", "model.hidden_size=512", "model.ffn_hidden_size=1024",
            "model.num_experts=8", "model.moe_ffn_hidden_size=512", "model.vocab_size=8192",
            "model.num_attention_heads=8"],
}
COMMON = ["model.qk_layernorm=true", "model.moe_router_topk=2", "parallel.tensor=2",
          "logging.progress_bar=false", "logging.tensorboard=false"]


def worker(out: str, group_size: int, overrides: list[str]) -> None:
    import torch.distributed as dist

    from megatron_r1.config import load_config
    from megatron_r1.resharding.gather import TransferStats, gather_buckets
    from megatron_r1.session import end_session, start_session

    session = start_session(load_config(None, overrides))
    world = dist.get_world_size()
    leaders = list(range(0, world, group_size))
    nearby = {d: list(range(d, d + group_size)) for d in leaders}
    seconds, stats = [], TransferStats()
    for _ in range(3):
        stats = TransferStats()
        dist.barrier()
        start = time.perf_counter()
        for _bucket in gather_buckets(session.model, session.ctx, 64 << 20,
                                      destinations=leaders, nearby=nearby, stats=stats):
            pass
        dist.barrier()
        seconds.append(time.perf_counter() - start)
    everyone: list[object] = [None] * world
    dist.all_gather_object(everyone, dataclasses.asdict(stats))
    if session.ctx.rank == 0:
        Path(out).write_text(json.dumps({"stats": everyone,
                                         "seconds": statistics.median(seconds)}))
    end_session(session)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--worker", nargs=2, metavar=("OUT", "GROUP_SIZE"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.overrides)
        return 0
    results = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        for model, extra in MODELS.items():
            for group_size in (4, 2, 1):
                out = Path(tmp) / f"{model}-{group_size}.json"
                overrides = [*COMMON, *extra, f"logging.run_dir={tmp}/run-{model}-{group_size}"]
                subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                "--nproc-per-node=4", __file__, "--worker", str(out),
                                str(group_size), *overrides], check=True, env=env, cwd=REPO)
                measured = json.loads(out.read_text())
                for rank, s in enumerate(measured["stats"]):
                    assembled = s["received"] + s["local"]
                    results.append({
                        "device": "cpu", "cpu": cpu_name(), "commit": commit(),
                        "model": model, "layout": "tp2xdp2", "world": 4,
                        "engines": 4 // group_size, "rank": rank,
                        "leader": rank % group_size == 0,
                        "needed_mb": round(s["needed"] / 1e6, 3),
                        "received_mb": round(s["received"] / 1e6, 3),
                        "local_mb": round(s["local"] / 1e6, 3),
                        "sent_mb": round(s["sent"] / 1e6, 3),
                        "ratio": round(assembled / s["needed"], 4) if s["needed"] else 0.0,
                        "transfer_s": round(measured["seconds"], 4)})
                    print(results[-1])
    write_rows(results, args.out, "weight_sync_cpu")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
