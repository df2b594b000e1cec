"""MoE routing replay on megatron-core's RouterReplay: record which experts every token is
routed to, and make later forward passes route the same way.

Layer L2 (the megatron seam). megatron-core 0.16 gives each `TopKRouter` a `router_replay`
(`megatron/core/transformer/moe/router_replay.py`) with three actions: RECORD keeps the top-k
ids of the last forward, REPLAY_FORWARD routes by ids set beforehand, REPLAY_BACKWARD pops ids
set earlier, first in first out, for the recomputation of a checkpointed layer during the
backward pass. Its static helpers drive one global list of all routers of the process; a GRPO
process holds two models (policy and reference) whose routers must be driven separately, so
`RoutingReplay` drives the routers of one model only, and takes them out of that global list.

Ids travel with the rows, not with micro-batches: a routing table is [R, S, moe_layers, top_k]
(int16; Hugging Face / global expert numbering, which is megatron's, whatever the EP sharding:
routers see every expert) for the model inputs `tokens[r, s]`, dense layers left out, so the
same table serves any micro-batch plan, packed or padded. Per micro-batch and MoE layer the
router sees its tokens as megatron lays them out: [S, B] flattened S-major, and under sequence
parallelism only this TP rank's contiguous S / TP slice; `before_forward` cuts the batch's
[B, L, moe_layers, K] ids that way for every router of the model chunk about to run (a
pipeline stage or virtual chunk holds some MoE layers, found by their global layer number),
and `after_forward` turns recorded ids back into rows (gathering the sequence slices over the
TP group).

Recomputation (model.recompute=full) runs each layer's forward once under no_grad and again
inside the backward pass, where a pipeline schedule may already have run later micro-batches'
forwards: a forward pre-hook on each router picks REPLAY_BACKWARD exactly for those recomputed
calls (gradients enabled inside a checkpointed layer), so they take their own micro-batch's
ids first in, first out. Padding positions (zero-filled) get the ids 0..k-1: valid and
distinct, and masked out of every loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

from megatron_r1.batching import split_rows

Batch = dict[str, Any]

ROUTING_KEY = "routing"
"""The micro-batch key of the ids to replay, [B, L, moe_layers, top_k] (padded) or packed."""


@dataclass(frozen=True, slots=True)
class _Router:
    moe_layer: int
    """Index among the model's MoE layers (the routing table's third dimension)."""
    replay: RouterReplay


class RoutingReplay:
    """The routers of one model (this rank's chunks), for record and replay."""

    def __init__(self, chunks: Sequence[torch.nn.Module], moe_pattern: Sequence[int], *,
                 tp_group: dist.ProcessGroup | None, sequence_parallel: bool,
                 recompute_full: bool) -> None:
        """Args:
            chunks: the model's chunks on this rank, as the schedule passes them to the
                forward step.
            moe_pattern: per transformer layer, 1 for MoE and 0 for dense
                (model.transformer_config.moe_layer_pattern).
        """
        self.num_moe_layers = sum(moe_pattern)
        self._moe_index = [sum(moe_pattern[:i]) for i in range(len(moe_pattern))]
        self._tp_group = tp_group
        self._tp = dist.get_world_size(tp_group) if tp_group is not None else 1
        self._tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        self._shard = sequence_parallel and self._tp > 1
        self._recompute_full = recompute_full
        self._mode: str | None = None
        self._recorded: dict[int, torch.Tensor] = {}
        self._routers: dict[int, list[_Router]] = {}
        self.top_k = 0
        for chunk in chunks:
            found = []
            for module in chunk.modules():
                if not isinstance(module, TopKRouter):
                    continue
                if module.config.moe_router_fusion or module.routing_type == "sinkhorn":
                    # TE's fused top-k and sinkhorn routing never consult router_replay
                    raise ValueError("routing replay needs megatron's unfused top-k router "
                                     "(moe_router_fusion off, no sinkhorn routing)")
                if module.router_replay is None:
                    # what TransformerConfig.moe_enable_routing_replay does at construction,
                    # here after the build so that one model config serves every stage
                    module.router_replay = RouterReplay()
                if module.router_replay in RouterReplay.global_router_replay_instances:
                    RouterReplay.global_router_replay_instances.remove(module.router_replay)
                module.register_forward_pre_hook(self._choose_action)
                self.top_k = module.topk
                found.append(_Router(self._moe_index[module.layer_number - 1],
                                     module.router_replay))
            self._routers[id(chunk)] = found  # none on a stage of dense layers only

    @property
    def local_moe_layers(self) -> list[int]:
        """The MoE layers (routing-table indices) whose routers live on this rank."""
        return sorted({router.moe_layer for router in self._all()})

    # ---------------------------------------------------------------- modes
    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Forward passes in the block record every row's ids (`recorded_table`)."""
        self._recorded = {}
        with self._in_mode("record"):
            yield

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Forward passes in the block route by their micro-batch's ROUTING_KEY ids."""
        with self._in_mode("replay"):
            yield

    @contextlib.contextmanager
    def _in_mode(self, mode: str) -> Iterator[None]:
        self._mode = mode
        try:
            yield
        finally:
            self._mode = None
            for router in self._all():
                router.replay.clear_indices()
                router.replay.clear_router_replay_action()

    def _all(self) -> Iterator[_Router]:
        for routers in self._routers.values():
            yield from routers

    # ---------------------------------------------------------------- the forward step's hooks
    def before_forward(self, batch: Batch, chunk: torch.nn.Module) -> None:
        """Set up this chunk's routers for the micro-batch about to run (no-op outside
        `recording` / `replaying`)."""
        routers = self._routers.get(id(chunk), [])
        if self._mode == "record":
            for router in routers:
                router.replay.set_router_replay_action(RouterReplayAction.RECORD)
        elif self._mode == "replay":
            ids = batch.get(ROUTING_KEY)
            if ids is None:
                raise ValueError("routing replay: the micro-batch carries no routing ids")
            # ids set in a forward stay queued for that forward's recomputation; without one
            # (no recompute, or no backward to come) only the current ids are needed
            keep_queue = self._recompute_full and torch.is_grad_enabled()
            for router in routers:
                if not keep_queue:
                    router.replay.clear_indices()
                router.replay.set_target_indices(self._local_tokens(ids[:, :, router.moe_layer]))
                router.replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    def after_forward(self, batch: Batch, chunk: torch.nn.Module) -> None:
        """Keep the ids this chunk's routers recorded for the micro-batch's rows."""
        if self._mode != "record":
            return
        rows = batch["rows"].tolist()
        width = batch["tokens"].shape[1]
        for router in self._routers.get(id(chunk), []):
            recorded = router.replay.get_recorded_indices()
            assert recorded is not None, "a router of the chunk did not run"
            ids_BLK = self._whole_sequences(recorded, batch["tokens"].shape[0], width)
            for row, ids_TK in zip(rows, split_rows(ids_BLK.to("cpu", torch.int16), batch)):
                table = self._recorded.get(row)
                if table is None:
                    table = torch.zeros(ids_TK.shape[0], self.num_moe_layers, self.top_k,
                                        dtype=torch.int16)
                    self._recorded[row] = table
                table[:, router.moe_layer] = ids_TK

    def recorded_table(self, rows: int, width: int) -> torch.Tensor:
        """[rows, width, moe_layers, top_k] int16 of the last `recording` block (rows it did
        not see, positions past a row's length and layers of other pipeline stages: 0)."""
        table = torch.zeros(rows, width, self.num_moe_layers, self.top_k, dtype=torch.int16)
        for row, ids in self._recorded.items():
            table[row, :ids.shape[0]] = ids
        return table

    # ---------------------------------------------------------------- token layout
    def _local_tokens(self, ids_BLK: torch.Tensor) -> torch.Tensor:
        """[B, L, K] ids -> the [L_local * B, K] int64 rows this rank's router sees."""
        ids_LBK = ids_BLK.transpose(0, 1)
        if self._shard:
            ids_LBK = ids_LBK.chunk(self._tp, dim=0)[self._tp_rank]
        ids_NK = ids_LBK.reshape(-1, ids_LBK.shape[-1]).long()
        ordered = ids_NK.sort(dim=-1).values
        filler = (ordered[:, 1:] == ordered[:, :-1]).any(dim=-1)  # padding: all zeros
        # (unconditionally: asking whether any token is filler would wait for the device)
        return torch.where(filler.unsqueeze(1),
                           torch.arange(ids_NK.shape[1], device=ids_NK.device), ids_NK)

    def _whole_sequences(self, recorded_NK: torch.Tensor, batch: int, width: int
                         ) -> torch.Tensor:
        """A router's recorded [L_local * B, K] ids -> [B, L, K] (all TP slices)."""
        top_k = recorded_NK.shape[-1]
        local = recorded_NK.reshape(-1, batch, top_k)
        if self._shard:
            parts = [torch.empty_like(local) for _ in range(self._tp)]
            dist.all_gather(parts, local.contiguous(), group=self._tp_group)
            local = torch.cat(parts, dim=0)
        assert local.shape[0] == width, (local.shape, width)
        return local.transpose(0, 1)

    def _choose_action(self, router: torch.nn.Module, args: Any) -> None:
        """Forward pre-hook: a replaying router recomputed inside the backward pass (grad
        enabled within a checkpointed layer) pops its queued ids instead."""
        if self._mode != "replay" or router.router_replay is None:
            return
        recomputing = self._recompute_full and router.training and torch.is_grad_enabled()
        router.router_replay.set_router_replay_action(
            RouterReplayAction.REPLAY_BACKWARD if recomputing
            else RouterReplayAction.REPLAY_FORWARD)
