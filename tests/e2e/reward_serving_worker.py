"""Test support: reward-model scores through GRPO's serving path (megatron_r1.reward_serving)
of a made-up rollout whose rows lie on different ranks, at any world size and layout.

Usage: reward_serving_worker.py OUT_JSON section.key=value...  (the config names reward.models)
Row r holds ids of a seeded random length (1 to 40) and is held by rank r % world size, like
the engine leaders' rows; rows of kind `math` are not read. Rank 0 writes the [R] scores."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_r1.config import load_config
from megatron_r1.reward_serving import load_reward_models, score_rollout
from megatron_r1.rollout.dispatch import Generated, HeldRows
from megatron_r1.session import end_session, start_session

ROWS = 13  # not a multiple of any micro-batch x data-parallel size: rows are repeated

if __name__ == "__main__":
    out_file, *overrides = sys.argv[1:]
    cfg = load_config(None, overrides)
    session = start_session(cfg)
    models = load_reward_models(cfg, session)
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    kinds = ["math" if r % 4 == 3 else "general" for r in range(ROWS)]
    ids = [torch.randint(3, 200, (int(torch.randint(1, 41, (1,), generator=g)),), generator=g)
           for _ in range(ROWS)]
    length_RM = torch.tensor([[len(x) if k == "general" else 0] for x, k in zip(ids, kinds)])
    held = HeldRows(rows=[r for r in range(ROWS) if r % world == rank],
                    model_ids=[{r: ids[r] for r in range(ROWS) if r % world == rank
                                and kinds[r] == "general"}])
    generated = Generated(held=held, prompt_len_R=torch.zeros(ROWS, dtype=torch.int64),
                          completion_len_R=torch.zeros(ROWS, dtype=torch.int64),
                          holder_R=[r % world for r in range(ROWS)], metrics={},
                          kinds_R=kinds, model_len_RM=length_RM)
    dp_ranks: list = [None] * world
    dist.all_gather_object(dp_ranks, session.ctx.dp_rank)
    scores = score_rollout(models, generated, session, dp_ranks)[:, 0]
    if rank == 0:
        Path(out_file).write_text(json.dumps([None if s != s else float(s) for s in scores]))
    end_session(session)
