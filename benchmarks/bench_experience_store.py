"""Storing one rollout in the experience store at world size 4: which rank writes what, how
long each takes, and what each receives to do it.

World size 4 on gloo (no model, no engine): a synthetic rollout of R rows with R1-like lengths
(a fixed prompt, log-normal completions capped at the limit) and the engine's MoE routing ids
(grpo.routing_replay=r3) is held by two engine groups' leaders (ranks 0 and 2), and every
rank first receives the rows its data-parallel rank trains (rollout/dispatch.py, as the
trainer does before training; not timed). Then the store phase, timed per rank from its start
to its end, waiting included:
- `former`: the path before this change, reproduced here: rank 0 gathers every rank's old and
  reference log-probs (pickled gather_object), receives every row by all_to_all, pads all of
  them to data.seq_length and appends them to one dense zarr table while the others wait;
- `sharded`: megatron_r1.experience.write_rollout: each data-parallel rank's writer (TP rank
  0) appends the rows it holds to its own part, ragged; rank 0 commits the rollout.
--rollouts are stored one after another: the first creates the arrays, the later ones are a
run's steady state (`later_store_s`: their median).

    python benchmarks/bench_experience_store.py                      # DP4 and TP2 x DP2

Writes benchmarks/results/experience_store_cpu_<time>.csv (device, commit, shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance import commit, cpu_name, write_rows  # noqa: E402


def lengths(rows: int, limit: int, seed: int) -> list[int]:
    """Completion lengths: log-normal with median limit / 8 and sigma 1, capped at `limit`."""
    rng = random.Random(seed)
    return [max(1, min(limit, int(rng.lognormvariate(0.0, 1.0) * limit / 8)))
            for _ in range(rows)]


def former_append(path: Path, seq: int, columns: dict[str, Any]) -> None:
    """The former single writer's append: every column a dense zarr array [rows, S, ...]."""
    import numpy as np
    import zarr

    group = zarr.open_group(str(path), mode="a")
    for name, value in columns.items():
        value = value.detach().cpu().numpy()
        if name not in group:
            group.create_array(name, shape=(0, *value.shape[1:]),
                               chunks=(256, *value.shape[1:]), dtype=value.dtype)
        group[name].append(value)
    rows = len(columns["reward"])
    if "step" not in group:
        group.create_array("step", shape=(0,), chunks=(4096,), dtype="int32")
    group["step"].append(np.zeros(rows, dtype="int32"))
    del seq


