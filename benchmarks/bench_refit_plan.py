"""Per-sync planning time of the weight sync on a synthetic flagship-sized layout.

The layout is the R1-Zero config's (configs/deepseek_v3_671b_r1zero.yaml): 512 ranks, TP 8
and data-parallel 64 for the dense part, EP 256 (one routed expert per rank and MoE layer,
two replicas of each), 16 engine groups of 32 ranks whose first rank is the destination.
Every rank holds 671 dense shards (61 layers x 11 tensors, its TP slice) and 174 expert
shards (58 MoE layers x gate, up, down of its expert): 49,912 main fragments, 432,640 shards
over all ranks. Only metadata exists; nothing is transferred.

Measured on one process, for one rank (a destination and, separately, a rank that only sends):
- `rebuild` (every sync before the plan was cached; now only after a layout change): unpickle
  every rank's shard list (what all_gather_object does on each rank), build the plan, walk
  every fragment for every destination (resharding.plan.build_plan and schedule);
- `reuse` (every sync now): the cache's check of this rank's own shards against the kept
  layout (resharding.plan.GatherPlanCache.get), plus one one-number all-reduce across ranks
  (not in this single-process figure: tens of microseconds on a cluster).

    python benchmarks/bench_refit_plan.py

Writes benchmarks/results/refit_plan_cpu_<time>.csv (device, commit, shapes).
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance import commit, cpu_name, write_rows  # noqa: E402

from megatron_r1.resharding.plan import (  # noqa: E402
    Fragment,
    GatherPlanCache,
    Shard,
    build_plan,
    schedule,
)

DENSE_PER_LAYER, LAYERS, MOE_LAYERS, EXPERTS = 11, 61, 58, 256


def rank_shards(rank: int, *, tp: int, ep: int, hidden: int, expert_ffn: int) -> list[Shard]:
    """Rank `rank`'s shards: its TP slice of every dense tensor (main on data-parallel rank
    0) and gate, up and down of its routed expert in every MoE layer (main on the first of
    the expert's replicas)."""
    dtype = torch.bfloat16
    t, dense_dp = rank % tp, rank // tp
    e, expert_dp = rank % ep, rank // ep
    rows = 1024  # each dense tensor: [tp x 1024, hidden], split along its rows
    shards: list[Shard] = []
    for layer in range(LAYERS):
        for k in range(DENSE_PER_LAYER):
            shards.append((Fragment(f"decoder.layers.{layer}.dense{k}.weight",
                                    (tp * rows, hidden), (t * rows, 0), (rows, hidden), dtype,
                                    rank), dense_dp == 0))
    for layer in range(LAYERS - MOE_LAYERS, LAYERS):
        for part, shape in (("gate", (expert_ffn, hidden)), ("up", (expert_ffn, hidden)),
                            ("down", (hidden, expert_ffn))):
            name = f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.{part}.weight"
            shards.append((Fragment(name, shape, (0, 0), shape, dtype, rank), expert_dp == 0))
    return shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=512)
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--ep", type=int, default=256)
    parser.add_argument("--group", type=int, default=32, help="ranks per engine group")
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    opts = parser.parse_args()

    everyone = [rank_shards(r, tp=opts.tp, ep=opts.ep, hidden=7168, expert_ffn=2048)
                for r in range(opts.world)]
    blobs = [pickle.dumps(part) for part in everyone]  # what all_gather_object carries
    leaders = list(range(0, opts.world, opts.group))
    nearby = {d: list(range(d, d + opts.group)) for d in leaders}
    bucket = opts.bucket_mb << 20
    fragments = sum(main for part in everyone for _, main in part)
    rows = []
    for me, role in ((leaders[0], "destination"), (1, "sender")):
        rebuild, reuse = [], []
        for _ in range(opts.repeats):
            start = time.perf_counter()
            gathered = [pickle.loads(b) for b in blobs]
            unpickled = time.perf_counter()
            plan = build_plan(gathered, bucket)
            built = time.perf_counter()
            todo = schedule(plan, me, leaders, nearby)
            done = time.perf_counter()
            rebuild.append((unpickled - start, built - unpickled, done - built))
            cache = GatherPlanCache()
            world = lambda _: everyone  # noqa: E731  (the gathered shards of every rank)
            cache.get(everyone[me], me, bucket, leaders, nearby, gather=world)  # the one build
            start = time.perf_counter()
            cache.get(everyone[me], me, bucket, leaders, nearby, gather=world)  # a later sync
            reuse.append(time.perf_counter() - start)
            assert cache.builds == 1
        unpickle, plan_s, walk = (statistics.median(x) for x in zip(*rebuild))
        moves = sum(len(b.moves) for b in todo.buckets)
        rows.append({"device": cpu_name(), "commit": commit(), "world": opts.world,
                     "tp": opts.tp, "ep": opts.ep, "destinations": len(leaders),
                     "main_fragments": fragments, "shards": sum(map(len, everyone)),
                     "rank": me, "role": role, "moves_of_rank": moves,
                     "buckets": len(plan.buckets),
                     "rebuild_unpickle_s": round(unpickle, 3), "rebuild_plan_s": round(plan_s, 3),
                     "rebuild_walk_s": round(walk, 3),
                     "rebuild_total_s": round(unpickle + plan_s + walk, 3),
                     "reuse_s": round(statistics.median(reuse), 5)})
        print(rows[-1])
    write_rows(rows, opts.out, "refit_plan_cpu")


if __name__ == "__main__":
    main()
