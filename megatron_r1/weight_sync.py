"""The policy's weights to every engine group, and the correctness gate on every engine.

Layer L3 (the gather and the Hugging Face export below it, the trainer's log-probs for the
gate). Each engine's node host (its leader, and on an engine wider than a node the group's
first rank on each other node, rollout/placement.py) assembles the full Hugging Face tensors
its node's workers load, bucket by bucket, taking every fragment from its own node's ranks of
the group where one of them holds a copy and from other ranks only for what they lack
(resharding/gather.py); all hosts receive at once, and hand each bucket to their own node's
workers (rollout/engine_nodes.py). No other rank assembles anything. Then every engine scores fixed probe
sequences and must agree with the trainer, or the run stops naming the engine group.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from megatron_r1.batching import MicroBatching, plan_microbatches
from megatron_r1.grpo.rollout_batch import RolloutTensors, pack_rollout
from megatron_r1.hf_export import EngineExport
from megatron_r1.logprobs import collect_on_rank0, score_rows
from megatron_r1.optim import gather_updated_params
from megatron_r1.resharding.gather import TransferStats
from megatron_r1.rollout.dispatch import comm_device
from megatron_r1.rollout.engine_nodes import HeadlessWorkers
from megatron_r1.rollout.placement import Placement
from megatron_r1.rollout.types import Completion, RolloutEngine
from megatron_r1.session import Session


class SyncCheckError(RuntimeError):
    """An engine's log-probs disagree with the trainer's after a weight sync."""


def push_weights(session: Session, export: EngineExport, engine: RolloutEngine | None,
                 placement: Placement, node_workers: HeadlessWorkers | None = None
                 ) -> dict[str, float]:
    """Send the policy to every engine (engine is this rank's, on leaders; node_workers this
    node's share of a multi-node engine's workers, on its other node hosts). Collective.

    Returns `time/sync_s` and the bytes moved: `sync/engine_rank_mb` (the most any node host
    assembled), `sync/engine_rank_ratio` (that over the bytes its workers need: 1.0),
    `sync/other_rank_mb` (the most any other rank received: 0) and `sync/remote_mb` (all
    bytes that crossed between ranks)."""
    start = time.perf_counter()
    ctx = session.ctx
    gather_updated_params(session.model)  # type: ignore[arg-type]
    stats = TransferStats()
    on_cuda = ctx.device.type == "cuda"
    hosts = placement.node_hosts
    buckets = export.hf_buckets(session.model, ctx, destinations=hosts,
                                nearby={h: g.nearby(h) for g in placement.groups
                                        for h in g.node_hosts},
                                device=ctx.device if on_cuda else torch.device("cpu"),
                                stats=stats)
    if engine is not None:
        engine.update_weights(buckets)
    elif node_workers is not None:
        node_workers.update_weights(buckets)
    else:
        for _ in buckets:  # every bucket is collective: take part in each
            pass
    host = ctx.rank in hosts
    moved = torch.tensor([stats.assembled if host else 0,
                          stats.assembled / max(stats.needed, 1) if host else 0,
                          0 if host else stats.received, stats.received], dtype=torch.float64)
    if dist.get_world_size() > 1:
        moved = moved.to(comm_device())
        dist.all_reduce(moved[:3], op=dist.ReduceOp.MAX)
        dist.all_reduce(moved[3:])
    engine_mb, ratio, other_mb, remote_mb = moved.tolist()
    return {"time/sync_s": time.perf_counter() - start, "sync/engine_rank_mb": engine_mb / 1e6,
            "sync/engine_rank_ratio": ratio, "sync/other_rank_mb": other_mb / 1e6,
            "sync/remote_mb": remote_mb / 1e6}


def check_engines(session: Session, engine: RolloutEngine | None, placement: Placement,
                  probes: list[list[int]], how: MicroBatching, atol: float) -> dict[str, float]:
    """The correctness gate: every engine's log-probs of the probe sequences against the
    trainer's (max abs, nats); a NaN or Inf anywhere fails it. Collective."""
    if not probes:
        return {}
    ctx = session.ctx
    rollout = probe_rollout(probes, session.cfg.data.seq_length)
    # every probe in one micro-batch (padded to the longest: causal, so the padding changes
    # no probe's log-probs), the same on every data-parallel rank: one forward per sync
    # instead of one per probe
    plans = plan_microbatches(range(len(probes)), rollout.length_R.tolist(), 1,
                              MicroBatching(len(probes), multiple_of=how.multiple_of,
                                            uniform=how.uniform))[0]
    trainer = [collect_on_rank0(score_rows(session.model, rollout, plans, session, 1.0),
                                session)]
    dist.broadcast_object_list(trainer, src=0)  # a few short rows, to every leader
    gaps = torch.zeros(len(placement.groups), dtype=torch.float64)
    if engine is not None:
        scores = engine.score(probes)
        worst = 0.0
        for i in range(len(probes)):
            gap = float((trainer[0][i] - scores[i]).abs().max())  # both on the host
            worst = max(worst, gap) if math.isfinite(gap) else math.inf  # NaN fails too
        gaps[placement.group_of(ctx.rank).index] = worst
    if dist.get_world_size() > 1:
        gaps = gaps.to(comm_device())
        dist.all_reduce(gaps)  # one leader per entry
        gaps = gaps.cpu()
    bad = [(g, float(x)) for g, x in zip(placement.groups, gaps) if not x <= atol]
    if bad:
        where = "; ".join(f"{g.name}: {x:.3g} nats" for g, x in bad)
        raise SyncCheckError(
            f"after the weight sync the engine's log-probs differ from the trainer's by up to "
            f"{max(x for _, x in bad):.3g} nats on the probe sequences ({where}; "
            f"rollout.sync_check_atol={atol} for model.params_dtype="
            f"{session.cfg.model.params_dtype}): the engine holds wrong weights")
    return {"sync/max_logp_diff": float(gaps.max())}


def probe_rollout(probes: list[list[int]], seq_length: int) -> RolloutTensors:
    """Probe sequences as rollout rows whose every token after the first is scored."""
    groups = [[Completion(token_ids=tuple(p[1:]), logprobs=(0.0,) * (len(p) - 1), text="",
                          finish_reason="stop")] for p in probes]
    return pack_rollout([p[:1] for p in probes], groups, seq_length, pad_id=0)
