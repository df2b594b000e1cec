"""One optimizer step: forward/backward over the step's micro-batches, then the update.

Layer L3. Stage-agnostic: SFT and GRPO differ only in the `forward_step` they pass (the loss),
so clipping, the LR schedule, the global loss denominator and the non-finite guard behave the
same everywhere.

Non-finite safety: before the update, the reduced loss metrics and every gradient buffer are
checked (all ranks agree on the answer); a step with a NaN or an inf anywhere is skipped (no
update, no scheduler step) and reported by name. In fp16 the gradients are left to megatron's
dynamic loss scaler, whose overflow skips are part of normal training. `NonFiniteGuard`
counts consecutive skips and stops the run after `train.max_consecutive_nonfinite`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_r1.optim import (
    MegatronOptimizer,
    OptimizerParamScheduler,
    agree_on_first,
    first_nonfinite_gradient,
    loss_scaler_checks_gradients,
)
from megatron_r1.parallel.init import ParallelContext
from megatron_r1.schedule import Batch, ForwardStep, forward_backward, reduce_step_metrics


@dataclass(frozen=True, slots=True)
class StepResult:
    metrics: dict[str, float]
    """Reduced loss metrics plus lr and step_time_s; grad_norm when the optimizer stepped."""
    updated: bool
    """False when the step was skipped: non-finite loss or gradients, or (fp16) an overflow
    megatron's loss scaler caught."""
    nonfinite: str | None = None
    """The first non-finite quantity of a skipped step (e.g. "loss", "the gradient of
    decoder.layers.0.mlp.linear_fc1.weight"), None when everything was finite."""
    outputs: list[dict[str, Any]] = field(default_factory=list)
    """What the loss function returned for each micro-batch, in order (last pipeline stage;
    empty elsewhere): per-token outputs a caller asked for besides the metrics."""


def train_step(model: list[torch.nn.Module], optimizer: MegatronOptimizer,
               scheduler: OptimizerParamScheduler, microbatches: list[Batch],
               forward_step: ForwardStep, metric_keys: list[str],
               ctx: ParallelContext) -> StepResult:
    """Run one optimizer step on this rank's micro-batches (collective over all ranks).

    Args:
        metric_keys: keys of the loss function's metrics, each a [sum, count] tensor; the
            first is the loss (checked for finiteness with the gradients).
    """
    start = time.perf_counter()
    for chunk in model:
        chunk.zero_grad_buffer()  # type: ignore[operator]
    optimizer.zero_grad()
    per_microbatch = forward_backward(model, microbatches, forward_step, ctx)
    metrics = reduce_step_metrics(per_microbatch, metric_keys, ctx)
    # the update depends on the loss and the gradients only; other metrics are diagnostics
    nonfinite = None if math.isfinite(metrics[metric_keys[0]]) else metric_keys[0]
    scaled = loss_scaler_checks_gradients(optimizer)
    if nonfinite is None and not scaled:
        nonfinite = agree_on_first(first_nonfinite_gradient(model), ctx)  # type: ignore[arg-type]
    updated = False
    if nonfinite is None:
        updated, grad_norm, _ = optimizer.step()
        if updated:
            scheduler.step(increment=1)
            metrics["grad_norm"] = float(grad_norm)
        elif scaled:  # fp16: the scaler found an overflow, skipped and lowered the scale
            metrics["loss_scale_skipped"] = 1.0
    if scaled:
        metrics["loss_scale"] = float(optimizer.get_loss_scale())
    metrics["lr"] = float(optimizer.param_groups[0]["lr"])
    metrics["step_time_s"] = time.perf_counter() - start
    return StepResult(metrics=metrics, updated=bool(updated), nonfinite=nonfinite,
                      outputs=per_microbatch)


class NonFiniteGuard:
    """Counts consecutive non-finite steps; raises after `limit` in a row."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.total = 0

    def observe(self, step: int, result: StepResult) -> dict[str, float]:
        """Record one step's outcome; the metrics to log about it.

        Raises:
            FloatingPointError: on the `limit`-th non-finite step in a row, naming the step
                and the quantity (no update was made from any of them).
        """
        if result.nonfinite is None:
            self.in_a_row = 0
            return {}
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            raise FloatingPointError(
                f"step {step}: {result.nonfinite} is not finite ({self.in_a_row} skipped steps "
                f"in a row, train.max_consecutive_nonfinite={self.limit}); none of them "
                "updated the model, and no checkpoint holds non-finite weights")
        return {"nonfinite_skipped": 1.0, "nonfinite_skipped_total": float(self.total)}


@torch.no_grad()
def eval_step(model: list[torch.nn.Module], microbatches: Sequence[Batch],
              forward_step: ForwardStep, metric_keys: list[str],
              ctx: ParallelContext) -> dict[str, float]:
    """Forward only over `microbatches`; the reduced metrics (collective)."""
    for chunk in model:
        chunk.eval()
    per_microbatch = forward_backward(model, microbatches, forward_step, ctx, forward_only=True)
    for chunk in model:
        chunk.train()
    return reduce_step_metrics(per_microbatch, metric_keys, ctx)
