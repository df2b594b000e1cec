"""Wrap model chunks for training and build megatron-core's optimizer and LR scheduler.

Layer L2. megatron-core's DistributedDataParallel keeps gradients in contiguous buffers and
reduces them over data-parallel ranks; its optimizer (fp32 master weights for bf16, and the
distributed optimizer: ZeRO-1 sharding of optimizer states over data-parallel ranks) and its
OptimizerParamScheduler do the rest. Apex and Transformer Engine are optional: without them
megatron-core falls back to torch.optim.AdamW and local multi-tensor helpers.

Two helpers read megatron's DDP state for the trainer: `gather_updated_params` completes the
distributed optimizer's parameter all-gather that `overlap_param_gather` defers to the next
forward (anything that reads the weights without a forward, i.e. the weight sync, the
reference copy and checkpoints, would otherwise see stale shards), and
`first_nonfinite_gradient` checks the gradient buffers before an update.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.grad_scaler import DynamicGradScaler
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron_r1.config.schema import ModelConfig, OptimConfig, ParallelConfig
from megatron_r1.parallel.init import ParallelContext


def wrap_for_training(chunks: list[GPTModel], model: ModelConfig, parallel: ParallelConfig,
                      ctx: ParallelContext) -> list[DistributedDataParallel]:
    """Float16Module for bf16/fp16 (casts inputs, keeps outputs fp32), then megatron DDP."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        use_distributed_optimizer=parallel.distributed_optimizer,
        # Each chunk's buckets are reduced as one; small models gain nothing from bucketing.
        bucket_size=None,
    )
    wrapped = []
    for chunk in chunks:
        module = Float16Module(chunk.config, chunk) if model.params_dtype != "fp32" else chunk
        ddp = DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=module,
                                      pg_collection=ctx.pg_collection)
        wrapped.append(ddp)
    # The schedules call these between the last backward and the optimizer step: gradient
    # reduction (DP), layer-norm/sequence-parallel and embedding all-reduces, expert-bias
    # updates, and division by the step's total loss-token count.
    for ddp in wrapped:
        ddp.config.finalize_model_grads_func = finalize_model_grads
        ddp.config.no_sync_func = [d.no_sync for d in wrapped] if len(wrapped) > 1 \
            else wrapped[0].no_sync
        ddp.config.grad_sync_func = None
    return wrapped


def build_optimizer(wrapped: list[DistributedDataParallel], optim: OptimConfig,
                    model: ModelConfig, parallel: ParallelConfig, train_steps: int,
                    ctx: ParallelContext) -> tuple[MegatronOptimizer, OptimizerParamScheduler]:
    """megatron's (distributed) optimizer over all chunks, and its LR/WD scheduler.

    The scheduler counts optimizer steps (not samples): one `step(increment=1)` per step.
    """
    config = OptimizerConfig(
        optimizer=optim.optimizer,
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=model.params_dtype == "bf16",
        fp16=model.params_dtype == "fp16",
        initial_loss_scale=optim.initial_loss_scale,
        params_dtype=wrapped[0].config.params_dtype,
        use_distributed_optimizer=parallel.distributed_optimizer,
        overlap_param_gather_with_optimizer_step=False,
    )
    optimizer = get_megatron_optimizer(
        config, wrapped, use_gloo_process_groups=ctx.device.type == "cuda",
        pg_collection=ctx.pg_collection)
    # The schedules multiply each micro-batch's loss by this before backward (fp16: the
    # dynamic loss scale the optimizer divides out again; 1 for bf16 and fp32). Without it
    # fp16 gradients come out divided by the scale (2^32 at start): no training at all.
    for chunk in wrapped:
        chunk.config.grad_scale_func = optimizer.scale_loss
    decay_steps = optim.lr_decay_steps or train_steps
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.lr_warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.lr_warmup_steps,
        lr_decay_steps=max(decay_steps, optim.lr_warmup_steps + 1),
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(decay_steps, 1),
        wd_incr_style="constant",
        # The checkpoint's schedule wins on resume; a config change to the schedule needs
        # checkpoint.load_optimizer=false.
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
    return optimizer, scheduler


def gather_updated_params(model: list[DistributedDataParallel]) -> None:
    """Finish every parameter all-gather the distributed optimizer has pending (with
    parallel.overlap_param_gather it waits for the next forward). Collective over the
    data-parallel ranks; a no-op without overlap."""
    for chunk in model:
        if chunk.ddp_config.use_distributed_optimizer and chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def _plain(name: str) -> str:
    """A parameter name without the wrappers' `module.` prefixes (DDP, Float16Module)."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def _buffers(chunk: DistributedDataParallel) -> list[Any]:
    return [*chunk.buffers, *chunk.expert_parallel_buffers]


def first_nonfinite_gradient(model: list[DistributedDataParallel]) -> str | None:
    """The name of the first parameter of this rank whose gradient holds a NaN or an inf, or
    None. Local (the caller reduces over ranks). A float64 sum of each gradient buffer is
    finite exactly when every element is (no fp32 value can overflow it), so the common
    case costs one read of the buffers."""
    for chunk in model:
        if all(torch.isfinite(b.grad_data.sum(dtype=torch.float64)) for b in _buffers(chunk)):
            continue
        for name, param in chunk.module.named_parameters():
            grad = getattr(param, "main_grad", None)
            if grad is not None and not torch.isfinite(grad.sum(dtype=torch.float64)):
                return f"the gradient of {_plain(name)}"
        return "a gradient buffer"  # a non-finite value outside any parameter's view
    return None


def first_nonfinite_weight(chunks: list[torch.nn.Module]) -> str | None:
    """The name of the first parameter of this rank holding a NaN or an inf, or None."""
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if not torch.isfinite(param.detach().sum(dtype=torch.float64)):
                return _plain(name)
    return None


def agree_on_first(local: str | None, ctx: ParallelContext) -> str | None:
    """The lowest rank's non-None answer, known on every rank (collective; the common case,
    None everywhere, costs one small all-reduce)."""
    flag = torch.tensor([0 if local is None else 1], dtype=torch.int32, device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not int(flag):
        return None
    answers: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(answers, local)
    return next(a for a in answers if a is not None)


def loss_scaler_checks_gradients(optimizer: MegatronOptimizer) -> bool:
    """Whether megatron's dynamic loss scaler (fp16) checks the gradients itself: it skips
    overflowing steps and lowers the scale, which is part of normal fp16 training."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(getattr(p, "grad_scaler", None), DynamicGradScaler) for p in parts)
