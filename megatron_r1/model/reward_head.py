"""Reward models: megatron-core GPTModel chunks whose LM output layer is a scalar head.

Layer L2. The backbone is exactly the policy `build_model` builds (so a policy checkpoint or
a converted Hugging Face model loads into it); on the post-process chunk the vocabulary
projection is replaced by `ScalarHead`, which stands in as GPTModel's `output_layer` and is
called as GPTModel calls it, so nothing of megatron is forked: a chunk called as
`chunk(tokens_BS, position_ids_BS, None)` returns float32 scores [B, S] on the last pipeline
stage (hidden states elsewhere). Key decisions:

- The head's weight [1, H] is replicated over tensor-parallel ranks and its input is the full
  sequence on every rank: under sequence parallelism the sequence is gathered first with a
  backward that only takes this rank's slice (the gradient reaching the gathered hidden
  states is already complete on every rank, summing it would count it TP times); without it
  the input is already full. Either way every TP rank computes the same scores and holds the
  same, complete, weight gradient, so no extra reduction is needed.
- The head is the output layer's `weight` [1, H] (GPTModel and its sharded state dict expect
  `output_layer.weight`), but checkpoints store it as one replicated tensor under its own
  key, `HEAD_CHECKPOINT_KEY`, never under the policy's [V, H] LM-head key: a reward
  checkpoint loads at any TP/PP/DP layout, a policy checkpoint loads into a reward model
  with only the head missing (`load_checkpoint(..., fresh=HEAD_KEYS)` keeps its fresh
  initialisation), and neither can be mistaken for the other.
- A reward model has no LM head, so `model.tie_embeddings` has nothing to tie: the backbone
  is built untied (a tied policy's embedding still loads; its LM head is its embedding).
- The fresh head is drawn from a generator seeded with torch's initial seed (train.seed,
  set on every rank by init_parallel), so it is the same on every rank and layout.

Shapes: B sequences, S positions, H hidden size.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)

from megatron_r1.config.schema import ModelConfig, ParallelConfig
from megatron_r1.model.build import build_model
from megatron_r1.parallel.init import ParallelContext

HEAD_CHECKPOINT_KEY = "output_layer.score_weight"
"""The head's tensor in a dist checkpoint (the policy's LM head is `output_layer.weight`)."""
HEAD_KEYS = ("output_layer.weight",)
"""State-dict keys of the head, which a policy checkpoint lacks (`load_checkpoint(fresh=)`)."""


class ScalarHead(MegatronModule):
    """hidden -> one score per position; stands in for GPTModel's `output_layer`."""

    def __init__(self, config: TransformerConfig, tp_group: Any, *, device: torch.device,
                 dtype: torch.dtype, initialize: bool) -> None:
        super().__init__(config)
        self.tp_group = tp_group
        # Read by GPTModel's inference path (it gathers for a sequence-parallel output layer).
        self.sequence_parallel = config.sequence_parallel
        if device.type == "meta":
            weight = torch.empty(1, config.hidden_size, dtype=dtype, device=device)
        else:
            weight = torch.zeros(1, config.hidden_size)
            if initialize:
                generator = torch.Generator().manual_seed(torch.initial_seed())
                weight.normal_(0.0, config.init_method_std, generator=generator)
            weight = weight.to(device=device, dtype=dtype)
        self.weight = torch.nn.Parameter(weight)

    def forward(self, hidden_SBH: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None) -> tuple[torch.Tensor, None]:
        """GPTModel's output-layer call: hidden [S(/TP), B, H] -> (scores float32 [S, B], None).

        `weight` is GPTModel's tied LM weight, always None here (built untied)."""
        assert weight is None, "a reward model's backbone is built untied"
        if self.sequence_parallel:
            hidden_SBH = gather_from_sequence_parallel_region(
                hidden_SBH, tensor_parallel_output_grad=False, group=self.tp_group)
        # fp32 accumulation of the H-long dot product whatever the model's dtype.
        score_SB1 = torch.nn.functional.linear(hidden_SBH.float(), self.weight.float())
        return score_SB1.squeeze(-1), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict[str, Any]:
        """The weight as one tensor replicated over TP and DP (no tensor-parallel axis),
        stored under HEAD_CHECKPOINT_KEY."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        sharded: dict[str, Any] = make_sharded_tensors_for_checkpoint(
            {"weight": self.weight}, prefix, {}, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"])
        stored = prefix.removesuffix("output_layer.") + HEAD_CHECKPOINT_KEY
        sharded[f"{prefix}weight"].key = stored
        return sharded


def build_reward_model(model: ModelConfig, parallel: ParallelConfig, ctx: ParallelContext, *,
                       perform_initialization: bool = True,
                       device: torch.device | None = None) -> list[GPTModel]:
    """This rank's reward-model chunks: `build_model`'s, the last one's LM head a ScalarHead.

    Args:
        model: the backbone's config (a policy's); tie_embeddings is ignored (no LM head).
        perform_initialization: False when the weights are about to be loaded.
        device: override the placement; `torch.device("meta")` builds shapes only.

    Raises:
        ValueError: for multi-token prediction (a next-token objective) or context
            parallelism (the score position would lie on one CP rank only).
    """
    if model.mtp_num_layers:  # ModelConfig refuses MTP for now; a reward model always will
        raise ValueError(f"model.mtp_num_layers={model.mtp_num_layers}: a reward model has no "
                         "next-token objective for multi-token prediction; set it to 0 (a "
                         "checkpoint's MTP weights are then ignored)")
    if ctx.layout.context > 1:
        raise ValueError(f"parallel.context={ctx.layout.context}: reward models read one "
                         "position per sequence and do not support context parallelism")
    backbone = dataclasses.replace(model, tie_embeddings=False)
    chunks = build_model(backbone, parallel, ctx, perform_initialization=perform_initialization,
                         device=device)
    for chunk in chunks:
        if not chunk.post_process:
            continue
        lm_head = chunk.output_layer.weight
        chunk.output_layer = ScalarHead(
            chunk.config, ctx.pg_collection.tp,  # type: ignore[attr-defined]
            device=lm_head.device, dtype=lm_head.dtype,
            initialize=perform_initialization and lm_head.device.type != "meta")
    return chunks


def last_token_scores(scores_BS: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
    """The score at each row's last real position (`lengths_B - 1`, lengths in 1..S): [B].

    No check of the lengths here: it would read them back to the host on every micro-batch
    (a device sync in the loss); the batch builders take them from the rows themselves, and
    `gather` refuses an index outside the row.
    """
    last_B1 = (lengths_B.to(scores_BS.device, torch.int64) - 1).unsqueeze(1)
    return scores_BS.gather(1, last_B1).squeeze(1)
