"""Routed experts of megatron-core's local (non-TE) spec in two grouped matrix products.

Layer L2. megatron-core 0.16.1's local spec runs the routed experts as `SequentialMLP`: a
Python loop over the local experts, each an MLP of two linear layers, over its slice of the
permuted tokens (`transformer/moe/experts.py`, SequentialMLP.forward). On a small model that
loop is the MoE layer's cost (measured: about a third of a log-prob pass of the demo model);
megatron's grouped alternatives need Transformer Engine (TEGroupedMLP) or the CUDA
`grouped_gemm` package (GroupedMLP). `GroupedSequentialMLP` keeps SequentialMLP's parameters
(so checkpoints, Hugging Face conversion, the weight export and routing replay see the same
`local_experts.{i}.linear_fc{1,2}.weight`) and computes the same thing with
`torch.nn.functional.grouped_mm` over the stacked expert weights: fc1, the (gated)
activation times the routing probabilities, fc2, as megatron's MLP.forward does
(`transformer/mlp.py`, the unfused branch, lines 214-241). The expert linear layers of that
MLP communicate nothing themselves (megatron's `explicit_expert_comm`, or a tensor-parallel
group of one), so skipping their forward skips no collective. Gradients reach each expert's
weight through the stack, so megatron's gradient buffers and hooks see them as before.

It is used on the CPU only (torch's grouped product there takes float32 and bfloat16; on CUDA
it wants bfloat16 on SM 80+, and GPUs run Transformer Engine's grouped experts), and falls
back to megatron's loop wherever the expert MLP does more than the plain math: biases, FP8 or
FP4 padding, fused or TE activations, probabilities applied on the input, delayed weight
gradients, a single local expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP


class GroupedSequentialMLP(SequentialMLP):
    """SequentialMLP whose forward is two grouped matrix products (module doc)."""

    def _grouped_applies(self, hidden_TH: torch.Tensor) -> bool:
        c = self.config
        first = self.local_experts[0]
        return (hidden_TH.device.type == "cpu" and self.num_local_experts > 1
                and first.linear_fc1.bias is None and first.linear_fc2.bias is None
                and not (c.fp8 or c.fp4) and not c.use_te_activation_func
                and not c.bias_activation_fusion and not c.moe_apply_probs_on_input
                and not c.delay_wgrad_compute)

    def _activation(self, fc1_TF: torch.Tensor) -> torch.Tensor:
        """megatron MLP's unfused activation (mlp.py lines 214-230)."""
        c = self.config
        if not c.gated_linear_unit:
            return c.activation_func(fc1_TF)  # type: ignore[no-any-return]
        gate, linear = torch.chunk(fc1_TF, 2, dim=-1)
        if (clamp := c.activation_func_clamp_value) is not None:
            gate = gate.clamp(min=None, max=clamp)
            linear = linear.clamp(min=-clamp, max=clamp)
        return c.activation_func(gate) * (linear + c.glu_linear_offset)  # type: ignore[no-any-return]

    def forward(self, permuted_local_hidden_states: torch.Tensor,
                tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor
                ) -> tuple[torch.Tensor, None]:
        """hidden [T, H] sorted by local expert, tokens_per_expert [E] (summing to T), probs
        [T]; returns the experts' outputs [T, H] in the same order (no bias)."""
        hidden_TH = permuted_local_hidden_states
        if not self._grouped_applies(hidden_TH):
            return super().forward(hidden_TH, tokens_per_expert, permuted_probs)  # type: ignore[no-any-return]
        # grouped_mm takes the end offset of each expert's rows (int32, on the rows' device)
        offsets_E = torch.cumsum(tokens_per_expert.to(hidden_TH.device), 0).to(torch.int32)
        fc1_EHF = torch.stack([e.linear_fc1.weight for e in self.local_experts]).transpose(1, 2)
        fc2_EFH = torch.stack([e.linear_fc2.weight for e in self.local_experts]).transpose(1, 2)
        intermediate_TF = self._activation(F.grouped_mm(hidden_TH, fc1_EHF, offs=offsets_E))
        # the routing probability scales each row, in the activations' dtype (mlp.py 232-235)
        intermediate_TF = (intermediate_TF * permuted_probs.unsqueeze(-1)).to(
            intermediate_TF.dtype)
        return F.grouped_mm(intermediate_TF, fc2_EFH, offs=offsets_E), None
