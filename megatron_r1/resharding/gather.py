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

The plan and each rank's schedule (megatron_r1.resharding.plan) are built once per layout
and kept: a sync walks only this rank's own shards (their current tensors), compares their
metadata with the cached layout and agrees with the other ranks by a one-number all-reduce;
only a changed layout on any rank gathers metadata and plans again.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

from megatron_r1.parallel.init import ParallelContext
from megatron_r1.resharding.plan import (
    Fragment,
    GatherPlanCache,
    Shard,
    TransferStats,
    execute,
)

__all__ = ["GatherPlanCache", "TransferStats", "gather_buckets", "local_shards"]

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


def local_shards(model: list[torch.nn.Module], rank: int
                 ) -> tuple[list[Shard], dict[tuple[str, tuple[int, ...]], torch.Tensor]]:
    """This rank's shards: their metadata, and their current tensors by (parameter name,
    offset). Local; cheap next to a plan (no collective)."""
    local = _local_fragments(model)
    mine = [(Fragment(name, tuple(s.global_shape[s.prepend_axis_num:]),
                      tuple(s.global_offset[s.prepend_axis_num:]), tuple(s.data.shape),
                      s.data.dtype, rank), main) for name, s, main in local]
    data = {(name, tuple(s.global_offset[s.prepend_axis_num:])): s.data for name, s, _ in local}
    return mine, data


def gather_buckets(model: list[torch.nn.Module], ctx: ParallelContext, bucket_bytes: int, *,
                   destinations: Sequence[int] = (0,),
                   nearby: Mapping[int, Sequence[int]] | None = None,
                   device: torch.device | None = None,
                   stats: TransferStats | None = None,
                   cache: GatherPlanCache | None = None,
                   ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield, on each destination rank, buckets of (parameter name, full tensor); other ranks
    yield empty lists but must consume the iterator in step (each bucket is collective). The
    plan is settled (collectively) when this is called, the buckets move as they are taken.

    Args:
        destinations: the ranks that assemble full tensors (one per engine group).
        nearby: destination -> the ranks of its engine group, asked before any other rank.
        device: where full tensors are assembled (the host by default: the CPU engine reads
            them from files; a CUDA engine takes them by IPC from the device).
        stats: filled with the bytes this rank received, copied and sent.
        cache: the plan kept from earlier syncs (GatherPlanCache); None plans afresh.
    """
    mine, data = local_shards(model, ctx.rank)
    cache = cache if cache is not None else GatherPlanCache()
    _, todo = cache.get(mine, ctx.rank, bucket_bytes, destinations, nearby or {})
    return execute(todo, data, device=device or torch.device("cpu"), comm=ctx.device,
                   stats=stats if stats is not None else TransferStats())
