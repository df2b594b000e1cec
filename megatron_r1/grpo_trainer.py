"""The GRPO stage: rollout, reward, advantage, old/ref log-probs, train, sync, log, save.

Layer L3. One iteration of the loop is one rollout of prompts_per_rollout x group_size
outputs, cut at random into mini-batches of train.global_batch_size, one optimizer step each
(R1's schedule: pi_old is the policy that sampled the rollout, so the importance ratio moves
off 1 after the first mini-batch). The phases read top to bottom in `_rollout_iteration`.

The rollout engine lives on rank 0 (colocated: it sleeps while the trainer runs); what it
samples is broadcast, every rank packs the same rollout tensors (rows padded only to the
rollout's longest), and megatron_r1.batching deals every mini-batch to the data-parallel ranks
and cuts it into micro-batches (each padded to its own longest row, or packed). Every tensor
is built on the host and meets the model on its device through megatron_r1.schedule; log-probs
come back to the host, where they are compared with the engine's. After the last mini-batch
the training state may leave the accelerator (rollout.offload_train_state), the weights go to
the engine (gathered bucket by bucket) and the engine's log-probs of fixed probe sequences must
match the trainer's, or the run stops; a non-finite step is skipped and counted.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_r1.batching import MicroBatching, padding_fraction, plan_microbatches
from megatron_r1.config import Config
from megatron_r1.data.prompts import PromptExample, prompt_splits
from megatron_r1.evaluation import evaluate, reward_sample
from megatron_r1.experience import ExperienceStore
from megatron_r1.grpo import forward
from megatron_r1.grpo.advantage import group_advantages
from megatron_r1.grpo.rollout_batch import (
    RolloutTensors,
    minibatch_order,
    pack_rollout,
    train_inputs,
    train_microbatch,
)
from megatron_r1.hf_export import EngineExport
from megatron_r1.logprobs import REF_MODEL, collect_on_rank0, dense, reference_models, score_rows
from megatron_r1.model.transformer_config import TORCH_DTYPES
from megatron_r1.model.weights import copy_weights
from megatron_r1.offload import ModelOffload, TrainStateOffload
from megatron_r1.optim import gather_updated_params
from megatron_r1.plot import plot_grpo_curves
from megatron_r1.reward.code import SandboxUnavailable, check_sandbox
from megatron_r1.reward.scoring import RewardScorer, code_limits, reward_components
from megatron_r1.rollout.types import Completion, RolloutEngine, SamplingConfig
from megatron_r1.session import Session, end_session, micro_batching, run_tokenizer, start_session
from megatron_r1.train_step import NonFiniteGuard, train_step

log = logging.getLogger(__name__)

class SyncCheckError(RuntimeError):
    """The engine's log-probs disagree with the trainer's after a weight sync."""


@dataclass
class Stage:
    """What the loop carries besides the session (rank-0-only parts are None elsewhere)."""

    session: Session
    train_prompts: list[PromptExample]
    eval_prompts: list[PromptExample]
    probes: list[list[int]]
    export: EngineExport
    engine: RolloutEngine | None
    scorer: RewardScorer | None
    store: ExperienceStore | None
    how: MicroBatching
    """How steps are cut into micro-batches (train.* and the layout)."""
    guard: NonFiniteGuard
    """Counts non-finite (skipped) steps; stops the run after too many in a row."""
    train_offload: TrainStateOffload | None = None
    """rollout.offload_train_state: the optimizer state and gradients during rollout."""
    ref_offload: ModelOffload | None = None
    """grpo.offload_reference: the reference model between its uses."""

    @property
    def cfg(self) -> Config:
        return self.session.cfg

    @property
    def ref_model(self) -> list[torch.nn.Module] | None:
        return self.session.extra_models.get(REF_MODEL)

    @contextlib.contextmanager
    def reference_on_device(self) -> Iterator[None]:
        """The reference model's weights on the device for the block (grpo.offload_reference
        keeps them in host memory otherwise)."""
        if self.ref_offload is None:
            yield
        else:
            with self.ref_offload.on_device():
                yield


# ------------------------------------------------------------------ weight sync
def sync_weights(stage: Stage) -> dict[str, float]:
    """Push the policy to the engine, then check the engine against the trainer."""
    start = time.perf_counter()
    session = stage.session
    gather_updated_params(session.model)  # type: ignore[arg-type]
    buckets = stage.export.hf_buckets(session.model, session.ctx)
    if stage.engine is not None:
        stage.engine.update_weights(buckets)
    else:
        for _ in buckets:  # every bucket is collective: take part in each
            pass
    sync_s = time.perf_counter() - start
    return {"time/sync_s": sync_s, **check_sync(stage)}


def check_sync(stage: Stage) -> dict[str, float]:
    """The correctness gate: engine vs trainer log-probs on the probe sequences."""
    session, cfg = stage.session, stage.cfg
    if not stage.probes:
        return {}
    rollout = probe_rollout(stage.probes, cfg.data.seq_length)
    # one probe per micro-batch on every data-parallel rank: a plan like any other
    plans = plan_microbatches(range(len(stage.probes)), rollout.length_R.tolist(), 1,
                              MicroBatching(1, multiple_of=stage.how.multiple_of,
                                            uniform=stage.how.uniform))[0]
    trainer = collect_on_rank0(score_rows(session.model, rollout, plans, session, 1.0), session)
    verdict: list[Any] = [None]
    if session.ctx.rank == 0:
        assert stage.engine is not None
        engine = stage.engine.score(stage.probes)
        worst = 0.0
        for i in range(len(stage.probes)):
            gap = float((trainer[i] - engine[i]).abs().max())  # both on the host
            worst = max(worst, gap) if math.isfinite(gap) else math.inf  # NaN fails too
        verdict[0] = worst
    dist.broadcast_object_list(verdict, src=0)
    worst = float(verdict[0])
    atol = sync_check_atol(cfg)
    if not worst <= atol:
        raise SyncCheckError(
            f"after the weight sync the engine's log-probs differ from the trainer's by up to "
            f"{worst:.3g} nats on the probe sequences (rollout.sync_check_atol={atol} for "
            f"model.params_dtype={cfg.model.params_dtype}): the engine holds wrong weights")
    return {"sync/max_logp_diff": worst}


def sync_check_atol(cfg: Config) -> float:
    """rollout.sync_check_atol, or its default for the model's dtype (see the field)."""
    if cfg.rollout.sync_check_atol is not None:
        return cfg.rollout.sync_check_atol
    return 1e-3 if cfg.model.params_dtype == "fp32" else 0.5


