"""Bytes on each GPU in each phase of a colocated GRPO run, for one candidate layout.

Layer L0 (pure). Parameter counts come in measured (megatron_r1.plan.params); this module
turns them into bytes per pipeline stage (every rank of a stage holds the same: TP shards
and EP ranks are equal by construction) for the phases a colocated run goes through. What
leaves the GPU is exactly what the config switches on, and nothing the trainer does not build
(tests/test_plan.py ties each assumption to its field):

- startup: the engines start (grpo_trainer.open_stage) after what the config offloads has left
  the GPU, beside the policy's weights and whatever is not offloaded; vLLM refuses to start
  unless gpu_memory_utilization x the GPU is free then (vllm/v1/worker/utils.py, around line
  761), and takes that much. No forward has run yet: no FP8 weight cache.
- train: policy weights, Transformer Engine's FP8 weight cache (model.fp8: an FP8 copy of
  every linear weight, kept across micro-batches and steps), fp32 gradient buffers (megatron
  DDP with grad_reduce_in_fp32), optimizer states (fp32 master weights for 16-bit models +
  Adam moments), sharded over the data-parallel ranks (dense part: DP x CP; routed experts:
  expert-DP) by the distributed optimizer; activations of the in-flight micro-batches; the
  reference model's weights unless grpo.offload_reference keeps them on the host; the
  rollout engine sleeps (rollout.sleep_level: its weights on the host, or dropped).
- logprob: old/reference log-probs without gradients: weights, FP8 cache, the reference copy,
  one micro-batch's forward, plus gradients and optimizer states unless
  rollout.offload_train_state moved them off the GPU after the previous rollout's last step.
- reward (reward.models, R1 stage 4): the engine asleep, each reward model on the GPU in turn
  for its forward (reward_serving.py), beside what the logprob phase keeps besides the
  reference model's pass.
- rollout: the engine is awake and takes `gpu_memory_utilization` of the GPU for its weights
  (at the inference TP, in the dtype the engine loads: the policy's, since the export writes no
  quantized weights), its KV cache and workspace; the trainer keeps its weights and FP8 cache,
  plus gradients and optimizer states unless rollout.offload_train_state, plus the reference
  model unless grpo.offload_reference.

Host memory: every offload buffer is allocated once (pinned) and held for the whole run
(offload.StorageOffload), so the host holds their sum, not the largest: the optimizer states
(gradient buffers are freed, not copied: they are zeroed before the next step anyway), the
reference model, every reward model, and the sleeping engine's weights at sleep_level 1.
A fixed reserve per GPU covers the CUDA context, NCCL communicators and allocator slack.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

from megatron_r1.config.schema import Config, ModelConfig
from megatron_r1.layout import padded_vocab_size, pipeline_stage_layers
from megatron_r1.plan.activations import (
    AttentionImpl,
    MicroBatchShape,
    Recompute,
    in_flight_microbatches,
    kept_layer_bytes,
    layer_bytes,
    loss_bytes,
)
from megatron_r1.plan.counts import PartCount, ShardCounts
from megatron_r1.rollout.placement import Placement, ranks_per_engine, resolve_placement

WeightsDtype = Literal["fp8", "bf16", "fp32"]
CountsFn = Callable[[ModelConfig, int, int, int], ShardCounts]
"""(model, TP, EP, ETP) -> measured per-rank counts (megatron_r1.plan.params.shard_counts)."""

GRAD_BYTES = 4  # megatron DDP main_grad buffers are fp32 (grad_reduce_in_fp32=True)
# Links of an H800 node per GPU and direction, for the weight-sync estimate (sources in
# megatron_r1.plan.sync): NVLink as DeepSeek-V3's report measures it, one 400 Gb/s NIC.
NVLINK_BYTES_PER_S = 160e9
INFINIBAND_BYTES_PER_S = 50e9


@dataclass(frozen=True, slots=True)
class Candidate:
    """One way to lay the trainer and the rollout engines out on the GPUs."""

    tensor: int
    pipeline: int
    context: int
    expert: int
    expert_tensor: int
    recompute: Recompute
    rollout_tensor: int
    virtual_pipeline: int | None = None
    first_stage_layers: int | None = None
    """Layers of the first pipeline stage when the split is uneven
    (parallel.first_stage_layers); None: even split."""
    last_stage_layers: int | None = None

    @property
    def uneven(self) -> bool:
        return self.first_stage_layers is not None or self.last_stage_layers is not None

    def describe(self) -> str:
        text = (f"TP={self.tensor} PP={self.pipeline} CP={self.context} EP={self.expert} "
                f"ETP={self.expert_tensor}")
        if self.virtual_pipeline:
            text += f" VP={self.virtual_pipeline}"
        if self.uneven:
            text += f" (stages {self.first_stage_layers}/../{self.last_stage_layers} layers)"
        return text + f" recompute={self.recompute} rollout-TP={self.rollout_tensor}"


@dataclass(frozen=True, slots=True)
class PlanOptions:
    """What the planner assumes about the cluster and the run beyond the config."""

    gpus: int
    gpu_memory: float
    """Bytes per GPU."""
    gpus_per_node: int = 8
    host_memory: float = 1.0e12
    """Bytes of host memory per node (offloaded optimizer states, sleeping engine)."""
    reserve: float = 6.0e9
    """Bytes per GPU kept free for the CUDA context, NCCL buffers and allocator slack."""
    moe_imbalance: float = 1.25
    """Tokens reaching the busiest expert-parallel rank relative to a perfect balance."""
    attention: AttentionImpl = "flash"
    rollout_concurrency: int = 1
    """Sequences of full length each engine must hold in its KV cache at once (1 is vLLM's
    start-up check: room for one sequence of max_model_len)."""
    rollout_weights: WeightsDtype = "bf16"
    kv_cache_bytes: int = 2
    rollout_overhead: float = 3.0e9
    """Bytes per GPU of an awake engine beyond weights and KV (CUDA graphs, workspace)."""
    nvlink_bandwidth: float = NVLINK_BYTES_PER_S
    """Bytes/s one GPU receives over NVLink from its node (weight sync)."""
    infiniband_bandwidth: float = INFINIBAND_BYTES_PER_S
    """Bytes/s one GPU receives over InfiniBand from other nodes (weight sync)."""
    reward_architectures: tuple[tuple[str, ModelConfig], ...] = ()
    """(reward.models name, architecture) of reward models whose checkpoint records one
    (megatron_r1.plan.command reads them); any other reward model is priced as the policy's
    architecture (R1's reward models are the policy's backbone)."""


@dataclass(frozen=True, slots=True)
class StageMemory:
    """Bytes on one GPU of a pipeline stage (every TP/CP/EP/DP rank of it is alike)."""

    stage: int
    layers: range
    params: PartCount
    weights: float
    fp8_weight_cache: float
    grads: float
    optimizer: float
    activations: float
    reference: float
    train: float
    logprob: float
    rollout: float
    rollout_residual: float
    """What the trainer keeps on the GPU while the engine is awake (weights, FP8 cache,
    reserve, and whatever the config does not offload)."""
    host: float
    """Host bytes this GPU's offloaded state takes (every buffer held for the whole run)."""
    startup: float = 0.0
    """The engine starting: what the trainer keeps then plus gpu_memory_utilization x GPU."""
    startup_residual: float = 0.0
    """What the trainer keeps on the GPU when the engine starts (weights, reserve, what the
    config does not offload; no FP8 cache yet)."""
    reward_models: float = 0.0
    """Weights of every reward model of this stage (host memory between uses)."""
    reward: float = 0.0
    """Scoring with the reward models (0 without reward.models)."""

    @property
    def peak(self) -> float:
        return max(self.train, self.logprob, self.rollout, self.startup, self.reward)


