"""What the trainer needs from a rollout engine, and what the engine returns.

Layer L1. The GRPO loop talks to this Protocol only, so it runs the same against vLLM on a GPU
cluster, vLLM on a CPU, or any other engine that can sample with log-probs, score sequences
and take new weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

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