def probe_rollout(probes: list[list[int]], seq_length: int) -> RolloutTensors:
    """Probe sequences as rollout rows whose every token after the first is scored."""
    groups = [[Completion(token_ids=tuple(p[1:]), logprobs=(0.0,) * (len(p) - 1), text="",
                          finish_reason="stop")] for p in probes]
    return pack_rollout([p[:1] for p in probes], groups, seq_length, pad_id=0)


# ------------------------------------------------------------------ one rollout
def _sample(stage: Stage, rollout_index: int) -> tuple[list[PromptExample], Any]:
    """Rank 0 samples and scores; everyone receives the result."""
    cfg = stage.cfg
    p = cfg.grpo.prompts_per_rollout
    order = torch.randperm(len(stage.train_prompts),
                           generator=torch.Generator().manual_seed(cfg.data.seed + rollout_index))
    prompts = [stage.train_prompts[int(i)] for i in order[:p]]
    payload: list[Any] = [None]
    if stage.session.ctx.rank == 0:
        assert stage.engine is not None and stage.scorer is not None
        start = time.perf_counter()
        stage.engine.wake_up()
        groups = stage.engine.generate(
            [q.prompt_ids for q in prompts],
            SamplingConfig(n=cfg.grpo.group_size, temperature=cfg.rollout.temperature,
                           top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens,
                           seed=cfg.train.seed * 7919 + rollout_index))
        stage.engine.sleep()
        generate_s = time.perf_counter() - start
        texts = [c.text for g in groups for c in g]
        samples = [reward_sample(q, cfg.reward.target_language)
                   for q in prompts for _ in range(cfg.grpo.group_size)]
        rewards = stage.scorer.score(texts, samples)
        payload[0] = (groups, rewards, generate_s)
    dist.broadcast_object_list(payload, src=0)
    return prompts, payload[0]


