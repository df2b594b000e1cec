"""The weight sync's gather plan, each rank's schedule, and their execution.

Layer L2 (torch and torch.distributed only: megatron_r1.resharding.gather reads the shards
from megatron's sharded state dict). A plan says, for every fragment of every parameter, who
holds a copy and how the parameters are grouped into buckets; a rank's schedule lists, bucket
by bucket, the fragments it copies into its own full tensors, sends and receives, with the
source of each chosen alike on every rank: the destination itself when it holds a copy, else
a rank of the destination's own engine group (inside the node), else the least loaded holder
(replicas share the sending). Both depend only on the layout, not on the values, so they are
built once per layout and kept (`GatherPlanCache`): the metadata of every rank's shards is
gathered and every fragment walked for every destination only when some rank's layout (or the
destinations) changed. The cache holds names, shapes, offsets and owners, never tensors:
offloading swaps parameters' storages, so each sync passes the current ones to `execute`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class Fragment:
    """One rank's shard of one parameter."""

    name: str
    """The parameter's name in a TP=PP=EP=1 model (`...local_experts.{global index}...`)."""
    shape: tuple[int, ...]
    """The full parameter's shape."""
    offset: tuple[int, ...]
    """Where this shard starts in the full parameter."""
    local_shape: tuple[int, ...]
    dtype: torch.dtype
    owner: int

    def region(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.local_shape))


@dataclass(frozen=True, slots=True)
class GatherPlan:
    fragments: list[Fragment]
    """Every main-replica fragment of the model, sorted by parameter name, then offset."""
    buckets: list[list[str]]
    """Parameter names grouped so that each group's full tensors take at most the bucket size (a larger
    tensor is a bucket of its own)."""
    holders: dict[tuple[str, tuple[int, ...]], tuple[int, ...]]
    """(parameter name, fragment offset) -> every rank holding a copy of that fragment (its
    owner and the replicas: data-parallel copies, tensor-parallel copies of unsplit tensors)."""

    def source(self, fragment: Fragment, destination: int, nearby: Sequence[int],
               load: Mapping[int, int]) -> int:
        """Where `destination` takes `fragment` from: itself when it holds a copy, else the
        first rank of `nearby` (its engine group) that does, else the holder that has sent
        the fewest bytes so far (`load`), the nearest rank among equals (consecutive ranks
        share a node)."""
        holders = self.holders[(fragment.name, fragment.offset)]
        if destination in holders:
            return destination
        near = next((r for r in nearby if r in holders), None)
        if near is not None:
            return near
        return min(holders, key=lambda r: (load.get(r, 0), abs(r - destination), r))


Shard = tuple[Fragment, bool]
"""One local shard's metadata and whether it is the main replica."""


def build_plan(everyone: Sequence[Sequence[Shard]], bucket_bytes: int) -> GatherPlan:
    """The gather plan from every rank's shards (identical on every rank)."""
    every = [item for part in everyone for item in part]
    fragments = sorted((f for f, main in every if main), key=lambda f: (f.name, f.offset))
    holders: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for f, _ in every:
        holders.setdefault((f.name, f.offset), []).append(f.owner)
    numel: dict[str, int] = {}
    sizes: dict[str, int] = {}
    covered: dict[str, int] = {}
    for f in fragments:
        numel[f.name] = int(torch.Size(f.shape).numel())
        sizes[f.name] = numel[f.name] * f.dtype.itemsize
        covered[f.name] = covered.get(f.name, 0) + int(torch.Size(f.local_shape).numel())
    for key, total in numel.items():
        if covered[key] != total:  # overlapping or missing shards would assemble garbage
            raise AssertionError(f"{key}: fragments cover {covered[key]} of {total} elements")
    buckets: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for key, size in sizes.items():
        if current and current_bytes + size > bucket_bytes:
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(key)
        current_bytes += size
    if current:
        buckets.append(current)
    return GatherPlan(fragments=fragments, buckets=buckets,
                      holders={k: tuple(sorted(v)) for k, v in holders.items()})


@dataclass(frozen=True, slots=True)
class Move:
    """One fragment this rank copies, sends or receives in a bucket."""

    kind: Literal["copy", "send", "recv"]
    name: str
    fragment: Fragment
    peer: int
    """The destination of a send, the source of a receive (this rank for a copy)."""
    tag: int
    """Pairs a send with its receive: counted alike on every rank."""

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.fragment.local_shape).numel()) * self.fragment.dtype.itemsize


@dataclass(frozen=True, slots=True)
class BucketSchedule:
    names: list[str]
    """The bucket's parameters, in order."""
    full: list[Fragment]
    """On a destination: one fragment per parameter (its full shape and dtype), else empty."""
    moves: list[Move]
    """This rank's part of the bucket's transfers, in the order every rank plans them."""


@dataclass(frozen=True, slots=True)
class RankSchedule:
    """What one rank does in every bucket of a sync (for fixed destinations)."""

    buckets: list[BucketSchedule]
    needed: int
    """Bytes of all full tensors this rank assembles (0 unless it is a destination)."""


