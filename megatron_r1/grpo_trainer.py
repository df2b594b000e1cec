"""The GRPO stage: rollout, reward, advantage, old/ref log-probs, train, sync, log, save.

Layer L3. One iteration of the loop is one rollout of prompts_per_rollout x group_size
outputs, cut at random into mini-batches of train.global_batch_size, one optimizer step each
(R1's schedule: pi_old is the policy that sampled the rollout, so the importance ratio moves
off 1 after the first mini-batch). The phases read top to bottom in `_rollout_iteration`.

Rollout engines live beside the trainer ranks, one per engine group (rollout/placement.py;
colocated: they sleep while the trainer runs). Each group's engine generates and scores its
block of the rollout's prompts (rollout/dispatch.py); megatron_r1.batching plans every
mini-batch's micro-batches for every data-parallel rank from the rows' lengths alone, and each
rank then receives, as tensors, only the rows it trains. Every tensor is built on the host and
meets the model on its device through megatron_r1.schedule; log-probs come back to the host.
After the last mini-batch the training state may leave the accelerator
(rollout.offload_train_state; also before the engines start, so that they start and the first
rollout runs beside the weights alone), the weights go to every engine group and every engine's
log-probs of fixed probe sequences must match the trainer's, or the run stops
(megatron_r1.weight_sync); a non-finite step is skipped and counted.

Train/rollout consistency (MoE above all): every rollout logs how far the trainer's old
log-probs lie from the engine's (grpo/mismatch.py); grpo.tis_imp_ratio_cap and
grpo.seq_mask_low/high correct the loss for the gap; grpo.routing_replay makes the trainer's
forward passes route like the old pass (r2) or like the engine (r3), through megatron-core's
RouterReplay (model/routing_replay.py), the ids following the rows into every micro-batch.

All-scenario RL (R1 stage 4): each prompt has a kind; the rule rewards score the kinds of
reward.rule_kinds, and the reward models of reward.models (trained by `megatron-r1 rm`) the
others, forward only on the trainer's ranks between generation and advantages
(reward_serving.py); metrics are logged per kind (reward/kinds.py). Held-out pass@1 is measured
on the rule-verified prompts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_r1.batching import (
    MicroBatching,
    MicroBatchPlan,
    padding_fraction,
    plan_microbatches,
    split_rows,
)
from megatron_r1.config import Config
from megatron_r1.data.prompts import PromptExample, prompt_splits
from megatron_r1.evaluation import EvalResult, evaluate
from megatron_r1.experience import ExperienceStore, ragged_rows, write_rollout
from megatron_r1.grpo import forward
from megatron_r1.grpo.mismatch import (
    Correction,
    mismatch_metrics,
    mismatch_partials,
    no_partials,
)
from megatron_r1.grpo.rollout_batch import (
    RolloutTensors,
    minibatch_order,
    train_inputs,
    train_microbatch,
)
from megatron_r1.hf_export import EngineExport
from megatron_r1.logprobs import REF_MODEL, dense, reference_models, score_rows
from megatron_r1.metrics import count_nonfinite
from megatron_r1.model.routing_replay import RoutingReplay
from megatron_r1.model.transformer_config import TORCH_DTYPES, moe_layer_pattern
from megatron_r1.model.weights import copy_weights
from megatron_r1.offload import ModelOffload, TrainStateOffload
from megatron_r1.optim import gather_updated_params
from megatron_r1.parallel.init import new_wait_group
from megatron_r1.plot import plot_grpo_curves
from megatron_r1.reward.code import SandboxUnavailable, check_sandbox
from megatron_r1.reward.kinds import RewardRouting, check_prompt_kinds
from megatron_r1.reward.scoring import RewardScorer, code_limits
from megatron_r1.reward_serving import (
    ServedRewardModel,
    load_reward_models,
    offload_seconds,
    score_rollout,
)
from megatron_r1.rollout import dispatch
from megatron_r1.rollout.engine_nodes import HeadlessWorkers, engine_nodes
from megatron_r1.rollout.placement import Placement, resolve_placement, split_prompts
from megatron_r1.rollout.types import RolloutEngine, SamplingConfig
from megatron_r1.session import Session, end_session, micro_batching, run_tokenizer, start_session
from megatron_r1.train_step import NonFiniteGuard, train_step
from megatron_r1.weight_sync import SyncCheckError, check_engines, push_weights

log = logging.getLogger(__name__)

__all__ = ["Stage", "SyncCheckError", "check_sync", "close_stage", "open_stage", "run_eval",
           "run_grpo", "sync_weights"]

EXPERIENCE = "experience.zarr"
"""The experience store's directory in the run directory (megatron_r1.experience)."""


