"""The reward-model stage (`megatron-r1 rm`): R1 stage 4's helpfulness and safety models.

Layer L3. SFT's loop (session, train_step, metrics, checkpoints, resume, progress bar) with a
reward model (megatron_r1.model.reward_head) and a preference objective
(reward_model.objective): pairwise Bradley-Terry or pointwise binary cross-entropy, each the
mean over the examples of the global batch (megatron's per-token-loss denominator counting
examples), so the result does not depend on micro-batching or the DP size. The backbone
starts from `checkpoint.load_dir` (a policy checkpoint or a converted Hugging Face model,
weights only: the LM head is ignored and the scalar head starts fresh) or from scratch.
Held-out metrics are computed before and after training from every held-out score, gathered
from the ranks that hold them: pairwise accuracy and margin, or pointwise accuracy and AUC.
Every checkpoint's megatron_r1.json carries `reward_model` (objective, template, max_length),
which tells a consumer it holds a reward model and how to feed it.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.distributed as dist

from megatron_r1.config import Config
from megatron_r1.data.preference import preference_examples
from megatron_r1.data.reward_batches import (
    MicroBatch,
    RewardBatchSource,
    RewardDataset,
    eval_microbatches,
    tokenize_rewards,
)
from megatron_r1.model.reward_head import HEAD_KEYS, build_reward_model, last_token_scores
from megatron_r1.reward.preference_loss import (
    PAIRWISE_METRICS,
    POINTWISE_METRICS,
    LossOutput,
    auc,
    bradley_terry_loss,
    pointwise_loss,
)
from megatron_r1.schedule import LossFn, forward_backward
from megatron_r1.session import Session, end_session, micro_batching, run_tokenizer, start_session
from megatron_r1.supervised import run_steps

log = logging.getLogger(__name__)

Scores = list[tuple[torch.Tensor, torch.Tensor]]
"""(scores [b], labels [b]) of evaluated micro-batches, on the host."""


def _loss(objective: str, lengths_B: torch.Tensor, label_B: torch.Tensor,
          sink: Scores | None, scores_BS: torch.Tensor) -> LossOutput:
    """The objective on each sequence's last score; pairs are rows (2i, 2i + 1)."""
    scores_B = last_token_scores(scores_BS, lengths_B)
    if sink is not None:
        sink.append((scores_B.detach().float().cpu(), label_B.detach().cpu()))
    if objective == "pairwise":
        return bradley_terry_loss(scores_B[0::2], scores_B[1::2])
    return pointwise_loss(scores_B, label_B)


def reward_forward_step(objective: str, batch: MicroBatch, model: torch.nn.Module,
                        sink: Scores | None = None) -> tuple[torch.Tensor, LossFn]:
    """Scores [b, s] on the last pipeline stage (hidden states elsewhere; the loss fn is then
    unused); `sink` collects the scores of held-out micro-batches."""
    scores_BS = model(batch["tokens"], batch["position_ids"], None)
    return scores_BS, functools.partial(_loss, objective, batch["lengths"], batch["label"], sink)


def _held_out_metrics(session: Session, batches: list[MicroBatch],
                      objective: str) -> dict[str, float]:
    """Forward only over this rank's held-out micro-batches; the metrics of every held-out
    score, gathered from the last pipeline stage's first tensor-parallel rank of each
    data-parallel replica (collective)."""
    ctx = session.ctx
    sink: Scores = []
    for chunk in session.model:
        chunk.eval()
    with torch.no_grad():
        forward_backward(session.model, batches,
                         functools.partial(reward_forward_step, objective, sink=sink), ctx,
                         forward_only=True)
    for chunk in session.model:
        chunk.train()
    mine = sink if ctx.is_last_stage and ctx.tp_rank == 0 else []
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    pieces = [piece for rank in gathered for piece in rank]
    score_N = torch.cat([s for s, _ in pieces])
    label_N = torch.cat([y for _, y in pieces])
    if objective == "pairwise":
        _, _, terms = bradley_terry_loss(score_N[0::2], score_N[1::2])
        return {k: float(v[0] / v[1]) for k, v in terms.items()}
    _, _, terms = pointwise_loss(score_N, label_N)
    return {**{k: float(v[0] / v[1]) for k, v in terms.items()}, "auc": auc(score_N, label_N)}


def run_reward_training(cfg: Config) -> dict[str, float]:
    """Train `cfg.train.steps` optimizer steps of the reward model; return the last step's
    metrics plus the held-out metrics before and after (`eval_<metric>_start`/`_end`)."""
    # Layouts and batching the stage cannot serve, refused before any process group exists.
    if cfg.data.sources:
        raise ValueError("data.sources: the reward-model stage reads one preference file, "
                         "data.path")
    if cfg.train.max_tokens_per_microbatch is not None or cfg.train.pack_sequences:
        raise ValueError("train.max_tokens_per_microbatch and train.pack_sequences: not "
                         "supported by the reward-model stage (a pair's two sequences must "
                         "share a micro-batch)")
    if cfg.parallel.context > 1:
        raise ValueError(f"parallel.context={cfg.parallel.context}: reward models read one "
                         "position per sequence and do not support context parallelism")
    session = start_session(cfg, build=build_reward_model, fresh=HEAD_KEYS)
    try:
        return _train(cfg, session)
    finally:
        end_session(session)


def _datasets(cfg: Config, session: Session) -> tuple[RewardDataset, RewardDataset | None]:
    tokenizer = run_tokenizer(session)
    train, held_out = preference_examples(cfg.data, cfg.reward_model.objective,
                                          seed=cfg.data.seed)
    return (tokenize_rewards(train, tokenizer, cfg.data.seq_length),
            tokenize_rewards(held_out, tokenizer, cfg.data.seq_length) if held_out else None)


def _train(cfg: Config, session: Session) -> dict[str, float]:
    ctx, objective = session.ctx, cfg.reward_model.objective
    metric_keys = PAIRWISE_METRICS if objective == "pairwise" else POINTWISE_METRICS
    forward_step = functools.partial(reward_forward_step, objective)
    describe = {"reward_model": {"objective": objective, "template": cfg.data.template,
                                 "max_length": cfg.data.seq_length}}
    train_set, eval_set = _datasets(cfg, session)
    how = micro_batching(cfg, ctx.layout)
    source = RewardBatchSource(train_set, global_batch_size=cfg.train.global_batch_size,
                               micro_batching=how, dp_rank=ctx.dp_rank, dp_size=ctx.layout.data,
                               seed=cfg.data.seed)
    if "data" in session.trainer_state:
        source.load_state_dict(session.trainer_state["data"])
    eval_batches = (eval_microbatches(eval_set, how, ctx.dp_rank, ctx.layout.data)
                    if eval_set is not None else [])

    summary: dict[str, float] = {}

    def evaluate(step: int, when: str) -> None:
        held_out = _held_out_metrics(session, eval_batches, objective)
        summary.update({f"eval_{k}_{when}": v for k, v in held_out.items()})
        session.metrics.log(step, {f"eval_{k}": v for k, v in held_out.items()})

    if eval_batches:
        evaluate(session.start_step, "start")
    metrics, last = run_steps(
        session, source, forward_step, metric_keys, desc="rm",
        postfix=lambda m: {"loss": f"{m['loss']:.4f}", "acc": f"{m['accuracy']:.3f}"},
        describe=describe)
    if eval_batches:
        evaluate(last, "end")
    return {**metrics, **summary}
