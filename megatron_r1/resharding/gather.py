"""Gather the trainer's sharded weights into full tensors on rank 0, bucket by bucket.

Layer L2. The model's own `sharded_state_dict()` says where every local shard sits in its
global tensor (megatron's checkpoint layout: TP/PP/EP shards, with the gated MLP's gate and up
halves as separate fragments), so one mechanism covers every layout: first a plan (all ranks
learn every fragment's key, global shape, offset and owner; one all_gather of metadata),
then its execution (per bucket, owners send their fragments to rank 0 point-to-point, rank 0
assembles). Only one bucket of full tensors exists on rank 0 at a time. Each comes out under
its parameter name and in the layout of an unsharded (TP=PP=EP=1) model, the input of the
Hugging Face export.

A shard-to-shard resharder (engine TP ranks receiving only their slices) replaces the
gather-to-rank-0 execution later; the plan stays.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
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


def _local_fragments(model: list[torch.nn.Module]) -> list[tuple[str, ShardedTensor]]:
    """(parameter name, main-replica shard) of every tensor this rank holds.

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
                if any(replica):
                    continue
                name = key
                layer = _LAYER.search(sh.key)
                if layer is not None:
                    name = _LAYER.sub(f"decoder.layers.{layer.group(1)}.", name, count=1)
                if sh.prepend_axis_num and ".local_experts." in key:
                    name = _LOCAL_EXPERT.sub(f".local_experts.{sh.global_offset[0]}.", name)
                shards.append((name, sh))
    return shards


@dataclass(frozen=True, slots=True)
class GatherPlan:
    fragments: list[Fragment]
    """Every main-replica fragment of the model, sorted by parameter name, then offset."""
    buckets: list[list[str]]
    """Parameter names grouped so that each group's full tensors take at most the bucket size (a larger
    tensor is a bucket of its own)."""


def plan_gather(model: list[torch.nn.Module], ctx: ParallelContext,
                bucket_bytes: int) -> tuple[GatherPlan, dict[tuple[str, tuple[int, ...]], torch.Tensor]]:
    """The gather plan (identical on every rank) and this rank's fragment data by
    (parameter name, offset). Collective."""
    local = _local_fragments(model)
    mine = [Fragment(name, tuple(s.global_shape[s.prepend_axis_num:]),
                     tuple(s.global_offset[s.prepend_axis_num:]), tuple(s.data.shape),
                     s.data.dtype, ctx.rank) for name, s in local]
    everyone: list[list[Fragment] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    fragments = sorted((f for part in everyone for f in part or []),
                       key=lambda f: (f.name, f.offset))
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
    data = {(name, tuple(s.global_offset[s.prepend_axis_num:])): s.data for name, s in local}
    return GatherPlan(fragments=fragments, buckets=buckets), data


def gather_buckets(model: list[torch.nn.Module], ctx: ParallelContext,
                   bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield, on rank 0, buckets of (parameter name, full tensor on CPU); other ranks yield
    empty lists but must consume the iterator in step (each bucket is collective)."""
    plan, data = plan_gather(model, ctx, bucket_bytes)
    by_name: dict[str, list[Fragment]] = {}
    for f in plan.fragments:
        by_name.setdefault(f.name, []).append(f)
    with torch.no_grad():
        for names in plan.buckets:
            out: list[tuple[str, torch.Tensor]] = []
            for name in names:
                frags = by_name[name]
                full = (torch.empty(frags[0].shape, dtype=frags[0].dtype)
                        if ctx.rank == 0 else None)
                for f in frags:
                    local = data.get((f.name, f.offset)) if f.owner == ctx.rank else None
                    if f.owner == 0:
                        if ctx.rank == 0:
                            full[f.region()] = local.detach().cpu()  # type: ignore[index,union-attr]
                    elif ctx.rank == f.owner:
                        dist.send(local.detach().contiguous(), dst=0)  # type: ignore[union-attr]
                    elif ctx.rank == 0:
                        buf = torch.empty(f.local_shape, dtype=f.dtype, device=ctx.device)
                        dist.recv(buf, src=f.owner)
                        full[f.region()] = buf.cpu()  # type: ignore[index]
                if full is not None:
                    out.append((name, full))
            yield out