def worker(args: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    from megatron_r1.experience import ExperienceStore, ragged_rows, write_rollout
    from megatron_r1.logprobs import collect_on_rank0, dense
    from megatron_r1.rollout import dispatch

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tp, seq, layers, top_k = args["tp"], args["seq_length"], args["moe_layers"], args["top_k"]
    tp_rank = rank % tp
    prompt, comps = args["prompt"], lengths(args["rows"], args["limit"], seed=0)
    rows, leaders = len(comps), [0, 2]
    holder = [leaders[0] if r < rows // 2 else leaders[1] for r in range(rows)]
    held = dispatch.HeldRows(scalars=torch.zeros(0, 3, dtype=torch.float64))
    generator = torch.Generator().manual_seed(rank)
    if rank in leaders:
        held.rows = [r for r in range(rows) if holder[r] == rank]
        held.ids = [torch.randint(3, 500, (prompt + comps[r],), generator=generator)
                    for r in held.rows]
        held.sampler_logp = [-torch.rand(comps[r], generator=generator) for r in held.rows]
        held.scalars = torch.randn(len(held.rows), 3, dtype=torch.float64, generator=generator)
        held.routing = [torch.randint(0, 64, (prompt + comps[r] - 1, layers, top_k),
                                      dtype=torch.int16, generator=generator)
                        for r in held.rows]
    generated = dispatch.Generated(
        held=held, prompt_len_R=torch.full((rows,), prompt),
        completion_len_R=torch.tensor(comps), holder_R=holder, metrics={},
        routing_shape=(layers, top_k))
    width = int(generated.length_R.max())
    dp_size = world // tp
    trained = [list(range(d, rows, dp_size)) for d in range(dp_size)]
    local = dispatch.receive_rows(generated, [trained[r // tp] for r in range(world)],
                                  width=width, group_size=16, pad_id=0)
    # old and reference log-probs, known on each data-parallel rank's last-stage TP rank 0
    old = {i: -torch.rand(int(n), generator=generator) for i, n in
           enumerate(local.rollout.length_R.tolist())} if tp_rank == 0 else {}
    ref = {i: v / 2 for i, v in old.items()}
    store = Path(args["store"])
    coordinator = None
    if args["path"] == "sharded" and rank == 0:
        coordinator = ExperienceStore(store, seq, ["accuracy"], routing_shape=(layers, top_k))
    dist.barrier()

    timings, received = [], 0
    for rollout in range(args["rollouts"]):
        dist.barrier()
        start = time.perf_counter()
        if args["path"] == "former":
            session = SimpleNamespace(ctx=SimpleNamespace(is_last_stage=True, tp_rank=tp_rank,
                                                          rank=rank))
            old0 = collect_on_rank0({local.rows[i]: v for i, v in old.items()}, session)
            ref0 = collect_on_rank0({local.rows[i]: v for i, v in ref.items()}, session)
            everything = list(range(rows))
            stored = dispatch.receive_rows(generated, [everything if r == 0 else []
                                                       for r in range(world)],
                                           width=width, group_size=16, pad_id=0)
            if rank == 0:
                full = stored.rollout
                received += sum(v.numel() * 4 for v in [*old0.values(), *ref0.values()])
                received += sum(t.numel() * t.element_size()
                                for t in (full.tokens_RS, full.sampler_logp_RS))
                assert stored.routing_RSLK is not None
                received += stored.routing_RSLK.numel() * 2

                def widen(x: torch.Tensor) -> torch.Tensor:
                    out = x.new_zeros((x.shape[0], seq, *x.shape[2:]))
                    out[:, :x.shape[1]] = x
                    return out
                former_append(store, seq, {
                    "rollout": torch.full((rows,), rollout, dtype=torch.int32),
                    "prompt_index": full.prompt_index_R.int(),
                    "prompt_len": full.prompt_len_R.int(),
                    "completion_len": full.completion_len_R.int(),
                    "tokens": widen(full.tokens_RS).int(), "labels": widen(full.labels_RS).int(),
                    "loss_mask": widen(full.loss_mask_RS).bool(),
                    "old_logp": widen(dense(old0, full.tokens_RS.shape)),
                    "ref_logp": widen(dense(ref0, full.tokens_RS.shape)),
                    "sampler_logp": widen(full.sampler_logp_RS),
                    "reward": stored.scalars[:, 1].float(),
                    "advantage": stored.scalars[:, 0].float(),
                    "reward_accuracy": stored.scalars[:, 2].float(),
                    "routing": widen(stored.routing_RSLK)})
            dist.barrier()  # the others wait for rank 0 before going on
        else:
            part = None
            if tp_rank == 0:
                r = local.rollout
                mine = range(len(local.rows))
                part = ragged_rows(r.length_R, {
                    "tokens": r.tokens_RS, "labels": r.labels_RS,
                    "loss_mask": r.loss_mask_RS.bool(),
                    "old_logp": [old[i] for i in mine], "ref_logp": [ref[i] for i in mine],
                    "sampler_logp": r.sampler_logp_RS, "routing": local.routing_RSLK}, {
                    "row": local.rows, "rollout": rollout, "prompt_index": r.prompt_index_R,
                    "prompt_len": r.prompt_len_R, "completion_len": r.completion_len_R,
                    "advantage": local.scalars[:, 0], "reward": local.scalars[:, 1],
                    "reward_accuracy": local.scalars[:, 2]})
            write_rollout(store, coordinator, writer=f"rank{rank:05d}", part=part,
                          rollout=rollout, step=rollout, rows=rows)
        timings.append(time.perf_counter() - start)
    wrote = (rows if rank == 0 else 0) if args["path"] == "former" else (
        len(local.rows) if tp_rank == 0 else 0)
    with open(f"{args['out']}.{rank}", "w") as f:
        json.dump({"rank": rank, "seconds": timings, "rows_written": wrote,
                   "received_mb": received / 1e6}, f)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--limit", type=int, default=4096, help="longest completion")
    parser.add_argument("--moe-layers", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rollouts", type=int, default=2,
                        help="rollouts stored one after another (the first creates the arrays)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        worker(json.loads(opts.worker))
        return
    rows = []
    for tp in opts.tp:
        for path in ("former", "sharded"):
            with tempfile.TemporaryDirectory() as tmp:
                args = {"rows": opts.rows, "prompt": opts.prompt, "limit": opts.limit,
                        "seq_length": opts.prompt + opts.limit, "moe_layers": opts.moe_layers,
                        "top_k": opts.top_k, "tp": tp, "path": path, "rollouts": opts.rollouts,
                        "store": str(Path(tmp) / "x.zarr"), "out": str(Path(tmp) / "r")}
                env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
                subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                "--nproc-per-node=4", __file__, "--worker", json.dumps(args)],
                               cwd=REPO, env=env, check=True, capture_output=True, timeout=3600)
                disk = sum(p.stat().st_size for p in Path(tmp, "x.zarr").rglob("*")
                           if p.is_file())
                for rank in range(4):
                    result = json.loads(Path(f"{args['out']}.{rank}").read_text())
                    rows.append({"device": cpu_name(), "commit": commit(), "world": 4,
                                 "layout": f"TP{tp} x DP{4 // tp}", "path": path,
                                 "rows": opts.rows, "prompt": opts.prompt,
                                 "completion_limit": opts.limit,
                                 "seq_length": args["seq_length"],
                                 "moe_layers": opts.moe_layers, "top_k": opts.top_k,
                                 "rank": rank, "rows_written": result["rows_written"],
                                 "received_mb_per_rollout": round(result["received_mb"]
                                                                  / opts.rollouts, 1),
                                 "first_store_s": round(result["seconds"][0], 3),
                                 "later_store_s": round(statistics.median(
                                     result["seconds"][1:] or result["seconds"]), 3),
                                 "store_disk_mb": round(disk / 1e6, 1)})
                    print(rows[-1])
    write_rows(rows, opts.out, "experience_store_cpu")


if __name__ == "__main__":
    main()
