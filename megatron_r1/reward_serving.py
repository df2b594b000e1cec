"""Reward models served to GRPO (R1 stage 4): helpfulness and safety models on the trainer's
ranks, scoring the completions of the prompt kinds they are configured for.

Layer L3. Each `reward.models` entry is a checkpoint written by `megatron-r1 rm` (its
megatron_r1.json names the architecture and marks it a reward model; its root's hf_assets/
holds its tokenizer). Key decisions:

- They run where the policy trains, in its process groups and parallel layout (TP, PP, EP,
  DP as parallel.* says; the reward model's own architecture, checked against that layout at
  start-up), forward only, and live in host memory between uses (like
  grpo.offload_reference's reference model): a reward model of the policy's architecture
  holds as many weights per GPU as the reference model, which the 671B R1-Zero config
  already keeps off the GPU (`megatron-r1 plan` prices it).
- The texts stay on the engine leaders, which tokenize what each model reads with the model's
  own tokenizer, template and length (megatron_r1.data.preference.reward_input_ids, the
  function its training used, as its checkpoint's `reward_model` entry records); the ids move
  to the data-parallel ranks that score them like rollout rows do (rollout/dispatch.py), and
  the scores come back to every rank with one all-reduce.
- Rows are dealt to data-parallel ranks in megatron's order, repeated at the end to fill
  every rank's micro-batches (each rank runs the same number of micro-batches of one shape,
  which pipeline and expert parallelism need); a row scored twice gets the mean of its
  identical scores.
- A failure of one row (no summary to read, a non-finite score) is data: the row scores
  the model's fallback, its margin below the rollout's lowest score of that model, and is
  counted (dispatch.scores_with_fallback); an error of the model itself (a bad checkpoint) stops the run
  at start-up, before any rollout.

Shapes: R rows of the rollout, M reward models, B rows per micro-batch, L positions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch

from megatron_r1.batching import rank_microbatches
from megatron_r1.checkpoint.assets import ASSETS_DIR
from megatron_r1.checkpoint.dist_ckpt import checkpoint_at, load_checkpoint, read_metadata
from megatron_r1.config import Config
from megatron_r1.config.loader import config_from_dict
from megatron_r1.config.schema import ModelConfig, RewardModelSpec
from megatron_r1.data.template import TemplateName
from megatron_r1.data.tokenizer import load_tokenizer
from megatron_r1.layout import resolve_layout
from megatron_r1.model.reward_head import build_reward_model, last_token_scores
from megatron_r1.offload import ModelOffload
from megatron_r1.rollout.dispatch import (
    Generated,
    ModelReader,
    exchange_model_ids,
    reduce_over_ranks,
)
from megatron_r1.schedule import Batch, LossFn, forward_backward
from megatron_r1.session import Session

log = logging.getLogger(__name__)


@dataclass
class ServedRewardModel:
    """One reward model on this rank: its chunks (host memory between uses) and its reader."""

    spec: RewardModelSpec
    chunks: list[torch.nn.Module]
    reader: ModelReader
    offload: ModelOffload
    path: Path
    """The checkpoint step it was loaded from."""


def _where(spec: RewardModelSpec) -> str:
    return f"reward.models[{spec.name!r}].checkpoint={spec.checkpoint!r}"


def _checkpoint_step(spec: RewardModelSpec) -> Path:
    found = checkpoint_at(spec.checkpoint)
    if found is None:
        raise FileNotFoundError(f"{_where(spec)}: no checkpoint there (neither a step "
                                "directory nor a `latest` marker)")
    return found


def reward_model_config(spec: RewardModelSpec) -> tuple[Path, ModelConfig, dict[str, Any]]:
    """(checkpoint step, architecture, how its training fed it: the `reward_model` entry of
    megatron_r1.json, with `template` and `max_length`) of a reward-model checkpoint.

    Raises:
        ValueError: for a checkpoint that is not a reward model's (a policy's has no
            `reward_model` entry in megatron_r1.json) or records no model config.
    """
    step = _checkpoint_step(spec)
    meta = read_metadata(step)
    if "reward_model" not in meta:
        raise ValueError(f"{_where(spec)}: {step} is not a reward model (its megatron_r1.json "
                         "has no `reward_model` entry); train one with `megatron-r1 rm`")
    if not isinstance(meta.get("model"), dict):
        raise ValueError(f"{_where(spec)}: {step}/megatron_r1.json records no model config")
    fed = meta["reward_model"]
    if not (isinstance(fed, dict) and fed.get("template") in get_args(TemplateName)
            and isinstance(fed.get("max_length"), int)):
        raise ValueError(f"{_where(spec)}: {step}/megatron_r1.json's `reward_model` entry lacks "
                         f"the template and max_length its training used: {fed!r}")
    return step, config_from_dict({"model": meta["model"]}).model, fed


def load_reward_models(cfg: Config, session: Session) -> list[ServedRewardModel]:
    """Every `reward.models` entry built in the trainer's layout, its weights loaded, then
    moved to host memory. Collective.

    Raises:
        ValueError: naming the entry, for a checkpoint that is not a reward model, an
            architecture the trainer's layout cannot hold, or a max_length past its positions.
    """
    ctx = session.ctx
    served = []
    for spec in cfg.reward.models:
        step, model, fed = reward_model_config(spec)
        try:
            resolve_layout(cfg.parallel, model, cfg.train, ctx.layout.world_size,
                           cfg.data.seq_length)
        except ValueError as err:
            raise ValueError(f"{_where(spec)}: its architecture does not fit the trainer's "
                             f"layout: {err}") from err
        max_length = spec.max_length or fed["max_length"]
        if max_length > model.max_position_embeddings:
            raise ValueError(f"reward.models[{spec.name!r}].max_length={max_length}: exceeds "
                             f"the model's max_position_embeddings="
                             f"{model.max_position_embeddings}")
        chunks: list[torch.nn.Module] = list(
            build_reward_model(model, cfg.parallel, ctx, perform_initialization=False))
        for chunk in chunks:
            chunk.requires_grad_(False)
            chunk.eval()
        load_checkpoint(step, chunks, None, None, ctx)
        reader = ModelReader(name=spec.name, scores=spec.scores,
                             tokenizer=load_tokenizer(step.parent / ASSETS_DIR),
                             max_length=max_length, template=fed["template"],
                             fallback_margin=spec.fallback_margin)
        offload = ModelOffload(chunks, ctx.device)
        offload.offload()
        served.append(ServedRewardModel(spec, chunks, reader, offload, step))
        if ctx.rank == 0:
            log.info("reward model %s: %s (%s, scores the %s)", spec.name, step,
                     "kinds " + ", ".join(spec.kinds), spec.scores)
    return served


def score_step(batch: Batch, model: torch.nn.Module) -> tuple[torch.Tensor, LossFn]:
    """megatron's forward step of serving: each row's score at its last id (last stage)."""
    scores_BS = model(batch["tokens"], batch["position_ids"], None)

    def collect(output_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                  dict[str, torch.Tensor]]:
        last_B = last_token_scores(output_BS, batch["lengths"])
        rows = torch.tensor(len(batch["rows"]), dtype=torch.int, device=output_BS.device)
        return torch.zeros((), device=output_BS.device), rows, {"scores": last_B.float()}
    return scores_BS, collect


def score_rollout(models: list[ServedRewardModel], generated: Generated, session: Session,
                  dp_ranks: list[int]) -> torch.Tensor:
    """Every reward model's score of every row it reads: float64 [R, M] on every rank (NaN
    where a model reads nothing or its score is not finite). Collective.

    Args:
        dp_ranks: the data-parallel rank of every global rank.
    """
    scores_RM = torch.full((len(generated.kinds_R), len(models)), math.nan, dtype=torch.float64)
    for m, served in enumerate(models):
        rows = torch.nonzero(generated.model_len_RM[:, m] > 0).flatten().tolist()
        if rows:
            scores_RM[:, m] = _score_model(served, m, rows, generated, session, dp_ranks)
    return scores_RM


def _score_model(served: ServedRewardModel, m: int, rows: list[int], generated: Generated,
                 session: Session, dp_ranks: list[int]) -> torch.Tensor:
    cfg, ctx = session.cfg, session.ctx
    dp, b = ctx.layout.data, cfg.train.micro_batch_size
    per_round = dp * b
    padded = [rows[i % len(rows)] for i in range(-(-len(rows) // per_round) * per_round)]
    plans = [rank_microbatches(padded, b, d, dp) for d in range(dp)]
    wanted = [[r for mb in plans[dp_ranks[g]] for r in mb] for g in range(len(dp_ranks))]
    ids = exchange_model_ids(generated, m, wanted)
    lengths = generated.model_len_RM[:, m]
    multiple = ctx.layout.sequence_multiple
    width = -(-int(lengths[padded].max()) // multiple) * multiple  # one shape for every rank
    batches, taken = [], iter(ids)
    for mb in plans[ctx.dp_rank]:
        tokens = torch.zeros(len(mb), width, dtype=torch.int64)
        for i in range(len(mb)):
            row_ids = next(taken)
            tokens[i, :row_ids.numel()] = row_ids
        batches.append({"tokens": tokens,
                        "position_ids": torch.arange(width).repeat(len(mb), 1),
                        "lengths": lengths[list(mb)].clone(),
                        "rows": torch.tensor(mb, dtype=torch.int64)})
    with served.offload.on_device(), torch.no_grad():
        outputs = forward_backward(served.chunks, batches, score_step, ctx, forward_only=True)
    sums = torch.zeros(2, len(generated.kinds_R), dtype=torch.float64)  # score sum, count
    if ctx.is_last_stage and ctx.tp_rank == 0:
        for batch, out in zip(batches, outputs):
            sums[0].index_add_(0, batch["rows"], out["scores"].double().cpu())
            sums[1].index_add_(0, batch["rows"], torch.ones(len(batch["rows"]),
                                                           dtype=torch.float64))
    sums = reduce_over_ranks(sums)
    return torch.where(sums[1] > 0, sums[0] / sums[1].clamp(min=1), math.nan)


def offload_seconds(models: list[ServedRewardModel]) -> dict[str, float]:
    """Seconds spent moving the reward models' weights since the last call (a metric)."""
    if not models:
        return {}
    return {"offload/reward_models_s": sum(s.offload.pop_seconds() for s in models)}
