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
    first_stage_layers: int | None
    """Layers of the first pipeline stage when set (uneven split), else None."""
    last_stage_layers: int | None
    sequence_parallel: bool
    num_microbatches: int
    """Micro-batches per optimizer step on each data-parallel rank (with train.micro_batch_size
    rows each; a token budget decides its own count per step)."""
    uniform_microbatch_shapes: bool = False
    """Every micro-batch of a step must have one shape [rows, length] on every rank: megatron's
    allgather token dispatcher gathers equal-sized token blocks over the expert-parallel ranks
    (different data-parallel ranks), and it refuses variable shapes between pipeline stages.
    Otherwise each micro-batch takes its own length (pipelines then exchange shapes first:
    megatron's variable_seq_lengths)."""

    @property
    def sequence_multiple(self) -> int:
        """Sequence lengths must be multiples of this (sequence parallelism splits them)."""
        return self.tensor if self.sequence_parallel else 1


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
    if cp > 1:
        # Megatron-core's CP attention exists only in Transformer Engine, and the caller must
        # hand each CP rank its load-balanced sequence chunks and gather per-token results
        # back: the SFT and GRPO data paths do not do that yet, and no CPU test could prove it.
        raise ValueError(f"parallel.context={cp}: context parallelism is not supported yet "
                         "(sequences are not split over CP ranks); use parallel.context=1")

    if ep > 1 and not model.is_moe:
        raise ValueError(f"parallel.expert={ep}: the model has no experts (model.num_experts=0)")
    if model.is_moe and model.num_experts % ep:
        raise ValueError(f"parallel.expert={ep} does not divide model.num_experts="
                         f"{model.num_experts}")

    if parallel.virtual_pipeline is not None and pp == 1:
        raise ValueError(f"parallel.virtual_pipeline={parallel.virtual_pipeline} needs "
                         "parallel.pipeline > 1")
    pipeline_stage_layers(model.num_layers, pp, parallel.virtual_pipeline,
                          parallel.first_stage_layers, parallel.last_stage_layers)

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

    per_step = train.micro_batch_size * dp
    if train.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by "
            f"train.micro_batch_size={train.micro_batch_size} x data-parallel size {dp}")
    uniform = (model.is_moe and parallel.moe_token_dispatcher == "allgather"
               and (ep > 1 or pp > 1))
    if uniform and (train.max_tokens_per_microbatch or train.pack_sequences):
        knob = ("train.max_tokens_per_microbatch" if train.max_tokens_per_microbatch
                else "train.pack_sequences")
        raise ValueError(
            f"{knob} gives micro-batches of different shapes, which "
            f"parallel.moe_token_dispatcher=allgather cannot take with parallel.expert={ep} / "
            f"parallel.pipeline={pp}: use parallel.moe_token_dispatcher=alltoall")
    return Layout(world_size=world_size, tensor=tp, pipeline=pp, context=cp, expert=ep,
                  expert_tensor=etp, data=dp, expert_data=world_size // expert_split,
                  virtual_pipeline=parallel.virtual_pipeline,
                  first_stage_layers=parallel.first_stage_layers,
                  last_stage_layers=parallel.last_stage_layers,
                  sequence_parallel=sequence_parallel,
                  num_microbatches=train.global_batch_size // per_step,
                  uniform_microbatch_shapes=uniform)


def pipeline_stage_layers(num_layers: int, pipeline: int, virtual_pipeline: int | None = None,
                          first: int | None = None, last: int | None = None) -> list[int]:
    """Transformer layers of each pipeline stage, as megatron-core splits them: evenly, or
    with the first and/or last stage set apart and the middle stages sharing the rest evenly
    (DeepSeek-V3's 61 layers split no other way over PP > 1). With virtual pipelining each
    stage's share must divide into its model chunks.

    Raises:
        ValueError: naming the config keys and values of the first rule that fails.
    """
    vp = virtual_pipeline or 1
    vp_text = f" x parallel.virtual_pipeline={virtual_pipeline}" if virtual_pipeline else ""
    if first is None and last is None:
        if num_layers % (pipeline * vp):
            raise ValueError(f"model.num_layers={num_layers} is not divisible by "
                             f"parallel.pipeline={pipeline}{vp_text} (for an uneven split set "
                             "parallel.first_stage_layers and/or parallel.last_stage_layers)")
        return [num_layers // pipeline] * pipeline
    ends = {"first_stage_layers": first, "last_stage_layers": last}
    given = {k: v for k, v in ends.items() if v is not None}
    if pipeline < 2:
        key, value = next(iter(given.items()))
        raise ValueError(f"parallel.{key}={value} needs parallel.pipeline > 1")
    for key, value in given.items():
        if value % vp:
            raise ValueError(f"parallel.{key}={value} is not divisible by "
                             f"parallel.virtual_pipeline={virtual_pipeline}")
    middle_stages = pipeline - len(given)
    middle_layers = num_layers - sum(given.values())
    spec = ", ".join(f"parallel.{k}={v}" for k, v in given.items())
    if middle_layers < 0 or bool(middle_layers) != bool(middle_stages):
        raise ValueError(f"{spec} leaves {middle_layers} of model.num_layers={num_layers} for "
                         f"{middle_stages} middle stages of parallel.pipeline={pipeline}")
    if middle_stages and middle_layers % (middle_stages * vp):
        raise ValueError(f"{spec} leaves {middle_layers} of model.num_layers={num_layers}, not "
                         f"divisible by the {middle_stages} middle stages{vp_text}")
    per = middle_layers // middle_stages if middle_stages else 0
    return [first if i == 0 and first is not None else
            last if i == pipeline - 1 and last is not None else per for i in range(pipeline)]
