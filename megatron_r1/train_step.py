"""One optimizer step: forward/backward over the step's micro-batches, then the update.

Layer L3. Stage-agnostic: SFT and GRPO differ only in the `forward_step` they pass (the loss),
so clipping, the LR schedule, and the global loss denominator behave the same everywhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from megatron_r1.optim import MegatronOptimizer, OptimizerParamScheduler
from megatron_r1.parallel.init import ParallelContext
from megatron_r1.schedule import Batch, ForwardStep, forward_backward, reduce_step_metrics


@dataclass(frozen=True, slots=True)
class StepResult:
    metrics: dict[str, float]
    """Reduced loss metrics plus grad_norm, lr and step_time_s."""
    updated: bool
    """False when the optimizer skipped the update (non-finite gradients in fp16)."""


def train_step(model: list[torch.nn.Module], optimizer: MegatronOptimizer,
               scheduler: OptimizerParamScheduler, microbatches: list[Batch],
               forward_step: ForwardStep, metric_keys: list[str], ctx: ParallelContext, *,
               seq_length: int) -> StepResult:
    """Run one optimizer step on this rank's micro-batches (collective over all ranks).

    Args:
        metric_keys: keys of the loss function's metrics, each a [sum, count] tensor.
    """
    start = time.perf_counter()
    for chunk in model:
        chunk.zero_grad_buffer()  # type: ignore[operator]
    optimizer.zero_grad()
    per_microbatch = forward_backward(model, microbatches, forward_step, ctx,
                                      seq_length=seq_length)
    updated, grad_norm, _ = optimizer.step()
    if updated:
        scheduler.step(increment=1)
    metrics = reduce_step_metrics(per_microbatch, metric_keys, ctx)
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["lr"] = float(optimizer.param_groups[0]["lr"])
    metrics["step_time_s"] = time.perf_counter() - start
    return StepResult(metrics=metrics, updated=bool(updated))


@torch.no_grad()
def eval_step(model: list[torch.nn.Module], microbatches: list[Batch], forward_step: ForwardStep,
              metric_keys: list[str], ctx: ParallelContext, *, seq_length: int) -> dict[str, float]:
    """Forward only over `microbatches`; the reduced metrics (collective)."""
    for chunk in model:
        chunk.eval()
    per_microbatch = forward_backward(model, microbatches, forward_step, ctx,
                                      seq_length=seq_length, forward_only=True)
    for chunk in model:
        chunk.train()
    return reduce_step_metrics(per_microbatch, metric_keys, ctx)
