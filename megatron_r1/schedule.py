"""Run forward and backward over a step's micro-batches with megatron-core's schedules.

Layer L2. `get_forward_backward_func()` picks the schedule for the layout: no pipelining,
1F1B, or interleaved 1F1B with virtual stages. Callers supply a `forward_step(batch, model)`
that returns the model output and a loss function, megatron's contract; the loss function
returns (loss_sum, num_loss_tokens, metrics) so that the step's denominator is the total
token count over all micro-batches and data-parallel ranks (calculate_per_token_loss).

This is the one door to the model: every micro-batch is built on the host and moved to the
rank's device here, just before its forward step (`to_device`), so no caller can leave a
batch behind; a packed micro-batch's `cu_seqlens` becomes megatron's PackedSeqParams here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.utils import get_model_config

from megatron_r1.parallel.init import ParallelContext

Batch = dict[str, Any]
LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]
ForwardStep = Callable[[Batch, torch.nn.Module], tuple[torch.Tensor, LossFn]]


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The micro-batch's tensors on `device`; with `cu_seqlens` (packed) also
    `packed_seq_params`, megatron's description of the `thd` layout, on the same device."""
    moved: Batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                    for k, v in batch.items()}
    if "cu_seqlens" in batch:
        longest = int(batch["max_seqlen"])
        moved["packed_seq_params"] = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=moved["cu_seqlens"],
            cu_seqlens_kv=moved["cu_seqlens"], max_seqlen_q=longest, max_seqlen_kv=longest)
    return moved


def forward_backward(model: list[torch.nn.Module], microbatches: Sequence[Batch],
                     forward_step: ForwardStep, ctx: ParallelContext, *,
                     forward_only: bool = False) -> list[dict[str, torch.Tensor]]:
    """Forward (and backward unless forward_only) over `microbatches` on every chunk.

    Args:
        model: this rank's (DDP-wrapped) model chunks.
        microbatches: this rank's micro-batches of the step, host tensors [b, s] (shapes may
            differ between micro-batches unless the layout needs them uniform); each is moved
            to ctx.device just before its forward step.
        forward_step: `(batch on ctx.device, model) -> (output, loss_fn)`.

    Returns:
        The metrics dicts of every micro-batch, in order (non-empty on the last pipeline
        stage only).
    """
    def step_func(data_iterator: Iterator[Batch], module: torch.nn.Module) -> Any:
        return forward_step(to_device(next(data_iterator), ctx.device), module)

    # One iterator per model chunk: each virtual stage consumes every micro-batch once.
    iterators: Any = [iter(microbatches) for _ in model]
    extra: dict[str, Any] = {}
    if ctx.layout.pipeline > 1:
        # With explicit process groups the pipeline schedules also want the p2p communicator.
        extra["p2p_communicator"] = P2PCommunicator(pp_group=ctx.pp_group,
                                                    config=get_model_config(model[0]))
    # megatron sizes the pipeline's receive buffers from (seq_length, micro_batch_size) unless
    # stages exchange shapes first (variable_seq_lengths); where they do not, every
    # micro-batch of the call has this one shape (Layout.uniform_microbatch_shapes).
    rows, length = microbatches[0]["tokens"].shape
    return get_forward_backward_func()(  # type: ignore[no-any-return]
        forward_step_func=step_func,
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(microbatches),
        seq_length=length,
        micro_batch_size=rows,
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
