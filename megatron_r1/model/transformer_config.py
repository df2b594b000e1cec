"""ModelConfig + Layout -> megatron-core TransformerConfig (MLATransformerConfig for MLA).

Layer L2. The one place where our field names meet megatron's. Choices made here:
- `add_bias_linear=False`: MoE models have no linear biases, and megatron-core's local expert
  MLP trips an in-place-on-view autograd error with them.
- No dropout: RL and SFT of large models run without it, and it keeps runs reproducible.
- Kernel fusions (bias-activation, masked softmax, RoPE, gradient-accumulation) only with
  Transformer Engine on CUDA; the local CPU path runs plain PyTorch.
- `calculate_per_token_loss=True`: the loss denominator is the number of loss tokens of the
  whole step (all micro-batches, all data-parallel ranks), summed by megatron's schedule and
  finalize_model_grads, not a mean of per-micro-batch means.
- `variable_seq_lengths` with pipelining: each micro-batch is padded only to its own longest
  row (megatron_r1.batching), so pipeline stages exchange activation shapes before the
  activations; off where the layout needs one shape per step (Layout.uniform_microbatch_shapes).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer import MLATransformerConfig, TransformerConfig

from megatron_r1.config.schema import Dtype, ModelConfig, ParallelConfig
from megatron_r1.layout import Layout

TORCH_DTYPES: dict[Dtype, torch.dtype] = {
    "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def use_transformer_engine(model: ModelConfig) -> bool:
    """Resolve `model.transformer_impl`; `transformer_engine` without TE is a clear error."""
    if model.transformer_impl == "local":
        return False
    try:
        import transformer_engine  # noqa: F401

        have_te = torch.cuda.is_available()
    except (ImportError, RuntimeError, OSError):
        have_te = False
    if model.transformer_impl == "transformer_engine" and not have_te:
        raise ValueError("model.transformer_impl=transformer_engine: Transformer Engine does "
                         "not import here (it needs CUDA; install the [gpu] extra)")
    return have_te


def moe_layer_pattern(model: ModelConfig) -> list[int]:
    """megatron's `moe_layer_freq` as a list: 0 = dense layer, 1 = MoE layer."""
    if not model.is_moe:
        return [0] * model.num_layers
    dense = model.moe_first_dense_layers
    return [0] * dense + [1] * (model.num_layers - dense)


def _no_draw(weight: torch.Tensor) -> torch.Tensor:
    """An init method that leaves a weight as allocated (a checkpoint fills it next). Returns
    it: megatron uses the result in places (dot_product_attention.py, softmax_offset)."""
    return weight


def build_transformer_config(model: ModelConfig, parallel: ParallelConfig, layout: Layout, *,
                             use_te: bool, use_cpu_initialization: bool = True,
                             perform_initialization: bool = True,
                             random_weights: bool = True) -> TransformerConfig:
    """The megatron TransformerConfig for this model under this layout.

    Args:
        use_te: build for Transformer Engine layers (fusions and FP8 allowed).
        use_cpu_initialization: create full weights on the CPU generator, then split; gives
            identical full weights for any TP degree (and allows meta-device builds).
        perform_initialization: False skips megatron's initialisation code altogether (meta
            builds only: it also skips marking the tensor-parallel weights, see below).
        random_weights: False keeps megatron's initialisation code but draws nothing (its
            init methods leave the weights as allocated): for weights a checkpoint loads next.
            Megatron-core 0.16.1 marks a tensor-parallel weight (`tensor_model_parallel`,
            `partition_dim`, `partition_stride`, which its gradient norm and clipping read)
            only inside its init helpers (tensor_parallel/layers.py, `_initialize_affine_
            weight_cpu` around lines 169-172, called only under perform_initialization,
            around lines 855-866): without them a TP-sharded gradient counts as a duplicate
            and the gradient norm comes out wrong at TP > 1.
    """
    dtype = TORCH_DTYPES[model.params_dtype]
    kwargs: dict[str, Any] = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.activation == "swiglu",
        activation_func=F.silu if model.activation == "swiglu" else F.gelu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        init_method_std=model.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        bf16=model.params_dtype == "bf16",
        fp16=model.params_dtype == "fp16",
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
        num_layers_in_first_pipeline_stage=layout.first_stage_layers,
        num_layers_in_last_pipeline_stage=layout.last_stage_layers,
        context_parallel_size=layout.context,
        expert_model_parallel_size=layout.expert,
        expert_tensor_parallel_size=layout.expert_tensor,
        sequence_parallel=layout.sequence_parallel,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
        **({} if random_weights else dict(init_method=_no_draw, output_layer_init_method=_no_draw,
                                         embedding_init_method=_no_draw)),
        bias_activation_fusion=use_te,
        masked_softmax_fusion=use_te,
        bias_dropout_fusion=use_te,
        apply_rope_fusion=use_te and not model.multi_latent_attention,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        calculate_per_token_loss=True,
        variable_seq_lengths=layout.pipeline > 1 and not layout.uniform_microbatch_shapes,
        # megatron rejects variable shapes with its default (allgather) dispatcher even for
        # dense models, which have no dispatcher at all
        moe_token_dispatcher_type=parallel.moe_token_dispatcher if model.is_moe else "alltoall",
    )
    if model.recompute != "none":
        kwargs["recompute_granularity"] = model.recompute
        if model.recompute == "full":
            kwargs.update(recompute_method="uniform", recompute_num_layers=1)
    if model.fp8 != "none":
        kwargs.update(fp8=model.fp8, fp8_recipe=model.fp8_recipe)
    if model.is_moe:
        kwargs.update(
            num_moe_experts=model.num_experts,
            moe_ffn_hidden_size=model.moe_ffn_hidden_size,
            moe_router_topk=model.moe_router_topk,
            moe_shared_expert_intermediate_size=model.moe_shared_expert_size or None,
            moe_layer_freq=moe_layer_pattern(model),
            moe_router_score_function=model.moe_router_score_function,
            moe_router_pre_softmax=model.moe_router_pre_softmax,
            moe_router_topk_scaling_factor=model.moe_router_topk_scaling_factor,
            moe_router_enable_expert_bias=model.moe_router_expert_bias,
            moe_router_bias_update_rate=model.moe_router_bias_update_rate,
            moe_router_num_groups=model.moe_router_num_groups,
            moe_router_group_topk=model.moe_router_group_topk,
            moe_router_load_balancing_type="aux_loss" if model.moe_aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=model.moe_aux_loss_coeff,
            moe_router_dtype=model.moe_router_dtype,
            moe_grouped_gemm=use_te,
        )
    if not model.multi_latent_attention:
        return TransformerConfig(**kwargs)
    return MLATransformerConfig(
        **kwargs,
        q_lora_rank=model.q_lora_rank,
        kv_lora_rank=model.kv_lora_rank,
        qk_head_dim=model.qk_head_dim,
        qk_pos_emb_head_dim=model.qk_pos_emb_head_dim,
        v_head_dim=model.v_head_dim,
        rope_type="yarn" if model.position_embedding == "yarn" else "rope",
        rotary_base=model.rotary_base,
        rotary_scaling_factor=model.rotary_scaling_factor,
        original_max_position_embeddings=model.original_max_position_embeddings,
        mscale=model.mscale,
        mscale_all_dim=model.mscale_all_dim,
    )
