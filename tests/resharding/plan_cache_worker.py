"""Test support: the gather plan kept across syncs at world size 2 (gloo; the shards are plain
tensors described as resharding.gather.local_shards describes a model's, so no megatron).

Rank r holds row block r of `w` (split like a tensor-parallel weight) and a replica of `n`
(rank 0's is the main one). Three syncs to destination rank 0: the second after the weights
changed and their storages were swapped (as offloading does), the third after rank 1 alone
gained a parameter. Writes {"builds": [...], "ok": [...]} (one entry per sync) to OUT.<rank>.

Usage (under torchrun, 2 processes): plan_cache_worker.py OUT
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
import torch.distributed as dist

from megatron_r1.resharding.plan import Fragment, GatherPlanCache, TransferStats, execute


def full(step: float) -> dict[str, torch.Tensor]:
    """The unsharded parameters at a sync."""
    return {"w": torch.arange(12.0).view(4, 3) + step, "n": torch.full((2,), step),
            "extra": torch.ones(3) * step}


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    values = full(0.0)
    # name -> (offset, this rank's tensor, main replica?)
    held: dict[str, tuple[tuple[int, ...], torch.Tensor, bool]] = {
        "w": ((2 * rank, 0), values["w"][2 * rank:2 * rank + 2].clone(), True),
        "n": ((0,), values["n"].clone(), rank == 0)}
    cache = GatherPlanCache()
    report: dict[str, list[Any]] = {"builds": [], "ok": []}

    def sync(expected: dict[str, torch.Tensor]) -> None:
        mine = [(Fragment(name, tuple(full(0)[name].shape), offset, tuple(t.shape), t.dtype,
                          rank), main) for name, (offset, t, main) in held.items()]
        data = {(name, offset): t for name, (offset, t, _) in held.items()}
        _, todo = cache.get(mine, rank, 16, (0,), {})
        got: dict[str, torch.Tensor] = {}
        for bucket in execute(todo, data, device=torch.device("cpu"),
                              comm=torch.device("cpu"), stats=TransferStats()):
            got.update(bucket)
        report["builds"].append(cache.builds)
        report["ok"].append(rank != 0 or (sorted(got) == sorted(expected) and all(
            torch.equal(got[k], v) for k, v in expected.items())))

    sync({k: v for k, v in values.items() if k != "extra"})
    values = full(1.0)
    # new storages for the same layout, as offload and restore leave the parameters
    held = {name: (offset, t.clone() + 1.0, main) for name, (offset, t, main) in held.items()}
    sync({k: v for k, v in values.items() if k != "extra"})
    if rank == 1:  # a layout change on one rank only: both must plan again
        held["extra"] = ((0,), values["extra"].clone(), True)
    sync(values)
    with open(f"{sys.argv[1]}.{rank}", "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
