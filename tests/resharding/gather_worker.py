"""Test support: load the step-0 checkpoint at some layout, gather every parameter to rank 0
(small buckets), save {name: tensor} to OUT.

Usage: gather_worker.py OUT [section.key=value ...]"""

import sys

import torch

from megatron_r1.config import load_config
from megatron_r1.resharding.gather import gather_buckets
from megatron_r1.session import end_session, start_session

if __name__ == "__main__":
    session = start_session(load_config(None, sys.argv[2:]))
    gathered = {}
    buckets = 0
    for bucket in gather_buckets(session.model, session.ctx, bucket_bytes=1 << 16):
        gathered.update(bucket)
        buckets += 1
    if session.ctx.rank == 0:
        torch.save({"tensors": gathered, "buckets": buckets}, sys.argv[1])
    end_session(session)