def schedule(plan: GatherPlan, me: int, destinations: Sequence[int],
             nearby: Mapping[int, Sequence[int]]) -> RankSchedule:
    """Rank `me`'s copies, sends and receives of every bucket: every destination's every
    fragment, its source chosen by GatherPlan.source with the load so far (the same walk on
    every rank, so the tags and the loads agree)."""
    by_name: dict[str, list[Fragment]] = {}
    for f in plan.fragments:
        by_name.setdefault(f.name, []).append(f)
    load: dict[int, int] = {}  # bytes each rank has sent: the same on every rank
    buckets, destination = [], me in destinations
    for names in plan.buckets:
        moves: list[Move] = []
        message = 0
        for name in names:
            for f in by_name[name]:
                nbytes = int(torch.Size(f.local_shape).numel()) * f.dtype.itemsize
                for dest in destinations:
                    src = plan.source(f, dest, nearby.get(dest, ()), load)
                    if src == dest:
                        if src == me:
                            moves.append(Move("copy", name, f, me, 0))
                        continue
                    message += 1
                    load[src] = load.get(src, 0) + nbytes
                    if src == me:
                        moves.append(Move("send", name, f, dest, message))
                    elif dest == me:
                        moves.append(Move("recv", name, f, src, message))
        buckets.append(BucketSchedule(names=list(names), moves=moves,
                                      full=[by_name[n][0] for n in names] if destination else []))
    needed = sum(int(torch.Size(frags[0].shape).numel()) * frags[0].dtype.itemsize
                 for frags in by_name.values()) if destination else 0
    return RankSchedule(buckets=buckets, needed=needed)


class GatherPlanCache:
    """The gather plan and this rank's schedule, kept while the layout holds (one per run:
    hf_export.EngineExport keeps one)."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self.plan: GatherPlan | None = None
        self.schedule: RankSchedule | None = None
        self.builds = 0
        """How many times the plan was built."""

    def get(self, mine: Sequence[Shard], rank: int, bucket_bytes: int,
            destinations: Sequence[int], nearby: Mapping[int, Sequence[int]], *,
            gather: Callable[[list[Shard]], list[list[Shard]]] | None = None
            ) -> tuple[GatherPlan, RankSchedule]:
        """The plan and rank `rank`'s schedule, built again when any rank's shards (`mine`
        here: names, shapes, offsets, dtypes, replicas), the destinations, their groups or the
        bucket size differ from the cached ones. Collective: one all-reduce of one number,
        plus the gathering of every rank's shards when it rebuilds.

        Args:
            gather: every rank's shards from this rank's (default: all_gather_object over
                the world; a benchmark passes a synthetic world).
        """
        key = (tuple(mine), tuple(destinations),
               tuple(sorted((d, tuple(r)) for d, r in nearby.items())), bucket_bytes)
        stale = torch.tensor([int(key != self._key)], dtype=torch.int64)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:  # a rebuild is collective: every rank rebuilds when any must
            # where collectives take tensors (rollout.dispatch.comm_device, a layer above)
            if dist.get_backend() == "nccl":
                stale = stale.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(stale, op=dist.ReduceOp.MAX)
        if int(stale.item()) or self.plan is None or self.schedule is None:
            self.plan = build_plan((gather or _all_gather)(list(mine)), bucket_bytes)
            self.schedule = schedule(self.plan, rank, destinations, nearby)
            self._key = key
            self.builds += 1
        return self.plan, self.schedule


def _all_gather(mine: list[Shard]) -> list[list[Shard]]:
    """Every rank's shards, in rank order (pickled metadata, once per layout)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine]
    everyone: list[list[Shard] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return [part or [] for part in everyone]


@dataclass
class TransferStats:
    """What one rank moved in one sync (bytes of trainer-dtype fragments)."""

    received: int = 0
    """Bytes that arrived from other ranks."""
    local: int = 0
    """Bytes a destination copied from its own shards."""
    sent: int = 0
    needed: int = 0
    """Bytes of all full tensors a destination assembles (0 elsewhere)."""

    @property
    def assembled(self) -> int:
        """Bytes of full tensors this rank assembled (0 unless it is a destination)."""
        return self.received + self.local


def execute(todo: RankSchedule, data: Mapping[tuple[str, tuple[int, ...]], torch.Tensor],
            *, device: torch.device, comm: torch.device, stats: TransferStats
            ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Run one rank's schedule, bucket by bucket: yield, on a destination, the bucket's
    (parameter name, full tensor) assembled on `device`, else an empty list; every rank must
    consume the iterator in step (each bucket is collective).

    Args:
        data: this rank's shards' current tensors by (parameter name, offset).
        comm: where received fragments land (the rank's device under NCCL).
        stats: filled with the bytes this rank received, copied and sent.
    """
    stats.needed += todo.needed
    with torch.no_grad():
        for bucket in todo.buckets:
            full = {f.name: torch.empty(f.shape, dtype=f.dtype, device=device)
                    for f in bucket.full}
            ops: list[dist.P2POp] = []
            landed: list[tuple[Fragment, torch.Tensor]] = []
            for move in bucket.moves:
                f = move.fragment
                key = (f.name, f.offset)
                if move.kind == "copy":
                    full[f.name][f.region()] = data[key].detach().to(device)
                    stats.local += move.nbytes
                elif move.kind == "send":
                    ops.append(dist.P2POp(dist.isend, data[key].detach().contiguous(),
                                          move.peer, tag=move.tag))
                    stats.sent += move.nbytes
                else:
                    buf = torch.empty(f.local_shape, dtype=f.dtype, device=comm)
                    ops.append(dist.P2POp(dist.irecv, buf, move.peer, tag=move.tag))
                    landed.append((f, buf))
                    stats.received += move.nbytes
            # every destination's transfers of this bucket in flight together
            for work in dist.batch_isend_irecv(ops) if ops else []:
                work.wait()
            for f, buf in landed:
                full[f.name][f.region()] = buf.to(device)
            yield [(name, full[name]) for name in bucket.names] if bucket.full else []