@dataclass
class Stage:
    """What the loop carries besides the session (engine and scorer exist on the engine
    groups' leaders, the store on rank 0; None elsewhere)."""

    session: Session
    train_prompts: list[PromptExample]
    eval_prompts: list[PromptExample]
    probes: list[list[int]]
    export: EngineExport
    placement: Placement
    """The engine groups."""
    dp_ranks: list[int]
    """The data-parallel rank of every global rank (who trains which rows)."""
    rewards: RewardRouting
    """The reward components (rule rewards, then reward models) and the prompt kinds each
    scores; their names are the per-row columns of the rollout and the store."""
    engine: RolloutEngine | None
    scorer: RewardScorer | None
    store: ExperienceStore | None
    """On rank 0: the experience store's schema, commit log and resume truncation (every
    writer appends its own rows: `_store_rollout`)."""
    how: MicroBatching
    """How steps are cut into micro-batches (train.* and the layout)."""
    guard: NonFiniteGuard
    """Counts non-finite (skipped) steps; stops the run after too many in a row."""
    train_offload: TrainStateOffload | None = None
    """rollout.offload_train_state: the optimizer state and gradients during rollout."""
    ref_offload: ModelOffload | None = None
    """grpo.offload_reference: the reference model between its uses."""
    routing: RoutingReplay | None = None
    """grpo.routing_replay: record/replay of the policy's MoE routing."""
    ref_routing: RoutingReplay | None = None
    """The same for the reference model (it replays what the policy replays)."""
    reward_models: list[ServedRewardModel] = dataclasses.field(default_factory=list)
    """reward.models, on every rank (forward only, host memory between uses)."""
    node_workers: HeadlessWorkers | None = None
    """On the other node hosts of an engine wider than a node: this node's workers."""
    wait: dispatch.EngineWait = dataclasses.field(
        default_factory=lambda: dispatch.EngineWait(None, 0.0))
    """Where every rank waits for the engines to finish generating (on the host, within
    rollout.engine_wait_minutes, not inside an NCCL collective)."""

    @property
    def components(self) -> tuple[str, ...]:
        return self.rewards.names

    @property
    def pass_at_1_prompts(self) -> list[PromptExample]:
        """The held-out prompts evaluation scores: those the rule rewards verify (a general
        prompt has no reference answer)."""
        return [q for q in self.eval_prompts if q.kind in self.rewards.rule_kinds]

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

    @property
    def routing_shape(self) -> tuple[int, int] | None:
        return _routing_shape(self.cfg)


def _routing_shape(cfg: Config) -> tuple[int, int] | None:
    """(MoE layers, top_k) of the engine's routing that the rows carry (r3), else None."""
    if cfg.grpo.routing_replay != "r3":
        return None
    return sum(moe_layer_pattern(cfg.model)), cfg.model.moe_router_topk


# ------------------------------------------------------------------ weight sync
def sync_weights(stage: Stage) -> dict[str, float]:
    """Push the policy to every engine group, then check every engine against the trainer."""
    return {**push_weights(stage.session, stage.export, stage.engine, stage.placement,
                           stage.node_workers),
            **check_sync(stage)}


def check_sync(stage: Stage) -> dict[str, float]:
    """The correctness gate on every engine (megatron_r1.weight_sync.check_engines)."""
    return check_engines(stage.session, stage.engine, stage.placement, stage.probes, stage.how,
                         sync_check_atol(stage.cfg))


def sync_check_atol(cfg: Config) -> float:
    """rollout.sync_check_atol, or its default for the model's dtype (see the field)."""
    if cfg.rollout.sync_check_atol is not None:
        return cfg.rollout.sync_check_atol
    return 1e-3 if cfg.model.params_dtype == "fp32" else 0.5