def _rollout_iteration(stage: Stage, rollout_index: int, step: int, bar: tqdm, *,
                       save: bool) -> int:
    """One rollout: sample, score, advantages, log-probs, one optimizer step per mini-batch,
    experience store, checkpoint (when `save`), offload, weight sync. Returns the step."""
    session, cfg, ctx = stage.session, stage.cfg, stage.session.ctx
    timings: dict[str, float] = {}
    sampled_at = step  # the policy version that samples this rollout

    # 1. rollout and rewards (rank 0), broadcast
    prompts, (groups, rewards, timings["time/generate_s"]) = _sample(stage, rollout_index)
    rollout = pack_rollout([q.prompt_ids for q in prompts], groups, cfg.data.seq_length,
                           pad_id=stage.export.pad_id)

    # 2. advantages
    adv = group_advantages(rewards.total_N, rewards.components_N["accuracy"] > 0.5,
                           cfg.grpo.group_size, std_normalize=cfg.grpo.std_normalize)

    # 3. every rank's micro-batches of every mini-batch, then old (and reference) log-probs
    #    of this rank's rows, before any update
    start = time.perf_counter()
    minibatches = minibatch_order(len(rollout), cfg.train.global_batch_size,
                                  seed=cfg.train.seed, rollout_index=rollout_index)
    plans = [plan_microbatches(idx.tolist(), rollout.length_R[idx].tolist(), ctx.layout.data,
                               stage.how, uniform_length=int(rollout.length_R.max()))
             for idx in minibatches]
    mine = [every_rank[ctx.dp_rank] for every_rank in plans]
    all_mine = [plan for per_step in mine for plan in per_step]
    temperature = cfg.rollout.temperature
    old = score_rows(session.model, rollout, all_mine, session, temperature)
    ref = old
    if stage.ref_model is not None:
        with stage.reference_on_device():
            ref = score_rows(stage.ref_model, rollout, all_mine, session, temperature)
    shape = rollout.tokens_RS.shape
    inputs = train_inputs(rollout, adv.advantages_R, dense(old, shape), dense(ref, shape),
                          cfg.grpo.loss_aggregation, cfg.rollout.max_new_tokens)
    timings["time/logp_s"] = time.perf_counter() - start
    lengths = dict(enumerate(rollout.length_R.tolist()))

    # 4. one optimizer step per mini-batch
    loss_step = forward.loss_step(cfg.grpo, temperature, ctx.tp_group)
    rollout_metrics = {
        **rewards.metrics, **adv.metrics, **timings,
        "response/length_mean": float(rollout.completion_len_R.float().mean()),
        "response/truncated": float(sum(c.finish_reason == "length"
                                        for g in groups for c in g) / len(rollout)),
        "batch/padding_fraction": padding_fraction([p for m in plans for p in m], lengths),
        "batch/microbatches_per_step": len(all_mine) / len(minibatches),
        "rollout": float(rollout_index)}
    if stage.train_offload is not None:
        rollout_metrics.update(stage.train_offload.restore())
    for m in range(len(minibatches)):
        batches = [train_microbatch(rollout, plan, inputs) for plan in mine[m]]
        result = train_step(session.model, session.optimizer, session.scheduler, batches,
                            loss_step, forward.LOSS_METRICS, ctx)
        step += 1
        logged = {k: v for k, v in result.metrics.items() if math.isfinite(v)}
        logged.update(stage.guard.observe(step, result))
        if stage.ref_model is not None and cfg.grpo.ref_update_interval and \
                step % cfg.grpo.ref_update_interval == 0:
            gather_updated_params(session.model)  # type: ignore[arg-type]
            with stage.reference_on_device():
                copy_weights(session.model, stage.ref_model)
            logged["ref/refreshed"] = 1.0
        due = step % cfg.logging.log_interval == 0 or step == cfg.train.steps
        row = {**(logged if due or result.nonfinite else {}),
               **(rollout_metrics if m == 0 else {})}
        if row:
            session.metrics.log(step, row)
        bar.set_postfix(reward=f"{rewards.metrics['reward/total_mean']:.2f}",
                        kl=f"{result.metrics['kl']:.4f}")
        bar.update(1)

    # 5. experience store (rank 0)
    old0, ref0 = collect_on_rank0(old, session), collect_on_rank0(ref, session)
    if stage.store is not None:
        width = cfg.data.seq_length
        columns = {
            "rollout": torch.full((len(rollout),), rollout_index),
            "prompt_index": rollout.prompt_index_R, "prompt_len": rollout.prompt_len_R,
            "completion_len": rollout.completion_len_R,
            "tokens": _widen(rollout.tokens_RS, width),
            "labels": _widen(rollout.labels_RS, width),
            "loss_mask": _widen(rollout.loss_mask_RS, width).bool(),
            "old_logp": _widen(dense(old0, shape), width),
            "ref_logp": _widen(dense(ref0, shape), width),
            "sampler_logp": _widen(rollout.sampler_logp_RS, width), "reward": rewards.total_N,
            "advantage": adv.advantages_R,
            **{f"reward_{k}": v for k, v in rewards.components_N.items()},
        }
        stage.store.append(sampled_at, columns)

    # 6. checkpoint (with the training state still on the device), then offload
    if save:
        holder = [len(stage.store) if stage.store is not None else 0]
        dist.broadcast_object_list(holder, src=0)
        with stage.reference_on_device():
            session.save(step, {"experience_rows": holder[0]})
    after: dict[str, float] = {}
    if stage.train_offload is not None:
        after.update(stage.train_offload.offload())
    if stage.ref_offload is not None:
        after.update({"offload/reference_gb": stage.ref_offload.nbytes / 1e9,
                      "offload/reference_s": stage.ref_offload.pop_seconds()})

    # 7. weights to the engine, checked
    after.update(sync_weights(stage))
    session.metrics.log(step, after)
    return step


