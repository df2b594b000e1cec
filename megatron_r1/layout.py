"""Parallel layout arithmetic: which degrees fit a world size and a model. Pure and cheap.

Layer L0. Megatron splits the world twice: the dense part as TP x CP x DP x PP and the MoE
part as ETP x EP x EDP x PP (the same pipeline stages). `resolve_layout` checks every
divisibility rule megatron-core would otherwise trip over deep inside process-group creation,
and names the config keys involved, so a bad layout fails before any process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_r1.config.schema import ModelConfig, ParallelConfig, TrainConfig


@dataclass(frozen=True, slots=True)
class Layout:
    """Resolved parallel degrees of one run."""

    world_size: int
    tensor: int
    pipeline: int
    context: int
    expert: int
    expert_tensor: int
    data: int
    """Data-parallel degree of the dense part: world / (TP x CP x PP)."""
    expert_data: int
    """Data-parallel degree of the experts: world / (ETP x EP x PP)."""
    virtual_pipeline: int | None
    sequence_parallel: bool
    num_microbatches: int
    """Micro-batches per optimizer step on each data-parallel rank."""


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Embedding rows after Megatron's padding: a multiple of divisible_by x TP."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def resolve_layout(parallel: ParallelConfig, model: ModelConfig, train: TrainConfig,
                   world_size: int, seq_length: int) -> Layout:
    """Check the parallel degrees against the world size and the model; return the layout.

    Raises:
        ValueError: naming the config keys and values of the first rule that fails.
    """
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    tp, pp, cp, ep = parallel.tensor, parallel.pipeline, parallel.context, parallel.expert
    etp = parallel.expert_tensor if parallel.expert_tensor is not None else tp

    dense = tp * pp * cp
    if world_size % dense:
        raise ValueError(
            f"parallel.tensor={tp} x parallel.pipeline={pp} x parallel.context={cp} = {dense} "
            f"does not divide the world size {world_size}")
    expert_split = etp * ep * pp
    if world_size % expert_split:
        raise ValueError(
            f"parallel.expert_tensor={etp} x parallel.expert={ep} x parallel.pipeline={pp} = "
            f"{expert_split} does not divide the world size {world_size}")
    dp = world_size // dense

    if ep > 1 and not model.is_moe:
        raise ValueError(f"parallel.expert={ep}: the model has no experts (model.num_experts=0)")
    if model.is_moe and model.num_experts % ep:
        raise ValueError(f"parallel.expert={ep} does not divide model.num_experts="
                         f"{model.num_experts}")

    chunks = pp * (parallel.virtual_pipeline or 1)
    if parallel.virtual_pipeline is not None and pp == 1:
        raise ValueError(f"parallel.virtual_pipeline={parallel.virtual_pipeline} needs "
                         "parallel.pipeline > 1")
    if model.num_layers % chunks:
        raise ValueError(
            f"model.num_layers={model.num_layers} is not divisible by parallel.pipeline={pp}"
            + (f" x parallel.virtual_pipeline={parallel.virtual_pipeline}"
               if parallel.virtual_pipeline else ""))

    for key, value in (("num_attention_heads", model.num_attention_heads),
                       ("num_query_groups", model.num_query_groups),
                       ("ffn_hidden_size", model.ffn_hidden_size)):
        if value is not None and value % tp:
            raise ValueError(f"parallel.tensor={tp} does not divide model.{key}={value}")
    if model.is_moe and model.moe_ffn_hidden_size is not None and model.moe_ffn_hidden_size % etp:
        raise ValueError(f"parallel.expert_tensor={etp} does not divide "
                         f"model.moe_ffn_hidden_size={model.moe_ffn_hidden_size}")
    if model.moe_shared_expert_size % tp:
        raise ValueError(f"parallel.tensor={tp} does not divide "
                         f"model.moe_shared_expert_size={model.moe_shared_expert_size}")

    sequence_parallel = parallel.sequence_parallel
    if sequence_parallel is None:
        sequence_parallel = tp > 1
    if tp == 1:
        sequence_parallel = False  # nothing to shard; megatron turns it off too
    if model.is_moe and tp > 1 and not sequence_parallel:
        raise ValueError("parallel.sequence_parallel=false: megatron-core requires sequence "
                         f"parallelism for MoE models with parallel.tensor={tp} > 1")
    if sequence_parallel and seq_length % tp:
        raise ValueError(f"data.seq_length={seq_length} must be divisible by parallel.tensor={tp} "
                         "with sequence parallelism")
    if cp > 1 and seq_length % (2 * cp):
        raise ValueError(f"data.seq_length={seq_length} must be divisible by 2 x parallel.context="
                         f"{2 * cp}")

    per_step = train.micro_batch_size * dp
    if train.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by "
            f"train.micro_batch_size={train.micro_batch_size} x data-parallel size {dp}")
    return Layout(world_size=world_size, tensor=tp, pipeline=pp, context=cp, expert=ep,
                  expert_tensor=etp, data=dp, expert_data=world_size // expert_split,
                  virtual_pipeline=parallel.virtual_pipeline,
                  sequence_parallel=sequence_parallel,
                  num_microbatches=train.global_batch_size // per_step)