# ------------------------------------------------------------------ one rollout
def _sample(stage: Stage, rollout_index: int) -> dispatch.Generated:
    """Every engine group generates and scores its block of this rollout's prompts."""
    cfg = stage.cfg
    order = torch.randperm(len(stage.train_prompts),
                           generator=torch.Generator().manual_seed(cfg.data.seed + rollout_index))
    prompts = [stage.train_prompts[int(i)] for i in order[:cfg.grpo.prompts_per_rollout]]
    sampling = SamplingConfig(n=cfg.grpo.group_size, temperature=cfg.rollout.temperature,
                              top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens,
                              seed=cfg.train.seed * 7919 + rollout_index,
                              return_routing=stage.routing_shape is not None)
    session, models = stage.session, stage.reward_models
    return dispatch.generate_rollout(
        stage.engine, stage.scorer, stage.placement, prompts, sampling, rewards=stage.rewards,
        target_language=cfg.reward.target_language, std_normalize=cfg.grpo.std_normalize,
        routing_shape=stage.routing_shape, readers=[s.reader for s in models],
        score_models=lambda generated: score_rollout(models, generated, session,
                                                     stage.dp_ranks), wait=stage.wait)


def _replaying(routing: RoutingReplay | None) -> contextlib.AbstractContextManager[None]:
    return routing.replaying() if routing is not None else contextlib.nullcontext()


def old_from_first_forward(cfg: Config) -> bool:
    """Whether the rollout's first mini-batch takes its old log-probs from its own training
    forward instead of the old pass (grpo/forward.py OLD_FROM_FORWARD): pi_old is still the
    policy then. Not when a correction needs them before the loss (TIS, masking), nor under
    r2 routing replay, whose old pass records the routing every later pass replays."""
    correction = Correction(cfg.grpo.tis_imp_ratio_cap, cfg.grpo.seq_mask_low,
                            cfg.grpo.seq_mask_high)
    return not correction.enabled and cfg.grpo.routing_replay != "r2"


def _old_and_ref_logp(stage: Stage, rollout: RolloutTensors, old_plans: list[MicroBatchPlan],
                      plans: list[MicroBatchPlan], engine_routing_RSLK: torch.Tensor | None
                      ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor],
                                 torch.Tensor | None]:
    """The old log-probs of the rows `old_plans` hold and the reference log-probs of all
    this rank's rows (`plans`), before any update, and the MoE expert ids the training passes
    replay (None without routing replay): r2 records the old pass's own routing, r3 replays
    the engine's in the old pass already; the reference pass replays the same ids, so that
    its KL compares the same routed computation."""
    session, cfg = stage.session, stage.cfg
    temperature = cfg.rollout.temperature
    replay = cfg.grpo.routing_replay
    routing_RSLK = engine_routing_RSLK if replay == "r3" else None
    if replay == "r2":
        assert stage.routing is not None and old_plans == plans
        with stage.routing.recording():
            old = score_rows(session.model, rollout, plans, session, temperature,
                             routing=stage.routing)
        routing_RSLK = stage.routing.recorded_table(*rollout.tokens_RS.shape)
    elif old_plans:  # none when the rollout is one mini-batch whose forward gives them
        with _replaying(stage.routing):
            old = score_rows(session.model, rollout, old_plans, session, temperature,
                             routing=stage.routing, routing_RSLK=routing_RSLK)
    else:
        old = {}
    ref = old  # no reference model: the same dict, so rows added to old later are ref's too
    if stage.ref_model is not None:
        with stage.reference_on_device(), _replaying(stage.ref_routing):
            ref = score_rows(stage.ref_model, rollout, plans, session, temperature,
                             routing=stage.ref_routing, routing_RSLK=routing_RSLK)
    return old, ref, routing_RSLK