def _widen(values_RS: torch.Tensor, width: int) -> torch.Tensor:
    """[R, width]: rows padded with zeros (the experience store's fixed data.seq_length)."""
    return torch.nn.functional.pad(values_RS, (0, width - values_RS.shape[1]))


# ------------------------------------------------------------------ the stage
def _probe_sequences(prompts: list[PromptExample], count: int, tokenizer: Any) -> list[list[int]]:
    """Fixed sequences for the sync check: held-out prompts with a short continuation."""
    probes = []
    for q in prompts[:count]:
        tail = tokenizer(" <think> 1 + 1 = 2 </think> <answer> 2 </answer>",
                         add_special_tokens=False)["input_ids"]
        probes.append([*q.prompt_ids, *tail])
    return probes


def open_stage(cfg: Config, *, training: bool = True) -> Stage:
    """Start the session, the prompts, and on rank 0 the engine and the reward scorer (the
    experience store too when `training`); the engine holds dummy weights until the first
    `sync_weights`. Collective; pair with `close_stage`."""
    session = start_session(cfg, extra_models=reference_models(cfg) if training else None)
    ctx = session.ctx
    if session.extra_models and not session.resumed:
        copy_weights(session.model, session.extra_models[REF_MODEL])  # pi_ref = initial policy
    tokenizer = run_tokenizer(session)
    train_prompts, eval_prompts = prompt_splits(cfg.data, tokenizer)
    longest = max(len(q.prompt_ids) for q in train_prompts + eval_prompts)
    if longest + cfg.rollout.max_new_tokens > cfg.data.seq_length + 1:
        raise ValueError(f"data.seq_length={cfg.data.seq_length} cannot hold the longest prompt "
                         f"({longest} tokens) plus rollout.max_new_tokens="
                         f"{cfg.rollout.max_new_tokens}")
    export = EngineExport(cfg.model, tokenizer, bucket_bytes=cfg.rollout.sync_bucket_mb << 20)
    engine = scorer = store = train_offload = ref_offload = None
    if ctx.rank == 0 and any(q.tests for q in train_prompts + eval_prompts):
        _check_code_rewards(cfg)
    if ctx.rank == 0:
        from megatron_r1.rollout.vllm_engine import VLLMEngine

        model_dir = export.write_engine_dir(session.run_dir / "engine_model")
        engine = VLLMEngine(model_dir, cfg.rollout, max_model_len=cfg.data.seq_length + 1,
                            seed=cfg.train.seed, dtype=TORCH_DTYPES[cfg.model.params_dtype],
                            load_format="dummy")
        scorer = RewardScorer.from_config(cfg.reward, num_workers=cfg.reward.num_workers)
    if ctx.rank == 0 and training:
        store = ExperienceStore(session.run_dir / "experience.zarr", cfg.data.seq_length,
                                [c.name for c in reward_components(cfg.reward)])
    probes = _probe_sequences(eval_prompts or train_prompts, cfg.rollout.sync_check_sequences,
                              tokenizer)
    if training and cfg.rollout.offload_train_state:
        train_offload = TrainStateOffload(session.model, session.optimizer,  # type: ignore[arg-type]
                                          ctx.device)
    if session.extra_models and cfg.grpo.offload_reference:
        ref_offload = ModelOffload(session.extra_models[REF_MODEL], ctx.device)
        ref_offload.offload()
    return Stage(session=session, train_prompts=train_prompts, eval_prompts=eval_prompts,
                 probes=probes, export=export, engine=engine, scorer=scorer, store=store,
                 how=micro_batching(cfg, ctx.layout), train_offload=train_offload,
                 ref_offload=ref_offload, guard=NonFiniteGuard(cfg.train.max_consecutive_nonfinite))


