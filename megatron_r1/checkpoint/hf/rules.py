"""The vocabulary of the per-family mapping files: layout transforms, rules, families.

Layer L1 (torch, no megatron). A family file (llama.py, qwen3_moe.py, ...) is a table of
`Rule`s: "megatron parameter X is made of Hugging Face tensors Y, Z by transform T", with
`{layer}` and `{expert}` placeholders and a scope saying which layers (and experts) the rule
covers. `expand_rules` turns the table into concrete `Pair`s for one model config; the
converter then checks the pairs against both sides (every megatron parameter and every Hugging
Face tensor claimed exactly once, shapes matching) before it writes anything.

Megatron names are the parameter names of megatron-core's GPTModel (keys of its
`sharded_state_dict()`) at TP=PP=EP=1. Where the local (CPU) and Transformer Engine layer specs
name a tensor differently (TE fuses the pre-attention norm into `linear_qkv.layer_norm_weight`,
a grouped MLP stores `experts.linear_fc1.weight{e}`), a rule lists both spellings; the one
the built model has is used. Every transform is exactly invertible, so HF -> mcore -> HF is
bitwise the identity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from megatron_r1.config.schema import ModelConfig
from megatron_r1.layout import padded_vocab_size

Scope = Literal["model", "layer", "dense", "moe", "expert"]


@dataclass(frozen=True, slots=True)
class MapContext:
    """What transforms and rule conditions may look at."""

    model: ModelConfig
    hf_config: dict[str, Any]
    """The (normalised) Hugging Face config.json."""

    @property
    def head_dim(self) -> int:
        return self.model.kv_channels or self.model.hidden_size // self.model.num_attention_heads

    @property
    def num_groups(self) -> int:
        return self.model.num_query_groups or self.model.num_attention_heads

    @property
    def padded_vocab(self) -> int:
        # Converted checkpoints are written at TP=1; megatron's loader accepts another padding
        # for the embedding and output layer (allow_shape_mismatch), so they load at any TP.
        return padded_vocab_size(self.model.vocab_size, self.model.make_vocab_size_divisible_by, 1)

    @property
    def qkv_bias(self) -> bool:
        return self.model.add_qkv_bias


class Transform(Protocol):
    """A layout change between Hugging Face tensors and one megatron tensor (invertible)."""

    def to_mcore(self, hf: Sequence[torch.Tensor], ctx: MapContext) -> torch.Tensor: ...

    def to_hf(self, mcore: torch.Tensor, ctx: MapContext) -> list[torch.Tensor]: ...


class Identity:
    """One tensor, same layout."""

    def to_mcore(self, hf: Sequence[torch.Tensor], ctx: MapContext) -> torch.Tensor:
        return hf[0]

    def to_hf(self, mcore: torch.Tensor, ctx: MapContext) -> list[torch.Tensor]:
        return [mcore]


class Concat:
    """Equal-sized tensors stacked along dim 0: gate and up projections -> `linear_fc1`
    ([gate; up], which megatron's SwiGLU splits in two halves)."""

    def __init__(self, parts: int = 2) -> None:
        self.parts = parts

    def to_mcore(self, hf: Sequence[torch.Tensor], ctx: MapContext) -> torch.Tensor:
        return torch.cat(list(hf), dim=0)

    def to_hf(self, mcore: torch.Tensor, ctx: MapContext) -> list[torch.Tensor]:
        return list(torch.chunk(mcore, self.parts, dim=0))


class FusedQKV:
    """q, k, v projections (weights [rows, hidden] or biases [rows]) -> megatron's
    `linear_qkv`, interleaved by query group: for each of the G KV heads, its H/G query
    heads, then its key head, then its value head. Splitting this layout by rows over TP
    ranks gives each rank whole groups, which is why megatron uses it."""

    def to_mcore(self, hf: Sequence[torch.Tensor], ctx: MapContext) -> torch.Tensor:
        q, k, v = hf
        g, d = ctx.num_groups, ctx.head_dim
        rest = q.shape[1:]
        parts = [q.reshape(g, -1, d, *rest), k.reshape(g, 1, d, *rest), v.reshape(g, 1, d, *rest)]
        return torch.cat(parts, dim=1).reshape(-1, *rest)

    def to_hf(self, mcore: torch.Tensor, ctx: MapContext) -> list[torch.Tensor]:
        g, d = ctx.num_groups, ctx.head_dim
        per_group = ctx.model.num_attention_heads // g
        rest = mcore.shape[1:]
        grouped = mcore.reshape(g, per_group + 2, d, *rest)
        q, k, v = torch.split(grouped, [per_group, 1, 1], dim=1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]


class PadVocab:
    """Embedding / output rows: megatron pads the vocabulary to a multiple of
    `make_vocab_size_divisible_by` (zero rows); exports drop the padding."""

    def to_mcore(self, hf: Sequence[torch.Tensor], ctx: MapContext) -> torch.Tensor:
        (t,) = hf
        pad = ctx.padded_vocab - t.shape[0]
        return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad > 0 else t

    def to_hf(self, mcore: torch.Tensor, ctx: MapContext) -> list[torch.Tensor]:
        return [mcore[: ctx.model.vocab_size]]


def _rope_permutation(dim: int) -> torch.Tensor:
    """Index that takes interleaved rotary pairs (x0, y0, x1, y1, ...) to the half-split
    layout (x0, x1, ..., y0, y1, ...)."""
    return torch.arange(dim).view(dim // 2, 2).t().reshape(-1)


class RopeRows:
    """Rows of a projection whose output ends, in each block of `block` rows, with the rotary
    part of a query/key head. megatron-core's MLA expects those rows as interleaved pairs
    (DeepSeek's own layout; it de-interleaves at run time, as Hugging Face does with
    `rope_interleave=true`), so released DeepSeek-V3 weights pass unchanged. A checkpoint
    whose config says `rope_interleave=false` stores them half-split; its rows are
    interleaved on the way in and split again on the way out.

    Args:
        block: rows per block (a head's query rows, or the whole compressed-KV output);
            a callable of the context.
    """

    def __init__(self, block: Callable[[MapContext], int]) -> None:
        self.block = block

    def _rows(self, rows: int, ctx: MapContext, to_mcore: bool) -> torch.Tensor | None:
        if ctx.hf_config.get("rope_interleave", True):
            return None
        rope, block = ctx.model.qk_pos_emb_head_dim, self.block(ctx)
        perm = _rope_permutation(rope)  # interleaved -> half-split
        if to_mcore:
            perm = torch.argsort(perm)  # half-split -> interleaved
        one = torch.cat([torch.arange(block - rope), block - rope + perm])
        return (one + block * torch.arange(rows // block)[:, None]).reshape(-1)

    def to_mcore(self, hf: Sequence[torch.Tensor], ctx: MapContext) -> torch.Tensor:
        (t,) = hf
        rows = self._rows(t.shape[0], ctx, to_mcore=True)
        return t if rows is None else t[rows]

    def to_hf(self, mcore: torch.Tensor, ctx: MapContext) -> list[torch.Tensor]:
        rows = self._rows(mcore.shape[0], ctx, to_mcore=False)
        return [mcore if rows is None else mcore[rows]]


IDENTITY = Identity()
GATE_UP = Concat(2)
QKV = FusedQKV()
VOCAB = PadVocab()


def _always(ctx: MapContext) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class Rule:
    """One megatron parameter (per layer / expert) and the Hugging Face tensors it is made of."""

    mcore: str | tuple[str, ...]
    """Megatron parameter name; a tuple lists alternative spellings (local spec, TE spec)."""
    hf: str | tuple[str, ...]
    """Hugging Face tensor name(s), in the order the transform takes them."""
    transform: Transform = IDENTITY
    scope: Scope = "model"
    """`model`: once; `layer`: every layer; `dense`/`moe`: dense or MoE layers only;
    `expert`: every routed expert of every MoE layer."""
    when: Callable[[MapContext], bool] = _always
    """The rule applies only where this holds (e.g. untied output layer)."""
    fp8: bool = False
    """The Hugging Face tensors may be FP8 block-quantised (with `*_scale_inv`)."""

    @property
    def mcore_names(self) -> tuple[str, ...]:
        return (self.mcore,) if isinstance(self.mcore, str) else self.mcore

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,) if isinstance(self.hf, str) else self.hf


@dataclass(frozen=True, slots=True)
class Skip:
    """Hugging Face tensors the converter leaves out on purpose, with the reason it logs."""

    matches: Callable[[str, MapContext], bool]
    reason: str


def _tied_output(name: str, ctx: MapContext) -> bool:
    return name == "lm_head.weight" and ctx.model.tie_embeddings


def _rope_buffer(name: str, ctx: MapContext) -> bool:
    return name.endswith("rotary_emb.inv_freq")


COMMON_SKIPS = (
    Skip(_tied_output, "tied to model.embed_tokens.weight (tie_word_embeddings=true)"),
    Skip(_rope_buffer, "RoPE frequencies are recomputed from the config"),
)


@dataclass(frozen=True)
class Family:
    """A model family: its Hugging Face architectures, tensor map and config map."""

    name: str
    architectures: tuple[str, ...]
    model_type: str
    rules: tuple[Rule, ...]
    config_to_model: Callable[[dict[str, Any]], dict[str, Any]]
    """Normalised HF config.json -> ModelConfig architecture fields (raises ValueError on
    features megatron-r1 cannot represent, naming the key)."""
    model_to_config: Callable[[ModelConfig], dict[str, Any]]
    """ModelConfig -> HF config.json entries (the inverse, for checkpoints without a source
    config)."""
    skips: tuple[Skip, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class Pair:
    """One concrete megatron parameter and its Hugging Face tensors."""

    mcore: tuple[str, ...]
    hf: tuple[str, ...]
    rule: Rule


def _layers(scope: Scope, model: ModelConfig) -> range | list[int]:
    dense = model.moe_first_dense_layers if model.is_moe else model.num_layers
    if scope in ("layer",):
        return range(model.num_layers)
    if scope == "dense":
        return range(dense)
    return range(dense, model.num_layers) if model.is_moe else []


def expand_rules(family: Family, ctx: MapContext) -> list[Pair]:
    """Every (megatron parameter, HF tensors) pair of this model, layer by layer."""
    model = ctx.model
    top = [r for r in family.rules if r.scope == "model" and r.when(ctx)]
    per_layer = [r for r in family.rules if r.scope != "model" and r.when(ctx)]

    def pair(rule: Rule, **names: int) -> Pair:
        return Pair(tuple(n.format(**names) for n in rule.mcore_names),
                    tuple(n.format(**names) for n in rule.hf_names), rule)

    # Order: embedding (first model-scope rule), layers, then the remaining model rules,
    # the order in which Hugging Face checkpoints list them.
    pairs = [pair(top[0])] if top else []
    for layer in range(model.num_layers):
        for rule in per_layer:
            if layer not in _layers(rule.scope, model):
                continue
            if rule.scope == "expert":
                pairs += [pair(rule, layer=layer, expert=e) for e in range(model.num_experts)]
            else:
                pairs.append(pair(rule, layer=layer))
    pairs += [pair(r) for r in top[1:]]
    return pairs