def _mismatch(stage: Stage, rollout: RolloutTensors, old_RS: torch.Tensor,
              correction: Correction) -> dict[str, float]:
    """The rollout's train/rollout mismatch metrics over every rank's rows (grpo/mismatch.py):
    each last-stage rank of TP rank 0 holds its data-parallel rank's old log-probs."""
    ctx = stage.session.ctx
    sums, maxima = no_partials()
    if ctx.is_last_stage and ctx.tp_rank == 0:
        sums, maxima = mismatch_partials(old_RS, rollout.sampler_logp_RS, rollout.loss_mask_RS,
                                         threshold=stage.cfg.grpo.mismatch_threshold,
                                         correction=correction)
    if dist.get_world_size() > 1:
        sums, maxima = sums.to(dispatch.comm_device()), maxima.to(dispatch.comm_device())
        dist.all_reduce(sums)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    return mismatch_metrics(sums.cpu(), maxima.cpu(), top_p=stage.cfg.rollout.top_p,
                            correction=correction)


def _old_logp_of(batches: list[dict[str, Any]], outputs: list[dict[str, Any]]
                 ) -> dict[int, torch.Tensor]:
    """The old log-probs the first mini-batch's training forward returned (host, float32
    [length_R[r]] per row; last-stage ranks, empty elsewhere), as score_rows returns them."""
    scores: dict[int, torch.Tensor] = {}
    for batch, out in zip(batches, outputs):
        rows = split_rows(out["old_logp"].float().cpu(), batch)
        scores.update(zip(batch["rows"].tolist(), rows))
    return scores


def _rows_of(plans: list[list[list[MicroBatchPlan]]], dp_rank: int) -> list[int]:
    """Every row a data-parallel rank trains in this rollout, in plan order."""
    return [r for every_rank in plans for plan in every_rank[dp_rank] for r in plan.rows]


def _localize(plan: MicroBatchPlan, index: dict[int, int]) -> MicroBatchPlan:
    """The plan over this rank's rows (local indices) instead of the rollout's."""
    return dataclasses.replace(plan, rows=tuple(index[r] for r in plan.rows))


def _rollout_iteration(stage: Stage, rollout_index: int, step: int, bar: tqdm, *,
                       save: bool) -> int:
    """One rollout: sample, score, advantages, log-probs, one optimizer step per mini-batch,
    experience store, checkpoint (when `save`), offload, weight sync. Returns the step."""
    session, cfg, ctx = stage.session, stage.cfg, stage.session.ctx
    timings: dict[str, float] = {}
    sampled_at = step  # the policy version that samples this rollout

    # 1. rollout, rewards and group advantages: every engine group its block of prompts
    generated = _sample(stage, rollout_index)
    length_R = generated.length_R
    width = int(length_R.max())

    # 2. every rank's micro-batches of every mini-batch (from the rows' lengths alone), then
    #    this rank's rows, received from the engine groups that produced them
    start = time.perf_counter()
    minibatches = minibatch_order(len(length_R), cfg.train.global_batch_size,
                                  seed=cfg.train.seed, rollout_index=rollout_index)
    plans = [plan_microbatches(idx.tolist(), length_R[idx].tolist(), ctx.layout.data,
                               stage.how, uniform_length=width)
             for idx in minibatches]
    local = dispatch.receive_rows(generated, [_rows_of(plans, dp) for dp in stage.dp_ranks],
                                  width=width, group_size=cfg.grpo.group_size,
                                  pad_id=stage.export.pad_id)
    rollout, index = local.rollout, local.local_index()
    mine = [[_localize(plan, index) for plan in every_rank[ctx.dp_rank]] for every_rank in plans]
    all_mine = [plan for per_step in mine for plan in per_step]
    timings["time/dispatch_s"] = time.perf_counter() - start

    # 3. old and reference log-probs of this rank's rows, before any update (the first
    #    mini-batch's old ones come from its own training forward where that is exact), and
    #    the loss's correction for the train/rollout gap
    start = time.perf_counter()
    temperature = cfg.rollout.temperature
    first_own = old_from_first_forward(cfg)
    old_plans = [plan for per_step in mine[1 if first_own else 0:] for plan in per_step]
    old, ref, routing_RSLK = _old_and_ref_logp(stage, rollout, old_plans, all_mine,
                                               local.routing_RSLK)
    shape = rollout.tokens_RS.shape
    correction = Correction(cfg.grpo.tis_imp_ratio_cap, cfg.grpo.seq_mask_low,
                            cfg.grpo.seq_mask_high)
    # (the first mini-batch's rows are 0 here when first_own; no correction reads them then)
    inputs = train_inputs(rollout, local.scalars[:, 0].float(), dense(old, shape),
                          dense(ref, shape), cfg.grpo.loss_aggregation,
                          cfg.rollout.max_new_tokens, correction, routing_RSLK)
    timings["time/logp_s"] = time.perf_counter() - start
    lengths = dict(enumerate(length_R.tolist()))

    # 4. one optimizer step per mini-batch; after the first, every row's old log-probs are
    #    known: how far they lie from the engine's
    loss_step = forward.loss_step(cfg.grpo, temperature, ctx.tp_group, stage.routing)
    rollout_metrics = {
        **generated.metrics, **timings,
        "batch/padding_fraction": padding_fraction([p for m in plans for p in m], lengths),
        "batch/microbatches_per_step": len(all_mine) / len(minibatches),
        "rollout": float(rollout_index)}
    if stage.train_offload is not None:
        rollout_metrics.update(stage.train_offload.restore())
    for m in range(len(minibatches)):
        batches = [train_microbatch(rollout, plan, inputs) for plan in mine[m]]
        for batch in batches:
            batch[forward.OLD_FROM_FORWARD] = m == 0 and first_own
            batch[forward.REF_IS_OLD] = stage.ref_model is None
        with _replaying(stage.routing):
            result = train_step(session.model, session.optimizer, session.scheduler, batches,
                                loss_step, forward.LOSS_METRICS, ctx)
        if m == 0:
            if first_own:
                old.update(_old_logp_of(batches, result.outputs))
            rollout_metrics.update(_mismatch(stage, rollout, dense(old, shape), correction))
        step += 1
        logged = count_nonfinite(result.metrics)  # NaN/inf logged as null, counted
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
        bar.set_postfix(reward=f"{generated.metrics['reward/total_mean']:.2f}",
                        kl=f"{result.metrics['kl']:.4f}")
        bar.update(1)

    # 5. experience store: every data-parallel rank's writer stores the rows it trained
    stored = _store_rollout(stage, local, old, ref, rollout_index=rollout_index,
                            sampled_at=sampled_at, rows=len(length_R))

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
    after.update(offload_seconds(stage.reward_models))

    # 7. weights to every engine group, every engine checked
    after.update(sync_weights(stage))
    session.metrics.log(step, {**after, **stored})
    return step