def _check_code_rewards(cfg: Config) -> None:
    """Before any rollout: code prompts need a working sandbox, and a reward time limit that
    lets at least one test finish (the limit bounds all of a prompt's tests together)."""
    one_test = 2 * cfg.reward.code_time_s + 1
    if cfg.reward.timeout_s < one_test:
        raise ValueError(f"reward.timeout_s={cfg.reward.timeout_s}: the prompts hold code tests, "
                         f"and one test may take {one_test:g} s (2 x reward.code_time_s + 1); "
                         "raise reward.timeout_s to cover all tests of a prompt")
    try:
        check_sandbox(code_limits(cfg.reward))
    except SandboxUnavailable as err:
        raise ValueError(f"data.path={cfg.data.path!r} holds code prompts, but {err}") from err


def _evaluate(stage: Stage, step: int) -> dict[str, float]:
    """Held-out pass@1 / cons@k on rank 0; logged and returned on every rank."""
    cfg = stage.cfg
    result: list[Any] = [None]
    if stage.session.ctx.rank == 0 and stage.eval_prompts:
        assert stage.engine is not None and stage.scorer is not None
        stage.engine.wake_up()
        result[0] = evaluate(stage.engine, stage.eval_prompts, stage.scorer,
                             k=cfg.eval.samples_per_question, temperature=cfg.eval.temperature,
                             top_p=cfg.eval.top_p,
                             max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                             seed=cfg.train.seed,
                             target_language=cfg.reward.target_language).metrics()
        stage.engine.sleep()
    dist.broadcast_object_list(result, src=0)
    metrics = result[0] or {}
    if metrics:
        stage.session.metrics.log(step, metrics)
    return metrics


def run_grpo(cfg: Config) -> dict[str, float]:
    """Train GRPO for train.steps optimizer steps; return held-out metrics before and after."""
    stage = open_stage(cfg)
    try:
        return _train(stage)
    finally:
        close_stage(stage)


def close_stage(stage: Stage) -> None:
    """Stop the scorer and the engine, flush the metrics, tear the process groups down."""
    if stage.scorer is not None:
        stage.scorer.close()
    if stage.engine is not None:
        stage.engine.close()
    end_session(stage.session)


def run_eval(cfg: Config) -> dict[str, float]:
    """pass@1 / cons@k of the policy in checkpoint.load_dir (or the run's own latest)."""
    stage = open_stage(cfg, training=False)
    try:
        sync_weights(stage)
        return _evaluate(stage, stage.session.start_step)
    finally:
        close_stage(stage)


def _train(stage: Stage) -> dict[str, float]:
    session, cfg = stage.session, stage.cfg
    rollout_size = cfg.grpo.group_size * cfg.grpo.prompts_per_rollout
    steps_per_rollout = rollout_size // cfg.train.global_batch_size
    step = session.start_step
    if step % steps_per_rollout:
        raise ValueError(f"checkpoint at step {step} is not at a rollout boundary (every "
                         f"{steps_per_rollout} steps)")
    if stage.store is not None:  # rows sampled after the checkpoint are sampled again
        done = session.trainer_state.get("experience_rows", 0)
        stage.store.truncate(done)
    summary: dict[str, float] = {}
    sync = sync_weights(stage)  # the engine starts with dummy weights
    session.metrics.log(step, sync)
    before = _evaluate(stage, step)
    summary.update({f"start/{k}": v for k, v in before.items()})
    last = min(cfg.train.steps, cfg.train.stop_at_step or cfg.train.steps)
    bar = tqdm(total=last, initial=step, desc="grpo", unit="step",
               disable=not (session.is_logging_rank and cfg.logging.progress_bar))
    interval = cfg.checkpoint.save_interval
    while step + steps_per_rollout <= last:
        previous, upcoming = step, step + steps_per_rollout
        save = bool(interval and upcoming // interval > previous // interval) or \
            upcoming + steps_per_rollout > last
        step = _rollout_iteration(stage, step // steps_per_rollout, step, bar, save=save)
        if cfg.eval.interval and step // cfg.eval.interval > previous // cfg.eval.interval:
            _evaluate(stage, step)
    bar.close()
    after = _evaluate(stage, step)
    summary.update({f"end/{k}": v for k, v in after.items()})
    if session.is_logging_rank:
        plot_grpo_curves(session.metrics.path, Path(session.run_dir) / "grpo_curves.png")
    return summary