@dataclass(frozen=True, slots=True)
class RolloutMemory:
    """The colocated inference engine, per GPU."""

    tensor: int
    engines: int
    weights: float
    kv_per_token: float
    seq_length: int
    concurrency: int
    kv_needed: float
    kv_budget: float
    """Bytes left for the KV cache inside gpu_memory_utilization."""
    outputs_per_engine: int

    @property
    def full_length_capacity(self) -> int:
        """Sequences of full length the KV budget holds at once."""
        per_seq = self.kv_per_token * self.seq_length
        return max(0, int(self.kv_budget // per_seq)) if per_seq else 0


@dataclass(frozen=True, slots=True)
class Plan:
    candidate: Candidate
    data: int
    expert_data: int
    num_microbatches: int
    micro_batch_size: int
    seq_length: int
    stages: list[StageMemory]
    rollout: RolloutMemory
    options: PlanOptions
    offloaded: tuple[str, ...] = ()
    """What the config moves off the GPU between phases (the plan counts nothing else)."""
    problems: list[str] = field(default_factory=list)
    """Why it does not fit (empty: it fits)."""

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def peak(self) -> float:
        return max(s.peak for s in self.stages)

    @property
    def headroom(self) -> float:
        return self.options.gpu_memory - self.peak


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def stage_layers(num_layers: int, c: Candidate) -> list[range]:
    """Global layer indices of each pipeline stage (megatron's split, even or first/last)."""
    sizes = pipeline_stage_layers(num_layers, c.pipeline, c.virtual_pipeline,
                                  c.first_stage_layers, c.last_stage_layers)
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    return [range(bounds[i], bounds[i + 1]) for i in range(c.pipeline)]


def _stage_activations(model: ModelConfig, counts: ShardCounts, layers: range,
                       shape: MicroBatchShape, c: Candidate, stage: int, microbatches: int,
                       vocab: int) -> tuple[float, float]:
    """(training activations at the stage's peak, one micro-batch's forward working set)."""
    kinds = [counts.layer_kinds[i] == "moe" for i in layers]
    kept = sum(kept_layer_bytes(model, shape, moe, c.recompute) for moe in kinds)
    in_flight = in_flight_microbatches(c.pipeline, stage, microbatches, c.virtual_pipeline)
    # The backward of one layer holds that layer's whole set (recomputed under `full`).
    working = max((layer_bytes(model, shape, moe, "none") for moe in set(kinds)), default=0.0)
    last = stage == c.pipeline - 1
    loss = loss_bytes(model, shape, vocab) if last else 0.0
    return in_flight * kept + working + loss, working + loss


def plan_layout(cfg: Config, c: Candidate, options: PlanOptions, counts_fn: CountsFn) -> Plan:
    """Bytes per GPU of every pipeline stage and of the rollout engine, and whether it fits.

    Raises:
        ValueError: the candidate does not divide the GPUs or the model (names the degrees).
    """
    model, world = cfg.model, options.gpus
    dense_split = c.tensor * c.pipeline * c.context
    expert_split = c.expert_tensor * c.expert * c.pipeline
    if world % dense_split or world % expert_split:
        raise ValueError(f"{c.describe()}: TPxPPxCP={dense_split} and ETPxEPxPP={expert_split} "
                         f"must divide --gpus={world}")
    dp, edp = world // dense_split, world // expert_split
    per_step = cfg.train.micro_batch_size * dp
    if cfg.train.global_batch_size % per_step:
        raise ValueError(f"{c.describe()}: train.global_batch_size={cfg.train.global_batch_size} "
                         f"is not a multiple of micro_batch_size x DP = {per_step}")
    microbatches = cfg.train.global_batch_size // per_step
    counts = counts_fn(model, c.tensor, c.expert, c.expert_tensor)
    vocab = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, c.tensor)
    w_bytes = _dtype_bytes(model.params_dtype)
    opt_bytes = (8 if cfg.optim.optimizer == "adam" else 4) + (4 if w_bytes == 2 else 0)
    shard_dense = dp * c.context if cfg.parallel.distributed_optimizer else 1
    shard_expert = edp if cfg.parallel.distributed_optimizer else 1
    # The largest micro-batch: micro_batch_size rows of full length, or with a token budget
    # as many full-length rows as the budget holds (packing never exceeds it either).
    budget = cfg.train.max_tokens_per_microbatch
    rows = cfg.train.micro_batch_size if budget is None else max(1, budget // cfg.data.seq_length)
    shape = MicroBatchShape(
        micro_batch_size=rows, seq_length=cfg.data.seq_length,
        tensor=c.tensor, context=c.context, expert_tensor=c.expert_tensor,
        sequence_parallel=c.tensor > 1, act_bytes=w_bytes, attention=options.attention,
        moe_imbalance=options.moe_imbalance)
    rollout = rollout_memory(cfg, c.rollout_tensor, options, counts_fn)
    uses_ref = cfg.grpo.kl_coef > 0
    offload_train = cfg.rollout.offload_train_state
    offload_ref = cfg.grpo.offload_reference
    problems: list[str] = []
    reward_stages = _reward_model_stages(cfg, c, options, counts_fn, shape, problems)
    # vLLM takes its whole gpu_memory_utilization share at start-up and when it wakes (the KV
    # cache fills the rest of it)
    engine_start = cfg.rollout.gpu_memory_utilization * options.gpu_memory
    engine = max(engine_start, rollout.weights + rollout.kv_needed + options.rollout_overhead)

    stages = []
    for stage, layers in enumerate(stage_layers(model.num_layers, c)):
        params = counts.stage(layers, first=stage == 0, last=stage == c.pipeline - 1)
        weights = params.total * w_bytes
        # Transformer Engine keeps an FP8 copy of every linear weight once a forward has run
        # (reused across micro-batches and steps): in every phase after the first forward
        fp8_cache = params.low_precision * 2.0 if model.fp8 != "none" else 0.0
        grads = params.total * GRAD_BYTES
        optimizer = opt_bytes * (params.dense / shard_dense + params.expert / shard_expert)
        train_act, forward_act = _stage_activations(model, counts, layers, shape, c, stage,
                                                    microbatches, vocab)
        reference = weights if uses_ref else 0.0
        ref_resident = 0.0 if offload_ref else reference  # outside its own log-prob pass
        train_resident = 0.0 if offload_train else grads + optimizer  # outside training
        train = weights + fp8_cache + grads + optimizer + train_act + ref_resident
        logprob = weights + fp8_cache + reference + forward_act + train_resident
        residual = weights + fp8_cache + ref_resident + train_resident + options.reserve
        startup_residual = weights + ref_resident + train_resident + options.reserve
        rm_weights = sum(w for w, _ in reward_stages[stage]) if reward_stages else 0.0
        reward = 0.0
        if reward_stages:  # one reward model on the GPU at a time, the engine asleep
            reward = weights + fp8_cache + ref_resident + train_resident + options.reserve + \
                max(w + act for w, act in reward_stages[stage])
        ref_host = reference if offload_ref else 0.0
        optimizer_host = optimizer if offload_train else 0.0
        engine_host = rollout.weights if cfg.rollout.sleep_level == 1 else 0.0
        # pinned buffers held for the whole run: their sum (offload.StorageOffload keeps its
        # host copies; vLLM holds the sleeping weights while the trainer holds the rest)
        host = optimizer_host + engine_host + ref_host + rm_weights
        stages.append(StageMemory(
            stage=stage, layers=layers, params=params, weights=weights,
            fp8_weight_cache=fp8_cache, grads=grads, optimizer=optimizer,
            activations=train_act, reference=reference, train=train + options.reserve,
            logprob=logprob + options.reserve, rollout=residual + engine,
            rollout_residual=residual, host=host, startup=startup_residual + engine_start,
            startup_residual=startup_residual, reward_models=rm_weights, reward=reward))
    plan = Plan(candidate=c, data=dp, expert_data=edp, num_microbatches=microbatches,
                micro_batch_size=rows, seq_length=cfg.data.seq_length,
                stages=stages, rollout=rollout, options=options,
                offloaded=tuple(name for name, on in (
                    ("optimizer states and gradients (rollout.offload_train_state)",
                     offload_train),
                    ("reference model (grpo.offload_reference)", offload_ref and uses_ref),
                    ("reward models (always, between their uses)", bool(reward_stages)),
                ) if on), problems=problems)
    _check(plan, cfg)
    return plan


def _reward_model_stages(cfg: Config, c: Candidate, options: PlanOptions, counts_fn: CountsFn,
                         policy_shape: MicroBatchShape, problems: list[str]
                         ) -> list[list[tuple[float, float]]]:
    """Per pipeline stage, (weights, forward working set) of every reward.models entry in
    the trainer's layout (reward_serving.py: the policy's parallel layout, its own
    architecture): the backbone's layers, embedding and final norm, and a scalar head instead
    of the LM head (model/reward_head.py); the working set of one micro-batch of
    train.micro_batch_size rows of at most data.seq_length ids (its max_length is no longer),
    with no vocabulary logits. Empty without reward models; an architecture the layout cannot
    split adds a problem."""
    if not cfg.reward.models:
        return []
    known = dict(options.reward_architectures)
    per_stage: list[list[tuple[float, float]]] = [[] for _ in range(c.pipeline)]
    for spec in cfg.reward.models:
        rm = known.get(spec.name, cfg.model)
        try:
            counts = counts_fn(rm, c.tensor, c.expert, c.expert_tensor)
            split = stage_layers(rm.num_layers, c)
        except ValueError as err:
            problems.append(f"reward model {spec.name!r}: {err}")
            continue
        shape = replace(policy_shape, act_bytes=_dtype_bytes(rm.params_dtype))
        for stage, layers in enumerate(split):
            last = stage == c.pipeline - 1
            part = counts.stage(layers, first=stage == 0, last=False)
            if last:  # final norm and the scalar head (hidden_size weights) for the LM head
                part = part + counts.final_norm + PartCount(dense=rm.hidden_size)
            kinds = {counts.layer_kinds[i] == "moe" for i in layers}
            working = max((layer_bytes(rm, shape, moe, "none") for moe in kinds), default=0.0)
            per_stage[stage].append((part.total * _dtype_bytes(rm.params_dtype), working))
    return per_stage if all(per_stage) else []


def engine_weight_bytes(part: PartCount, dtype: WeightsDtype) -> float:
    """Bytes of `part` as the rollout engine stores it: linear-layer weights in `dtype` (FP8:
    one byte), the rest (embedding, output head, router, norms) in 16 bits, 32 for fp32."""
    high = 4 if dtype == "fp32" else 2
    low = {"fp8": 1, "bf16": 2, "fp32": 4}[dtype]
    return float(part.low_precision * low + (part.total - part.low_precision) * high)


def engine_placement(cfg: Config, c: Candidate, options: PlanOptions) -> Placement:
    """The engine groups of this layout: rollout.ranks_per_engine at the candidate's inference
    TP (a job smaller than a node has all its GPUs on one node).

    Raises:
        ValueError: the groups do not fit the GPUs (names the rollout field).
    """
    rollout = replace(cfg.rollout, tensor_parallel=c.rollout_tensor)
    return resolve_placement(rollout, options.gpus, min(options.gpus, options.gpus_per_node))


def rollout_memory(cfg: Config, tensor: int, options: PlanOptions,
                   counts_fn: CountsFn) -> RolloutMemory:
    """The engine at inference TP `tensor` (experts split over TP, as vLLM does without
    expert parallelism); KV for `rollout_concurrency` sequences of data.seq_length tokens;
    one engine per engine group."""
    model = cfg.model
    counts = counts_fn(model, tensor, 1, tensor).whole_model()
    weights = engine_weight_bytes(counts, options.rollout_weights)
    if model.multi_latent_attention:
        # MLA caches one compressed latent + the rotary key per token and layer; every TP
        # rank holds all of it (the latent is not split by heads).
        per_token_layer = model.kv_lora_rank + model.qk_pos_emb_head_dim
    else:
        groups = model.num_query_groups or model.num_attention_heads
        head_dim = model.kv_channels or model.hidden_size // model.num_attention_heads
        per_token_layer = 2 * max(1, groups // tensor) * head_dim
    kv_per_token = float(per_token_layer * model.num_layers * options.kv_cache_bytes)
    seq = cfg.data.seq_length
    # one engine per engine group (rollout.ranks_per_engine, default one node): with TP_e
    # below a node's GPUs the group's other GPUs hold no engine worker
    group = ranks_per_engine(replace(cfg.rollout, tensor_parallel=tensor),
                             min(options.gpus, options.gpus_per_node))
    engines = max(options.gpus // group, 1)
    outputs = cfg.grpo.prompts_per_rollout * cfg.grpo.group_size
    budget = cfg.rollout.gpu_memory_utilization * options.gpu_memory
    return RolloutMemory(
        tensor=tensor, engines=engines, weights=weights, kv_per_token=kv_per_token,
        seq_length=seq, concurrency=options.rollout_concurrency,
        kv_needed=kv_per_token * seq * options.rollout_concurrency,
        kv_budget=budget - weights - options.rollout_overhead,
        outputs_per_engine=math.ceil(outputs / max(engines, 1)))


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f} GB"


def _check(plan: Plan, cfg: Config) -> None:
    o, r, c = plan.options, plan.rollout, plan.candidate
    mem = o.gpu_memory
    for s in plan.stages:
        for phase in ("train", "logprob", "reward"):
            need = getattr(s, phase)
            if need > mem:
                plan.problems.append(f"stage {s.stage}: {phase} phase needs {_gb(need)} > "
                                     f"{_gb(mem)}")
    worst_start = max(s.startup_residual for s in plan.stages)
    if worst_start + cfg.rollout.gpu_memory_utilization * mem > mem:
        plan.problems.append(
            f"startup: the trainer keeps {_gb(worst_start)} when the engine starts, and vLLM "
            f"starts only with gpu_memory_utilization={cfg.rollout.gpu_memory_utilization} x "
            f"{_gb(mem)} free; lower rollout.gpu_memory_utilization to "
            f"{(mem - worst_start) / mem:.2f} or less")
    if r.kv_needed > r.kv_budget:
        plan.problems.append(
            f"rollout: KV for {r.concurrency} x {r.seq_length} tokens needs {_gb(r.kv_needed)}, "
            f"gpu_memory_utilization={cfg.rollout.gpu_memory_utilization} leaves "
            f"{_gb(max(r.kv_budget, 0))} (holds {r.full_length_capacity} at full length)")
    worst_residual = max(s.rollout_residual for s in plan.stages)
    if worst_residual + cfg.rollout.gpu_memory_utilization * mem > mem:
        plan.problems.append(
            f"rollout: the trainer keeps {_gb(worst_residual)} (weights, FP8 cache, reserve "
            "and what is not offloaded) while the "
            f"engine may take gpu_memory_utilization={cfg.rollout.gpu_memory_utilization} x "
            f"{_gb(mem)}; lower rollout.gpu_memory_utilization to "
            f"{(mem - worst_residual) / mem:.2f} or less")
    host = max(s.host for s in plan.stages) * o.gpus_per_node
    if host > o.host_memory:
        plan.problems.append(f"host: offloaded state needs {_gb(host)} per node > "
                             f"{_gb(o.host_memory)}")
    if o.gpus % c.rollout_tensor:
        plan.problems.append(f"rollout: tensor_parallel={c.rollout_tensor} does not divide "
                             f"{o.gpus} GPUs")
    else:
        try:
            engine_placement(cfg, c, o)
        except ValueError as err:
            plan.problems.append(f"rollout: {err}")