def _store_rollout(stage: Stage, local: dispatch.LocalRows, old: dict[int, torch.Tensor],
                   ref: dict[int, torch.Tensor], *, rollout_index: int, sampled_at: int,
                   rows: int) -> dict[str, float]:
    """Each data-parallel rank's rows into the experience store, written by the rank that
    holds all of them: its last pipeline stage's TP rank 0 (it received the rows and the
    engine's routing to train them, and computed their old and reference log-probs). Rows
    stay where they are; rank 0 commits the rollout once every writer is done. Collective;
    returns `time/store_s` (the slowest writer)."""
    ctx = stage.session.ctx
    part = None
    if ctx.is_last_stage and ctx.tp_rank == 0:
        rollout, mine = local.rollout, range(len(local.rows))
        per_token: dict[str, torch.Tensor | list[torch.Tensor]] = {
            "tokens": rollout.tokens_RS, "labels": rollout.labels_RS,
            "loss_mask": rollout.loss_mask_RS.bool(), "old_logp": [old[i] for i in mine],
            "ref_logp": [ref[i] for i in mine], "sampler_logp": rollout.sampler_logp_RS}
        if local.routing_RSLK is not None:
            per_token["routing"] = local.routing_RSLK
        names = dispatch.scalar_names(stage.components)
        part = ragged_rows(rollout.length_R, per_token, {
            "row": local.rows, "rollout": rollout_index, "prompt_index": rollout.prompt_index_R,
            "prompt_len": rollout.prompt_len_R, "completion_len": rollout.completion_len_R,
            **{name: local.scalars[:, k].float() for k, name in enumerate(names)}})
    return write_rollout(stage.session.run_dir / EXPERIENCE, stage.store,
                         writer=f"rank{ctx.rank:05d}", part=part, rollout=rollout_index,
                         step=sampled_at, rows=rows)


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
    """Start the session, the prompts, on every engine group's leader its engine and reward
    scorer, and on rank 0 the experience store when `training`; engines hold dummy weights
    until the first `sync_weights`. The optimizer state, gradients (rollout.offload_train_state)
    and reference model (grpo.offload_reference) leave the device before the engines start.
    Collective; pair with `close_stage`."""
    session = start_session(cfg, extra_models=reference_models(cfg) if training else None)
    ctx = session.ctx
    wait = dispatch.EngineWait(new_wait_group(cfg.rollout.engine_wait_minutes),
                               cfg.rollout.engine_wait_minutes)
    placement = resolve_placement(cfg.rollout, ctx.layout.world_size, ctx.launch.local_world_size)
    group = placement.group_of(ctx.rank)
    nodes = engine_nodes(placement, ctx.rank, cfg.rollout.engine_wait_minutes)
    dp_ranks: list[Any] = [None] * ctx.layout.world_size
    dist.all_gather_object(dp_ranks, ctx.dp_rank)
    if session.extra_models and not session.resumed:
        copy_weights(session.model, session.extra_models[REF_MODEL])  # pi_ref = initial policy
    tokenizer = run_tokenizer(session)
    train_prompts, eval_prompts = prompt_splits(cfg.data, tokenizer)
    longest = max(len(q.prompt_ids) for q in train_prompts + eval_prompts)
    if longest + cfg.rollout.max_new_tokens > cfg.data.seq_length + 1:
        raise ValueError(f"data.seq_length={cfg.data.seq_length} cannot hold the longest prompt "
                         f"({longest} tokens) plus rollout.max_new_tokens="
                         f"{cfg.rollout.max_new_tokens}")
    rewards = _check_kinds(cfg, train_prompts, eval_prompts)
    reward_models = load_reward_models(cfg, session) if training else []  # before the engines
    export = EngineExport(cfg.model, tokenizer, bucket_bytes=cfg.rollout.sync_bucket_mb << 20)
    components = rewards.names
    engine = scorer = store = None
    if ctx.rank == group.leader and any(q.tests for q in train_prompts + eval_prompts):
        _check_code_rewards(cfg)
    # What the config keeps off the device leaves it before the engines start: vLLM refuses
    # to start unless gpu_memory_utilization x the device's memory is free
    # (vllm/v1/worker/utils.py, around line 761), and the first sync and rollout run next.
    train_offload = ref_offload = None
    if training and cfg.rollout.offload_train_state:
        train_offload = TrainStateOffload(session.model, session.optimizer,  # type: ignore[arg-type]
                                          ctx.device)
        train_offload.offload()  # restored before the first optimizer step
    if session.extra_models and cfg.grpo.offload_reference:
        ref_offload = ModelOffload(session.extra_models[REF_MODEL], ctx.device)
        ref_offload.offload()
    node_workers = None
    if nodes is not None:  # this rank starts engine workers: the leader, or another node's host
        from megatron_r1.rollout.vllm_engine import (
            VLLMEngine,
            engine_environment,
            start_environment,
            vllm_arguments,
        )

        # each node its own copy (config and tokenizer: no shared file system assumed)
        model_dir = export.write_engine_dir(
            session.run_dir / "engine_model" /
            (f"group{group.index}" + (f"_node{nodes.node}" if nodes.node else "")))
        args = dict(max_model_len=cfg.data.seq_length + 1, seed=cfg.train.seed,
                    dtype=TORCH_DTYPES[cfg.model.params_dtype], load_format="dummy",
                    capture_routing=training and cfg.grpo.routing_replay == "r3")
        env = engine_environment(group, ctx.launch, ctx.device)
        if nodes.node == 0:
            engine = VLLMEngine(model_dir, cfg.rollout, env=env, nodes=nodes, **args)  # type: ignore[arg-type]
            scorer = RewardScorer.from_config(cfg.reward, num_workers=cfg.reward.num_workers)
        else:  # started while the leader's VLLMEngine waits for this node's workers
            node_workers = HeadlessWorkers(vllm_arguments(model_dir, cfg.rollout, **args),  # type: ignore[arg-type]
                                           nodes, start_environment(cfg.rollout, env))
    if ctx.rank == 0 and training:
        store = ExperienceStore(session.run_dir / EXPERIENCE, cfg.data.seq_length,
                                list(components), routing_shape=_routing_shape(cfg),
                                pad_id=export.pad_id)
    probes = _probe_sequences(eval_prompts or train_prompts, cfg.rollout.sync_check_sequences,
                              tokenizer)
    routing = ref_routing = None
    if training and cfg.grpo.routing_replay != "none":
        routing = _routing_replay(cfg, session.model, session)
        if session.extra_models:
            ref_routing = _routing_replay(cfg, session.extra_models[REF_MODEL], session)
    return Stage(session=session, train_prompts=train_prompts, eval_prompts=eval_prompts,
                 probes=probes, export=export, placement=placement, dp_ranks=dp_ranks,
                 rewards=rewards, reward_models=reward_models,
                 engine=engine, scorer=scorer, store=store,
                 how=micro_batching(cfg, ctx.layout), train_offload=train_offload,
                 ref_offload=ref_offload, guard=NonFiniteGuard(cfg.train.max_consecutive_nonfinite),
                 routing=routing, ref_routing=ref_routing, wait=wait, node_workers=node_workers)


