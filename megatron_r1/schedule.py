"""Run forward and backward over a step's micro-batches with megatron-core's schedules.

Layer L2. `get_forward_backward_func()` picks the schedule for the layout: no pipelining,
1F1B, or interleaved 1F1B with virtual stages. Callers supply a `forward_step(batch, model)`
that returns the model output and a loss function, megatron's contract; the loss function
returns (loss_sum, num_loss_tokens, metrics) so that the step's denominator is the total
token count over all micro-batches and data-parallel ranks (calculate_per_token_loss).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.utils import get_model_config

from megatron_r1.parallel.init import ParallelContext

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]
ForwardStep = Callable[[Batch, torch.nn.Module], tuple[torch.Tensor, LossFn]]


def forward_backward(model: list[torch.nn.Module], microbatches: list[Batch],
                     forward_step: ForwardStep, ctx: ParallelContext, *, seq_length: int,
                     forward_only: bool = False) -> list[dict[str, torch.Tensor]]:
    """Forward (and backward unless forward_only) over `microbatches` on every chunk.

    Args:
        model: this rank's (DDP-wrapped) model chunks.
        microbatches: this rank's micro-batches of the step, each with tensors [b, s].
        forward_step: `(batch, model) -> (output, loss_fn)`.
        seq_length: tokens per sequence (the pipeline's activation shape).

    Returns:
        The metrics dicts of every micro-batch (non-empty on the last pipeline stage only).
    """
    def step_func(data_iterator: Iterator[Batch], module: torch.nn.Module) -> Any:
        return forward_step(next(data_iterator), module)

    # One iterator per model chunk: each virtual stage consumes every micro-batch once.
    iterators: Any = [iter(microbatches) for _ in model]
    extra: dict[str, Any] = {}
    if ctx.layout.pipeline > 1:
        # With explicit process groups the pipeline schedules also want the p2p communicator.
        extra["p2p_communicator"] = P2PCommunicator(pp_group=ctx.pp_group,
                                                    config=get_model_config(model[0]))
    return get_forward_backward_func()(  # type: ignore[no-any-return]
        forward_step_func=step_func,
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=microbatches[0]["tokens"].shape[0],
        forward_only=forward_only,
        pg_collection=ctx.pg_collection,
        **extra,
    )


def reduce_step_metrics(per_microbatch: list[dict[str, torch.Tensor]], keys: list[str],
                        ctx: ParallelContext) -> dict[str, float]:
    """Sum each metric over micro-batches and data-parallel ranks; make the result known on
    every rank (the last pipeline stage computes it, rank 0 logs it).

    Each metric tensor holds [value_sum, count]; the result is value_sum / count.
    """
    totals = torch.zeros(len(keys), 2, dtype=torch.float64)
    for metrics in per_microbatch:
        for i, key in enumerate(keys):
            totals[i] += metrics[key].detach().to(torch.float64).cpu()
    totals = totals.to(ctx.device)
    if ctx.is_last_stage:
        dist.all_reduce(totals, group=ctx.dp_cp_group)
    if ctx.layout.pipeline > 1:
        last = dist.get_global_rank(ctx.pp_group, ctx.layout.pipeline - 1)
        dist.broadcast(totals, src=last, group=ctx.pp_group)
    totals = totals.cpu()
    return {key: float(totals[i, 0] / totals[i, 1].clamp(min=1)) for i, key in enumerate(keys)}
