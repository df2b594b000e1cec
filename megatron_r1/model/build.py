"""Build the policy as megatron-core GPTModel chunks, and count its parameters.

Layer L2. One GPTModel per virtual-pipeline chunk of this rank (one chunk without interleaving).
Layer specs come from megatron-core (`get_gpt_decoder_block_spec`, which places the dense
first layers, MoE layers and this stage's slice); on the local (non-TE) path the torch norms
are swapped for the sequence-parallel-aware ones (norm.py), the core attention for one on
torch's fused attention that takes packed sequences and, for MLA, a distinct value head size
(attention.py), and the routed experts' loop for grouped matrix products (experts.py).
Counting parameters on the meta device uses the same builder, so a count can never drift
from the model that trains.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron_r1.config.schema import ModelConfig, ParallelConfig
from megatron_r1.layout import padded_vocab_size
from megatron_r1.model.attention import LatentDotProductAttention, PackedDotProductAttention
from megatron_r1.model.experts import GroupedSequentialMLP
from megatron_r1.model.norm import SequenceParallelTorchNorm
from megatron_r1.model.transformer_config import build_transformer_config, use_transformer_engine
from megatron_r1.parallel.init import ParallelContext


def _swap_modules(spec: object, swaps: dict[type, type]) -> object:
    """Copy of a layer spec with each module class in `swaps` replaced by its value."""
    if isinstance(spec, type):
        return swaps.get(spec, spec)
    if isinstance(spec, list):
        return [_swap_modules(item, swaps) for item in spec]
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, module=_swap_modules(spec.module, swaps),
                                   submodules=_swap_modules(spec.submodules, swaps))
    if dataclasses.is_dataclass(spec):
        return dataclasses.replace(spec, **{  # type: ignore[type-var]
            f.name: _swap_modules(getattr(spec, f.name), swaps)
            for f in dataclasses.fields(spec) if f.init})
    return spec


def _local_spec_swaps(model: ModelConfig) -> dict[type, type]:
    """Local-spec modules replaced by ours: torch norms that support sequence parallelism
    (norm.py), a core attention on torch's fused attention that takes packed sequences and,
    for MLA, a distinct value head size (attention.py), and routed experts in grouped matrix
    products instead of a loop (experts.py)."""
    attention = (LatentDotProductAttention if model.multi_latent_attention
                 else PackedDotProductAttention)
    return {WrappedTorchNorm: SequenceParallelTorchNorm, DotProductAttention: attention,
            SequentialMLP: GroupedSequentialMLP}


def build_model(model: ModelConfig, parallel: ParallelConfig, ctx: ParallelContext, *,
                perform_initialization: bool = True,
                device: torch.device | None = None) -> list[GPTModel]:
    """This rank's model chunks, on ctx.device (or `device`, e.g. meta).

    Args:
        perform_initialization: False when the weights are about to be loaded: laid out as
            megatron lays them out (tensor-parallel marks included), no random draw
            (transformer_config.build_transformer_config's `random_weights`).
        device: override the placement; `torch.device("meta")` builds shapes only.
    """
    layout = ctx.layout
    use_te = use_transformer_engine(model)
    on_meta = device is not None and device.type == "meta"
    config = build_transformer_config(
        model, parallel, layout, use_te=use_te, use_cpu_initialization=True,
        perform_initialization=not on_meta, random_weights=perform_initialization)
    vocab = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, layout.tensor)
    num_chunks = layout.virtual_pipeline or 1
    chunks = []
    for vp_stage in range(num_chunks):
        block_spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=use_te, normalization=model.normalization,
            vp_stage=vp_stage if layout.virtual_pipeline else None, pp_rank=ctx.pp_rank)
        if not use_te:
            block_spec = _swap_modules(block_spec, _local_spec_swaps(model))
        with torch.device("meta") if on_meta else torch.device("cpu"):
            gpt = GPTModel(
                config=config,
                transformer_layer_spec=block_spec,
                vocab_size=vocab,
                max_sequence_length=model.max_position_embeddings,
                pre_process=ctx.is_first_stage and vp_stage == 0,
                post_process=ctx.is_last_stage and vp_stage == num_chunks - 1,
                share_embeddings_and_output_weights=model.tie_embeddings,
                position_embedding_type="rope",
                rotary_base=int(model.rotary_base),
                pg_collection=ctx.pg_collection,
                vp_stage=vp_stage if layout.virtual_pipeline else None,
            )
        if not on_meta and ctx.device.type != "cpu":
            gpt = gpt.to(ctx.device)
        chunks.append(gpt)
    return chunks


@dataclass(frozen=True, slots=True)
class ParamCount:
    """Parameters of one rank's model chunks."""

    total: int
    """Every parameter (each tied embedding counted once)."""
    routed_experts: int
    """Parameters of routed experts (all of them, not only the activated ones)."""
    activated: int
    """Parameters one token passes through: total minus the routed experts it does not
    visit (topk of num_experts per MoE layer)."""


def count_parameters(chunks: list[GPTModel], model: ModelConfig, ep_size: int = 1) -> ParamCount:
    """Count parameters by walking the built modules (works on the meta device).

    Args:
        ep_size: the expert-parallel degree the chunks were built with.
    """
    seen: set[int] = set()
    total = routed = 0
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            total += param.numel()
            if ".mlp.experts." in name:
                routed += param.numel()
    activated = total
    if model.is_moe and routed:
        # Every rank holds num_experts / EP experts per MoE layer; a token visits topk of them.
        local_experts = model.num_experts // ep_size
        activated = total - routed + routed * model.moe_router_topk // local_experts
    return ParamCount(total=total, routed_experts=routed, activated=activated)