def _routing_replay(cfg: Config, chunks: list[torch.nn.Module], session: Session
                    ) -> RoutingReplay:
    ctx = session.ctx
    return RoutingReplay(chunks, moe_layer_pattern(cfg.model), tp_group=ctx.tp_group,
                         sequence_parallel=ctx.layout.sequence_parallel,
                         recompute_full=cfg.model.recompute == "full")


def _check_kinds(cfg: Config, train: list[PromptExample], held_out: list[PromptExample]
                 ) -> RewardRouting:
    """The run's reward routing, checked against the prompts: every kind is scored by some
    reward, and every rule-scored prompt has what the accuracy reward checks."""
    rewards = RewardRouting.from_config(cfg.reward)
    source = f"data.path={cfg.data.path!r}" if cfg.data.source == "jsonl" else "data.source"
    for name, prompts in (("train", train), ("held-out", held_out)):
        check_prompt_kinds([q.kind for q in prompts], [q.question[:60] for q in prompts],
                           rewards, f"{source} ({name})")
        for i, q in enumerate(prompts):
            if q.kind in rewards.rule_kinds and not (q.answer or q.tests):
                raise ValueError(f"{source} ({name}): prompt {i} ({q.question[:60]!r}) has kind "
                                 f"{q.kind!r}, which the rule rewards score, but neither an "
                                 "answer nor tests")
    return rewards


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
    """Held-out pass@1 / cons@k, every engine group on its block of the questions (seeds per
    question, so the result does not depend on the engine count); logged and returned on
    every rank."""
    cfg = stage.cfg
    k = cfg.eval.samples_per_question
    questions = stage.pass_at_1_prompts
    blocks = split_prompts(len(questions), len(stage.placement.groups))
    block = blocks[stage.placement.group_of(stage.session.ctx.rank).index]
    sums = torch.zeros(4, dtype=torch.float64)  # pass@1, cons@k, response tokens (x n), n
    if stage.engine is not None and len(block):
        assert stage.scorer is not None
        stage.engine.wake_up()
        part = evaluate(stage.engine, [questions[i] for i in block], stage.scorer,
                        k=k, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                        max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                        seed=cfg.train.seed, target_language=cfg.reward.target_language,
                        prompt_indices=list(block))
        stage.engine.sleep()
        n = part.questions
        sums += torch.tensor([part.pass_at_1 * n, part.cons_at_k * n,
                              part.mean_response_tokens * n, n], dtype=torch.float64)
    stage.wait("an evaluation")  # on the host, not inside the all-reduce below
    if dist.get_world_size() > 1:
        sums = sums.to(dispatch.comm_device())
        dist.all_reduce(sums)
    total_pass, total_cons, total_tokens, n = sums.tolist()
    if not n:
        return {}
    metrics = EvalResult(pass_at_1=total_pass / n, cons_at_k=total_cons / n, k=k,
                         questions=int(n), mean_response_tokens=total_tokens / n).metrics()
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
    if stage.node_workers is not None:  # vLLM's headless side does not end by itself
        stage.node_workers.close()
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
