"""The log-prob phase of GRPO: per-token log-probs of rollout rows under the policy or the
frozen reference model, and that reference model itself.

Layer L3. Forward only, through the same door as training (megatron_r1.schedule), over the
same micro-batch plans the optimizer steps will use; the results come back to the host, one
tensor per row of the length that row uses, so that they can be compared with the engine's,
stored, or laid out again for training (`dense`). Used by the GRPO stage, the sync gate and
benchmarks/bench_trainer_gpu.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from megatron_r1.batching import MicroBatchPlan, split_rows
from megatron_r1.config import Config
from megatron_r1.grpo import forward
from megatron_r1.grpo.rollout_batch import RolloutTensors, score_microbatch
from megatron_r1.model.build import build_model
from megatron_r1.parallel.init import ParallelContext
from megatron_r1.schedule import forward_backward
from megatron_r1.session import Session

REF_MODEL = "ref_model"
"""The reference model's name among a session's extra models (and in checkpoints)."""


def score_rows(model: list[torch.nn.Module], rollout: RolloutTensors,
               plans: list[MicroBatchPlan], session: Session, temperature: float, *,
               routing: forward.RoutingHook | None = None,
               routing_RSLK: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Per-token log-probs (host, float32 [length_R[r]]) of the planned micro-batches' rows
    under `model`, forward only; known on last-stage ranks, empty elsewhere. Collective.

    Args:
        routing: the model's routing record/replay (model/routing_replay.py), whose mode the
            caller sets; `routing_RSLK` the expert ids it replays.
    """
    cfg, ctx = session.cfg, session.ctx
    step = forward.score_step(temperature, cfg.grpo.fused_loss, ctx.tp_group, routing)
    batches = [score_microbatch(rollout, plan, routing_RSLK) for plan in plans]
    with torch.no_grad():
        for chunk in model:
            chunk.eval()
        outputs = forward_backward(model, batches, step, ctx, forward_only=True)
        for chunk in model:
            chunk.train()
    scores: dict[int, torch.Tensor] = {}
    for batch, out in zip(batches, outputs):
        rows = split_rows(out["logp"].float().cpu(), batch)
        scores.update(zip(batch["rows"].tolist(), rows))
    return scores


def collect_on_rank0(local: dict[int, torch.Tensor], session: Session) -> dict[int, torch.Tensor]:
    """Merge every last-stage rank's {row: tensor} on global rank 0. Collective."""
    ctx = session.ctx
    mine = local if (ctx.is_last_stage and ctx.tp_rank == 0) else {}
    gathered: list[Any] = [None] * dist.get_world_size() if ctx.rank == 0 else []
    dist.gather_object(mine, gathered if ctx.rank == 0 else None, dst=0)
    merged: dict[int, torch.Tensor] = {}
    for part in gathered:
        merged.update(part or {})
    return merged


def dense(rows: dict[int, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """[R, S] with the given rows' values at their first positions, zeros elsewhere."""
    out = torch.zeros(shape)
    for r, value in rows.items():
        out[r, :value.numel()] = value
    return out


def reference_models(cfg: Config) -> Callable[[ParallelContext], dict[str, list[torch.nn.Module]]] | None:
    """The session's builder of the frozen reference model (same layout as the policy, no
    gradients; its weights come from the policy or the checkpoint), or None when
    grpo.kl_coef is 0 and no reference is needed."""
    if cfg.grpo.kl_coef == 0:
        return None

    def build(ctx: ParallelContext) -> dict[str, list[torch.nn.Module]]:
        chunks = build_model(cfg.model, cfg.parallel, ctx, perform_initialization=False)
        for chunk in chunks:
            chunk.requires_grad_(False)
            chunk.eval()
        return {REF_MODEL: list(chunks)}
    return build
