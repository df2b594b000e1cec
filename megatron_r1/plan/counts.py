"""What one rank holds of each part of the policy: the planner's parameter bookkeeping.

Layer L0 (pure). The numbers are measured on the real model by megatron_r1.plan.params; this
module only adds them up per pipeline stage, so it can be tested without megatron.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LayerKind = Literal["dense", "moe"]
"""megatron's moe_layer_freq entry of a layer: 0 = dense FFN, 1 = mixture of experts."""


@dataclass(frozen=True, slots=True)
class PartCount:
    """Parameters of one part of the model on one rank."""

    dense: int = 0
    """Parameters outside the routed experts (replicated over the data-parallel ranks)."""
    expert: int = 0
    """Routed-expert parameters (replicated over the expert-data-parallel ranks)."""
    low_precision: int = 0
    """Of these, the elements of linear-layer weights (what FP8 inference stores in 1 byte)."""

    @property
    def total(self) -> int:
        return self.dense + self.expert

    def __add__(self, other: PartCount) -> PartCount:
        return PartCount(self.dense + other.dense, self.expert + other.expert,
                         self.low_precision + other.low_precision)

    def __mul__(self, times: int) -> PartCount:
        return PartCount(self.dense * times, self.expert * times, self.low_precision * times)


@dataclass(frozen=True, slots=True)
class ShardCounts:
    """What each part of the policy holds on one rank at a (TP, EP, ETP) sharding."""

    tensor: int
    expert: int
    expert_tensor: int
    embedding: PartCount
    """The input embedding (first pipeline stage)."""
    layers: dict[LayerKind, PartCount]
    """One transformer layer of each kind."""
    final_norm: PartCount
    output_layer: PartCount
    """The output head as the last stage holds it when the pipeline has more than one stage
    (with tied embeddings a single stage shares the embedding and holds nothing here)."""
    tied_single_stage: bool
    """Tied embeddings: a one-stage model holds the head in the embedding."""
    layer_kinds: tuple[LayerKind, ...]
    """The kind of every layer of the real model, in order."""

    def stage(self, layers: range, *, first: bool, last: bool) -> PartCount:
        """Parameters of a pipeline stage holding `layers` (global indices)."""
        count = PartCount()
        for index in layers:
            count = count + self.layers[self.layer_kinds[index]]
        if first:
            count = count + self.embedding
        if last:
            count = count + self.final_norm
            if not (first and self.tied_single_stage):
                count = count + self.output_layer
        return count

    def whole_model(self) -> PartCount:
        """Every parameter of one tensor/expert shard of a one-stage model."""
        return self.stage(range(len(self.layer_kinds)), first=True, last=True)
