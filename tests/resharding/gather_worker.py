"""Test support: load the step-0 checkpoint at some layout, gather every parameter to the
destination ranks (small buckets), save {name: tensor} to OUT (rank 0) or OUT.rank<r> (other
destinations), with every rank's transfer statistics in OUT.stats<r>.

Usage: gather_worker.py OUT [section.key=value ...]
Environment: GATHER_DESTINATIONS (default "0"), GATHER_GROUP (ranks per engine group: a
destination asks its own group first; default 1)."""

import dataclasses
import json
import os
import sys

import torch

from megatron_r1.config import load_config
from megatron_r1.resharding.gather import TransferStats, gather_buckets
from megatron_r1.session import end_session, start_session

if __name__ == "__main__":
    session = start_session(load_config(None, sys.argv[2:]))
    destinations = [int(x) for x in os.environ.get("GATHER_DESTINATIONS", "0").split(",")]
    size = int(os.environ.get("GATHER_GROUP", "1"))
    nearby = {d: list(range(d // size * size, d // size * size + size)) for d in destinations}
    stats = TransferStats()
    gathered = {}
    buckets = 0
    for bucket in gather_buckets(session.model, session.ctx, bucket_bytes=1 << 16,
                                 destinations=destinations, nearby=nearby, stats=stats):
        gathered.update(bucket)
        buckets += 1
    rank = session.ctx.rank
    if rank in destinations:
        torch.save({"tensors": gathered, "buckets": buckets},
                   sys.argv[1] if rank == 0 else f"{sys.argv[1]}.rank{rank}")
    else:
        assert not gathered  # only destinations ever hold full tensors
    with open(f"{sys.argv[1]}.stats{rank}", "w") as f:
        json.dump(dataclasses.asdict(stats), f)
    end_session(session)
