"""What the trainer needs from a rollout engine, and what the engine returns.

Layer L1. The GRPO loop talks to this Protocol only, so it runs the same against vLLM on a GPU
cluster, vLLM on a CPU, or any other engine that can sample with log-probs, score sequences
and take new weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    n: int
    """Completions per prompt (the GRPO group size G)."""
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int | None = None
    """Base seed of this call: every request (prompt i, sample j) samples with its own seed
    derived from (seed, i, j) (rollout/placement.request_seed), so the tokens do not depend
    on batching or on how many engines share the prompts. None: the engine's stream."""
    return_routing: bool = False
    """Attach each completion's MoE routing (Completion.routing): the rollouts that routing
    replay (grpo.routing_replay=r3) trains on, not evaluation's samples; the engine must have
    been started to capture it."""


@dataclass(frozen=True, slots=True)
class Completion:
    token_ids: tuple[int, ...]
    """Generated ids (without the prompt), including the end-of-sequence id if one ended it."""
    logprobs: tuple[float, ...]
    """The sampler's log-probability of each generated id (after temperature)."""
    text: str
    """Decoded completion, special tokens removed (what the rewards read)."""
    finish_reason: str
    """`stop` (end of sequence) or `length` (hit max_new_tokens)."""
    routing: torch.Tensor | None = field(default=None, compare=False)
    """The experts the engine routed this row's tokens to (for R3 routing replay); None unless
    the engine captures routing (`VLLMEngine(capture_routing=True)`).

    int16 `routing_TLK` [T = prompt_len + completion_len - 1, L = MoE layers, K = top_k]:
    row t holds the experts of the token at input position t of ids = prompt + token_ids,
    t = 0 .. len(ids) - 2: exactly the positions a trainer forward over `ids[:-1]` sees (the
    last id is never an input). Layers: the model's MoE layers only, in model order (dense
    layers, e.g. DeepSeek-V3's first `first_k_dense_replace`, have no column; `MoELayers.layers`
    names the transformer layer of each). Expert ids: Hugging Face numbering (the `e` of
    `mlp.experts.{e}`), logical ids (before any expert-parallel placement). Each token's K ids
    are sorted ascending: a set, since the order inside top-k carries no meaning (the router's
    weights are recomputed from its logits at replay). Not compared by `==`."""


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                 prompt_indices: Sequence[int] | None = None) -> list[list[Completion]]:
        """`sampling.n` completions for each prompt (token ids), in prompt order.
        `prompt_indices`: each prompt's index in the whole call across engines (seeds derive
        from it); default 0, 1, ..."""
        ...

    def score(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Log-probability of each token of each sequence given the ones before it
        (temperature 1): float32 [len - 1] per sequence."""
        ...

    def route(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """The experts the engine routes each token of each sequence to, as `Completion.routing`
        for ids = the sequence: int16 [len - 1, MoE layers, top_k] per sequence, ids sorted
        within top-k. Engines that cannot report routing (dense models, engines without
        capture) raise NotImplementedError or ValueError saying why."""
        ...

    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        """Replace the engine's weights by these full, Hugging Face-named tensors, streamed
        in buckets (every weight exactly once)."""
        ...

    def sleep(self) -> None:
        """Free accelerator memory while the trainer runs (no-op where unsupported)."""
        ...

    def wake_up(self) -> None:
        """Undo sleep() before the next generate()."""
        ...

    def close(self) -> None:
        """Release the engine (processes, memory)."""
        ...


@dataclass(frozen=True, slots=True)
class MoELayers:
    """Where a model's routed experts are: what `Completion.routing`'s layer axis indexes."""

    layers: tuple[int, ...]
    """Transformer layer index (0-based, `model.layers.{i}`) of each MoE layer, ascending."""
    num_experts: int
    """Routed experts per MoE layer (shared experts not counted)."""
    top_k: int
    """Routed experts per token."""


def moe_layers(hf_config: Mapping[str, Any]) -> MoELayers | None:
    """The MoE layers of a Hugging Face config (config.json as a dict); None for a dense model.

    Layer i is an MoE layer unless one of the dense-layer rules of the architectures the
    project converts (vLLM builds them alike) makes it dense: Qwen2/Qwen3-MoE's
    `mlp_only_layers` and `decoder_sparse_step` ((i + 1) % step != 0), DeepSeek-V2/V3's
    `first_k_dense_replace` and `moe_layer_freq` (i % freq != 0); Mixtral has neither. The
    expert count is `n_routed_experts` (DeepSeek), `num_experts` or `num_local_experts`
    (transformers 5 writes Qwen3-MoE's `num_experts` under the latter name). A multimodal
    config's `text_config` is read when present."""
    cfg = hf_config.get("text_config") or hf_config
    experts = int(cfg.get("n_routed_experts") or cfg.get("num_experts")
                  or cfg.get("num_local_experts") or 0)
    if experts <= 0:
        return None
    dense = set(cfg.get("mlp_only_layers") or ())
    step = int(cfg.get("decoder_sparse_step") or 1)
    first_moe = int(cfg.get("first_k_dense_replace") or 0)
    freq = int(cfg.get("moe_layer_freq") or 1)
    layers = tuple(i for i in range(int(cfg["num_hidden_layers"]))
                   if i not in dense and (i + 1) % step == 0 and i >= first_moe and i % freq == 0)
    if not layers:
        return None
    top_k = int(cfg.get("num_experts_per_tok") or 0)
    if top_k <= 0:
        raise ValueError(f"an MoE config ({experts} experts) without num_experts_per_tok")
    return MoELayers(layers=layers, num_experts=experts, top_k=top_k)
