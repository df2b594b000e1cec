"""Bytes and seconds of one weight sync: the trainer's shards to every engine group's workers.

Layer L0 (pure, given a counts function). After every rollout the trainer's weights (megatron
TP/PP/EP shards) go to the engine of every engine group (megatron_r1.rollout.placement) as
Hugging Face tensors in the engine's dtype (memory.engine_weight_bytes: linear weights in FP8
where the policy trains in FP8). Two paths are costed:

- full tensors (today's path): the engine's node host on each node it spans (its leader, and
  the group's first rank on each other node, rollout/placement.py) receives every tensor
  whole; the node's other workers read their slice of it from the host's device (CUDA IPC,
  vLLM's loaders narrow a view), inside the node. So each host GPU receives the whole model
  and every other worker its TP_e slice over NVLink;
- sharded (the goal): each worker receives only its tensor-parallel slice, counted like
  the engine's weights in memory.rollout_memory: the model / TP_e, plus whatever vLLM keeps
  whole on every worker (norms, router, MLA's down-projections). An engine with expert
  parallelism over its workers holds experts / EP_e whole experts instead of a TP_e slice of
  each: the same bytes when EP_e = TP_e (vLLM's expert parallelism), so one number covers both.

Where the bytes come from. Links are per GPU and per direction: a worker receives over NVLink
what the trainer ranks of its own node hold, and over InfiniBand what they lack. For an
engine group of one node (the default when TP_e fits a node) these are "the group's own
ranks" and "the others"; a group over several nodes reaches its ranks on other nodes over
InfiniBand too, and a group smaller than a node reaches its node's other ranks over NVLink.
What a node holds follows from megatron's rank order (tp-cp-ep-dp-pp: tensor rank fastest,
pipeline stage slowest; the expert grid is etp-ep-edp-pp over the same stages): of each
pipeline stage with a rank on the node, the distinct tensor shards of those ranks (the dense
part) and their distinct (expert-TP, EP) shards (the routed experts). Assumption: a worker's
need of one stage's dense or expert part is spread over that part's trainer shards in
proportion to their size. For the full path this is exact. For the sharded path it is exact
when the node holds all or none of a stage's tensor shards (TP divides the GPUs per node) and
the engine slices every tensor of a part alike; where an engine's slices could be aligned
with the node's shards (e.g. engine EP ranks reading the node's own experts) it overstates
the cross-node bytes. Tensors megatron replicates over TP (norms, router) count as split,
which matters only when a node holds part of a tensor-parallel group.

Time. Each worker's NVLink and NIC run concurrently, and all engine groups sync at once, so
the sync takes max over workers of max(NVLink bytes / NVLink bandwidth, InfiniBand bytes /
InfiniBand bandwidth). The time is bound by the receivers: it assumes the senders spread
the load over the ranks that hold each shard. Not counted: gathering megatron's shards into
Hugging Face tensors, FP8 quantisation, vLLM's weight loaders, per-message latency. The
prediction is a lower bound on the transfer, to be read against measured anchors.

Default bandwidths (per GPU and direction; memory.NVLINK_BYTES_PER_S and
INFINIBAND_BYTES_PER_S, `plan --nvlink-bandwidth / --ib-bandwidth`) are an H800 node's with
one 400 Gb/s NDR InfiniBand NIC per GPU, the cluster of configs/deepseek_v3_671b_r1zero.yaml:
- NVLink 160 GB/s: what DeepSeek-V3's technical report (arXiv 2412.19437, section 3.2.2)
  gives for its H800 cluster ("NVLink offers a bandwidth of 160 GB/s, roughly 3.2 times that
  of IB (50 GB/s)"). The H800's NVLink is 400 GB/s bidirectional, 200 GB/s each way (the
  H100 SXM's is 900 GB/s bidirectional, 450 each way; DeepSeek's ISCA 2025 paper, arXiv
  2505.09343: "reduced from 900 GB/s to 400 GB/s").
- InfiniBand 50 GB/s: 400 Gb/s NDR (ConnectX-7) is 50 GB/s each way at line rate, the same
  report's figure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from megatron_r1.config.schema import Config
from megatron_r1.plan.counts import PartCount, ShardCounts
from megatron_r1.plan.memory import (
    CountsFn,
    Plan,
    WeightsDtype,
    engine_placement,
    engine_weight_bytes,
    stage_layers,
)

# Published weight-update times to read the prediction against; they are not inputs to it.
NEMO_RL_DSV3_REFIT_S = (2.4, 2.8)
"""NeMo-RL's refit of DeepSeek-V3 from megatron to vLLM on separate (non-colocated) GPUs,
after the work in "NeMo-RL: Journey of Optimizing Weight Transfer in Large MoE Models by 10x"
(NVIDIA NeMo blog, 2025-08-12, nvidia-nemo.github.io/blog/2025/08/12/nemo-rl-refit-performance)."""
CHECKPOINT_ENGINE_DSV31_UPDATE_S = 11.33
"""MoonshotAI checkpoint-engine, README benchmark table: DeepSeek-V3.1 (FP8) on 256 H20,
16 vLLM instances of TP16 colocated with it, "Update (Broadcast)" 11.33 s (from host memory,
vLLM v0.10.2rc1; github.com/MoonshotAI/checkpoint-engine)."""


@dataclass(frozen=True, slots=True)
class TrainerGrid:
    """Megatron's rank grids of the trainer (order tp-cp-ep-dp-pp): the dense grid
    tp + TP x (cp + CP x (dp + DP x pp)) and the expert grid etp + ETP x (ep + EP x (edp +
    EDP x pp)), both with W / PP consecutive ranks per pipeline stage."""

    world: int
    tensor: int
    pipeline: int
    expert: int
    expert_tensor: int

    def stage_of(self, rank: int) -> int:
        return rank // (self.world // self.pipeline)

    def tensor_shard(self, rank: int) -> int:
        """The rank's tensor-parallel index (which shard of the dense part it holds)."""
        return rank % self.tensor

    def expert_shard(self, rank: int) -> tuple[int, int]:
        """(expert-TP index, EP index): which shard of the routed experts the rank holds."""
        local = rank % (self.world // self.pipeline)
        return local % self.expert_tensor, (local // self.expert_tensor) % self.expert


def node_shares(grid: TrainerGrid, ranks: range) -> list[tuple[float, float]]:
    """Per pipeline stage, the fractions (dense part, routed experts) of that stage's weights
    that `ranks` (one node) hold together: distinct tensor shards / TP and distinct
    (expert-TP, EP) shards / (ETP x EP)."""
    dense: list[set[int]] = [set() for _ in range(grid.pipeline)]
    expert: list[set[tuple[int, int]]] = [set() for _ in range(grid.pipeline)]
    for rank in ranks:
        stage = grid.stage_of(rank)
        dense[stage].add(grid.tensor_shard(rank))
        expert[stage].add(grid.expert_shard(rank))
    shards = grid.expert * grid.expert_tensor
    return [(len(d) / grid.tensor, len(e) / shards) for d, e in zip(dense, expert, strict=True)]


def stage_parts(counts: ShardCounts, stages: list[range]) -> list[PartCount]:
    """What the engine needs of each trainer stage's layers, summing to counts.whole_model():
    a tied output head is the embedding (first stage), not the last stage's copy."""
    last = len(stages) - 1
    parts = []
    for stage, layers in enumerate(stages):
        part = counts.stage(layers, first=stage == 0, last=False)
        if stage == last:
            part = part + counts.final_norm
            if not counts.tied_single_stage:
                part = part + counts.output_layer
        parts.append(part)
    return parts


def dense_expert_bytes(part: PartCount, dtype: WeightsDtype) -> tuple[float, float]:
    """(dense, routed-expert) bytes of `part` in the engine's dtype. Routed experts are
    linear weights only (no expert biases in the supported families), so they take the
    low-precision elements first."""
    expert_low = min(part.expert, part.low_precision)
    dense = PartCount(part.dense, 0, part.low_precision - expert_low)
    return (engine_weight_bytes(dense, dtype),
            engine_weight_bytes(PartCount(0, part.expert, expert_low), dtype))


def received(need: list[tuple[float, float]],
             shares: list[tuple[float, float]]) -> tuple[float, float]:
    """(in-node, cross-node) bytes of a worker that needs `need` (per stage: dense, expert
    bytes) on a node holding `shares` of each stage (node_shares)."""
    in_node = sum(d * sd + e * se for (d, e), (sd, se) in zip(need, shares, strict=True))
    total = sum(d + e for d, e in need)
    return in_node, total - in_node


@dataclass(frozen=True, slots=True)
class SyncPath:
    """One way of sending the weights: the slowest worker, its group, and the whole job."""

    per_gpu: float
    """Bytes the engine worker that receives the most receives per sync."""
    in_node: float
    """Of these, bytes from its own node's trainer ranks (NVLink), for the slowest worker."""
    cross_node: float
    """Of these, bytes from other nodes (InfiniBand), for the slowest worker."""
    group_in_node: float
    """Bytes the slowest engine group's workers receive inside their nodes, together."""
    group_cross_node: float
    job_total: float
    """Bytes all workers of all engine groups receive per sync."""
    job_cross_node: float
    seconds: float
    """max over workers of max(in-node / NVLink, cross-node / InfiniBand bandwidth)."""


@dataclass(frozen=True, slots=True)
class SyncCost:
    """The weight sync of one layout: engine groups, links, and both paths."""

    groups: int
    ranks_per_group: int
    workers_per_group: int
    """The engine's tensor-parallel degree TP_e (one worker per GPU)."""
    weights: WeightsDtype
    node_share: float
    """Fraction of the engine's full bytes held by the trainer ranks of the worker node
    that holds the least (0..1)."""
    nvlink: float
    """Bytes/s per GPU and direction."""
    infiniband: float
    full: SyncPath
    sharded: SyncPath


def _path(need_of: Callable[[int], tuple[float, float]], workers: list[list[int]],
          nvlink: float, infiniband: float) -> SyncPath:
    """Cost one path: every worker of every group (`workers`: ranks per group) receives
    `need_of(rank)` = (in-node, cross-node) bytes; the worker and the group reported are the
    slowest ones."""
    slowest: tuple[float, float, float] = (-1.0, 0.0, 0.0)  # (seconds, in-node, cross-node)
    slowest_group = (-1.0, 0.0, 0.0)
    most, job_total, job_cross = 0.0, 0.0, 0.0
    for group in workers:
        group_seconds, group_in, group_cross = 0.0, 0.0, 0.0
        for rank in group:
            in_node, cross = need_of(rank)
            seconds = max(in_node / nvlink, cross / infiniband)
            if seconds > slowest[0]:
                slowest = (seconds, in_node, cross)
            most = max(most, in_node + cross)
            group_seconds = max(group_seconds, seconds)
            group_in += in_node
            group_cross += cross
        job_total += group_in + group_cross
        job_cross += group_cross
        if group_seconds > slowest_group[0]:
            slowest_group = (group_seconds, group_in, group_cross)
    return SyncPath(per_gpu=most, in_node=slowest[1], cross_node=slowest[2],
                    group_in_node=slowest_group[1], group_cross_node=slowest_group[2],
                    job_total=job_total, job_cross_node=job_cross, seconds=slowest[0])


def sync_cost(cfg: Config, plan: Plan, counts_fn: CountsFn) -> SyncCost:
    """Bytes per sync (full tensors and TP_e slices) and the predicted seconds of `plan`'s
    layout, with its engine groups from rollout.ranks_per_engine.

    Raises:
        ValueError: the engine groups do not fit the GPUs (names the rollout field).
    """
    c, o = plan.candidate, plan.options
    placement = engine_placement(cfg, c, o)
    per_node = min(o.gpus, o.gpus_per_node)
    grid = TrainerGrid(world=o.gpus, tensor=c.tensor, pipeline=c.pipeline, expert=c.expert,
                       expert_tensor=c.expert_tensor)
    workers = [list(g.worker_ranks) for g in placement.groups]
    node_of = {rank: rank // per_node for group in workers for rank in group}
    shares = {node: node_shares(grid, range(node * per_node, (node + 1) * per_node))
              for node in set(node_of.values())}
    stages = stage_layers(cfg.model.num_layers, c)
    dtype = o.rollout_weights
    whole = [dense_expert_bytes(p, dtype)
             for p in stage_parts(counts_fn(cfg.model, 1, 1, 1), stages)]
    tp_e = c.rollout_tensor
    shard = [dense_expert_bytes(p, dtype)
             for p in stage_parts(counts_fn(cfg.model, tp_e, 1, tp_e), stages)]
    total = sum(d + e for d, e in whole)
    held = min(received(whole, share)[0] for share in shares.values())
    links = (o.nvlink_bandwidth, o.infiniband_bandwidth)
    hosts = set(placement.node_hosts)
    slice_bytes = sum(d + e for d, e in shard)

    def full(rank: int) -> tuple[float, float]:
        # a host assembles whole tensors; its node's other workers read their slice from it
        return received(whole, shares[node_of[rank]]) if rank in hosts else (slice_bytes, 0.0)

    return SyncCost(
        groups=len(placement.groups), ranks_per_group=len(placement.groups[0].ranks),
        workers_per_group=len(workers[0]), weights=dtype,
        node_share=held / total if total else 1.0, nvlink=links[0], infiniband=links[1],
        full=_path(full, workers, *links),
        sharded=_path(lambda rank: received(shard, shares[node_of[rank]]), workers, *links))
