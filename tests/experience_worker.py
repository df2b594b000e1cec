"""Test support: one rollout stored at world size 4 (TP2 x DP2 on gloo, no engines, no model).

Every rank holds the rows its data-parallel rank trains (as after the trainer's dispatch);
each DP rank's writer, its TP rank 0, stores them with megatron_r1.experience.write_rollout.
Every torch.distributed call made while storing is recorded; rank 0 then reads the table back
and compares it with the table the former single writer produced. Writes a JSON report per
rank to OUT.<rank>.

Usage (under torchrun, 4 processes): experience_worker.py STORE OUT

Also imported by tests/test_experience.py for its rollouts (`rollout`, `part`).
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_r1.experience import ExperienceStore, ragged_rows, read_experience, write_rollout
from megatron_r1.grpo.rollout_batch import pack_sequences

SEQ, PAD, GROUP = 12, 5, 2
PROMPT = [1, 9, 9]


def rollout(index: int, completions: list[int], routing: bool = False) -> dict[str, Any]:
    """A rollout's rows as the trainer holds them, and the table the former single writer
    stored (pack_sequences padded to the rollout's longest row, then zeros up to SEQ)."""
    rows = len(completions)
    ids = [torch.tensor([*PROMPT, *(100 * index + 10 * r + k for k in range(c))])
           for r, c in enumerate(completions)]
    logp = [-torch.arange(1, c + 1, dtype=torch.float32) / (r + 1)
            for r, c in enumerate(completions)]
    packed = pack_sequences(ids, [len(PROMPT)] * rows, logp, [r // GROUP for r in range(rows)],
                            width=1, pad_id=PAD)
    width = packed.tokens_RS.shape[1]
    generator = torch.Generator().manual_seed(index)
    old = torch.randn(rows, width, generator=generator) * (packed.loss_mask_RS > 0)
    scalars = torch.randn(rows, 3, dtype=torch.float64, generator=generator)
    ids_RSLK = torch.randint(0, 8, (rows, width, 2, 2), dtype=torch.int16, generator=generator)
    ids_RSLK *= (torch.arange(width) < packed.length_R[:, None])[..., None, None]

    def widen(x: torch.Tensor) -> np.ndarray:
        out = torch.zeros(rows, SEQ, *x.shape[2:], dtype=x.dtype)
        out[:, :width] = x
        return out.numpy()
    table = {"rollout": np.full(rows, index), "prompt_index": packed.prompt_index_R.numpy(),
             "prompt_len": packed.prompt_len_R.numpy(),
             "completion_len": packed.completion_len_R.numpy(),
             "tokens": widen(packed.tokens_RS), "labels": widen(packed.labels_RS),
             "loss_mask": widen(packed.loss_mask_RS).astype(bool),
             "old_logp": widen(old), "ref_logp": widen(old / 2),
             "sampler_logp": widen(packed.sampler_logp_RS),
             # advantage, reward, reward_accuracy (the trainer's float64 scalars, as float32)
             "advantage": scalars[:, 0].float().numpy(), "reward": scalars[:, 1].float().numpy(),
             "reward_accuracy": scalars[:, 2].float().numpy()}
    if routing:
        table["routing"] = widen(ids_RSLK)
    return {"packed": packed, "old": old, "scalars": scalars, "routing": ids_RSLK,
            "table": table, "rows": rows}


def part(r: dict[str, Any], rows: list[int], index: int,
         routing: bool = False) -> dict[str, np.ndarray]:
    """The columns one writer stores for `rows` of rollout `r`, built as the trainer does."""
    p, sel = r["packed"], torch.tensor(rows, dtype=torch.int64)
    per_token: dict[str, Any] = {
        "tokens": p.tokens_RS[sel], "labels": p.labels_RS[sel],
        "loss_mask": p.loss_mask_RS[sel].bool(),
        "old_logp": [r["old"][i, :int(p.length_R[i])] for i in rows],
        "ref_logp": [r["old"][i, :int(p.length_R[i])] / 2 for i in rows],
        "sampler_logp": p.sampler_logp_RS[sel]}
    if routing:
        per_token["routing"] = r["routing"][sel]
    scalars = r["scalars"][sel]
    return ragged_rows(p.length_R[sel], per_token, {
        "row": rows, "rollout": index, "prompt_index": p.prompt_index_R[sel],
        "prompt_len": p.prompt_len_R[sel], "completion_len": p.completion_len_R[sel],
        "advantage": scalars[:, 0], "reward": scalars[:, 1], "reward_accuracy": scalars[:, 2]})


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor",
               "gather", "gather_object", "broadcast", "broadcast_object_list", "scatter",
               "scatter_object_list", "reduce", "reduce_scatter", "all_to_all",
               "all_to_all_single", "send", "recv", "isend", "irecv", "batch_isend_irecv",
               "barrier")


def record_collectives(calls: list[list[Any]]) -> None:
    """Wrap every torch.distributed collective and point-to-point call: each appends its name
    and the element count of its first tensor argument (-1: none) to `calls`."""
    for name in COLLECTIVES:
        original = getattr(dist, name)

        @functools.wraps(original)
        def wrapper(*args: Any, __name: str = name, __original: Any = original,
                    **kwargs: Any) -> Any:
            tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
            calls.append([__name, -1 if tensor is None else tensor.numel()])
            return __original(*args, **kwargs)
        setattr(dist, name, wrapper)


if __name__ == "__main__":
    path, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dp_rank, tp_rank = rank // 2, rank % 2
    lengths = [(7 * r) % 9 for r in range(32)]  # completions of 0..8 ids
    r = rollout(0, lengths)
    order = torch.randperm(32, generator=torch.Generator().manual_seed(0)).tolist()
    mine = sorted(order[16 * dp_rank:16 * (dp_rank + 1)])  # rows this DP rank trained
    coordinator = ExperienceStore(path, SEQ, ["accuracy"], pad_id=PAD) if rank == 0 else None
    dist.barrier()
    writes = part(r, mine, 0) if tp_rank == 0 else None  # the TP peer holds them, writes none
    calls: list[list[Any]] = []
    record_collectives(calls)
    write_rollout(path, coordinator, writer=f"rank{rank:05d}", part=writes, rollout=0, step=0,
                  rows=32)
    recorded = [list(c) for c in calls]
    dist.barrier()
    report: dict[str, Any] = {"collectives": recorded,
                              "rows_written": 0 if writes is None else len(writes["row"])}
    if rank == 0:
        got = read_experience(path)
        report["rows"] = len(got["reward"])
        report["table_equal"] = all(
            np.array_equal(got[k], v.astype(got[k].dtype)) for k, v in r["table"].items())
    with open(f"{out}.{rank}", "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
