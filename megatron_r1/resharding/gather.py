"""Gather the trainer's sharded weights into full tensors on the ranks that feed rollout
engines, bucket by bucket.

Layer L2. The model's own `sharded_state_dict()` says where every local shard sits in its
global tensor (megatron's checkpoint layout: TP/PP/EP shards, with the gated MLP's gate and up
halves as separate fragments), so one mechanism covers every layout: first a plan (all ranks
learn every fragment's key, global shape, offset, owner and which ranks hold a replica of it;
one all_gather of metadata), then its execution for any number of destinations (one per engine
group): per bucket, every destination's missing fragments arrive point to point, all
destinations at once; a fragment comes from the destination itself when it holds a copy, else
from a rank of the destination's own engine group (inside the node), and only otherwise from
another holder (the least loaded so far: replicas share the sending). Only one bucket of full
tensors exists on a destination at a time, and only destinations ever hold a full tensor. Each
comes out under its parameter name and in the layout of an unsharded (TP=PP=EP=1) model, the
input of the Hugging Face export.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

from megatron_r1.parallel.init import ParallelContext


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


_LOCAL_EXPERT = re.compile(r"\.local_experts\.\d+\.")
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")


def _local_fragments(model: list[torch.nn.Module]) -> list[tuple[str, ShardedTensor, bool]]:
    """(parameter name, shard, whether it is the main replica) of every tensor this rank holds.

    megatron names a shard twice: the state-dict key (the module path, with the layer's index
    within its pipeline stage and the expert's index within its expert-parallel rank) and the
    checkpoint key (global layer numbers; all experts of a layer stacked along a leading axis
    at their global index). The parameter name is the state-dict key with the global layer
    and expert indices, i.e. the name at TP=PP=EP=1.
    """
    shards = []
    for chunk in model:
        module = getattr(chunk, "module", chunk)  # DDP-wrapped or plain
        for key, item in module.sharded_state_dict().items():
            built = {key: item}
            apply_factories(built)  # e.g. the gated MLP's fc1 -> its gate and up halves
            for sh in nested_values(built):
                if not isinstance(sh, ShardedTensor):
                    continue
                replica = sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)
                name = key
                layer = _LAYER.search(sh.key)
                if layer is not None:
                    name = _LAYER.sub(f"decoder.layers.{layer.group(1)}.", name, count=1)
                if sh.prepend_axis_num and ".local_experts." in key:
                    name = _LOCAL_EXPERT.sub(f".local_experts.{sh.global_offset[0]}.", name)
                shards.append((name, sh, not any(replica)))
    return shards


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


def plan_gather(model: list[torch.nn.Module], ctx: ParallelContext,
                bucket_bytes: int) -> tuple[GatherPlan, dict[tuple[str, tuple[int, ...]], torch.Tensor]]:
    """The gather plan (identical on every rank) and this rank's fragment data by
    (parameter name, offset). Collective."""
    local = _local_fragments(model)
    mine = [(Fragment(name, tuple(s.global_shape[s.prepend_axis_num:]),
                      tuple(s.global_offset[s.prepend_axis_num:]), tuple(s.data.shape),
                      s.data.dtype, ctx.rank), main) for name, s, main in local]
    everyone: list[list[tuple[Fragment, bool]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    every = [item for part in everyone for item in part or []]
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
    current, current_bytes = [], 0
    for key, size in sizes.items():
        if current and current_bytes + size > bucket_bytes:
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(key)
        current_bytes += size
    if current:
        buckets.append(current)
    data = {(name, tuple(s.global_offset[s.prepend_axis_num:])): s.data for name, s, _ in local}
    return GatherPlan(fragments=fragments, buckets=buckets,
                      holders={k: tuple(sorted(v)) for k, v in holders.items()}), data


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


def gather_buckets(model: list[torch.nn.Module], ctx: ParallelContext, bucket_bytes: int, *,
                   destinations: Sequence[int] = (0,),
                   nearby: Mapping[int, Sequence[int]] | None = None,
                   device: torch.device | None = None,
                   stats: TransferStats | None = None,
                   ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield, on each destination rank, buckets of (parameter name, full tensor); other ranks
    yield empty lists but must consume the iterator in step (each bucket is collective).

    Args:
        destinations: the ranks that assemble full tensors (one per engine group).
        nearby: destination -> the ranks of its engine group, asked before any other rank.
        device: where full tensors are assembled (the host by default: the CPU engine reads
            them from files; a CUDA engine takes them by IPC from the device).
        stats: filled with the bytes this rank received, copied and sent.
    """
    plan, data = plan_gather(model, ctx, bucket_bytes)
    by_name: dict[str, list[Fragment]] = {}
    for f in plan.fragments:
        by_name.setdefault(f.name, []).append(f)
    me, device = ctx.rank, device or torch.device("cpu")
    stats = stats if stats is not None else TransferStats()
    nearby = nearby or {}
    load: dict[int, int] = {}  # bytes each rank has sent: the same on every rank
    if me in destinations:
        stats.needed += sum(int(torch.Size(f.shape).numel()) * f.dtype.itemsize
                            for f in (frags[0] for frags in by_name.values()))
    with torch.no_grad():
        for names in plan.buckets:
            full: dict[str, torch.Tensor] = {}
            ops: list[dist.P2POp] = []
            landed: list[tuple[str, Fragment, torch.Tensor]] = []
            message = 0  # counted alike on every rank: the tag pairs each send with its receive
            for name in names:
                frags = by_name[name]
                if me in destinations:
                    full[name] = torch.empty(frags[0].shape, dtype=frags[0].dtype, device=device)
                for f in frags:
                    nbytes = int(torch.Size(f.local_shape).numel()) * f.dtype.itemsize
                    for dest in destinations:
                        src = plan.source(f, dest, nearby.get(dest, ()), load)
                        if src == dest == me:
                            full[name][f.region()] = data[(f.name, f.offset)].detach().to(device)
                            stats.local += nbytes
                            continue
                        if src == dest:
                            continue
                        message += 1
                        load[src] = load.get(src, 0) + nbytes
                        if src == me:
                            ops.append(dist.P2POp(dist.isend,
                                                  data[(f.name, f.offset)].detach().contiguous(),
                                                  dest, tag=message))
                            stats.sent += nbytes
                        elif dest == me:
                            buf = torch.empty(f.local_shape, dtype=f.dtype, device=ctx.device)
                            ops.append(dist.P2POp(dist.irecv, buf, src, tag=message))
                            landed.append((name, f, buf))
                            stats.received += nbytes
            # every destination's transfers of this bucket in flight together
            for work in dist.batch_isend_irecv(ops) if ops else []:
                work.wait()
            for name, f, buf in landed:
                full[name][f.region()] = buf.to(device)
            yield [(name, full[name]) for name in names] if me in destinations else []
