"""Supervised fine-tuning: the R1 cold-start stage (also rejection-sampled SFT, distillation).

Layer L3. The loop reads top to bottom: batches, one optimizer step, metrics, checkpoint.
The loss is the token-level cross-entropy on completion tokens, summed over the step and
divided by the step's total number of completion tokens over all micro-batches and
data-parallel ranks (megatron's calculate_per_token_loss), so the result does not depend on
how the global batch is split. The data is one source or a weighted `data.sources` mix
(megatron_r1.data.mix), which adds per-source sample counts and held-out losses to the metrics.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import torch
import torch.distributed as dist

from megatron_r1.batching import MicroBatchPlan, plan_microbatches
from megatron_r1.config import Config
from megatron_r1.data.mix import prepare_sft_data, sft_batch_source
from megatron_r1.data.sft import MicroBatch, SFTDataset, StepBatch
from megatron_r1.schedule import LossFn
from megatron_r1.session import (
    Session,
    end_session,
    micro_batching,
    run_tokenizer,
    start_session,
)
from megatron_r1.supervised import run_steps
from megatron_r1.train_step import eval_step

log = logging.getLogger(__name__)

METRIC_KEYS = ["loss"]


def _masked_loss(loss_mask_BS: torch.Tensor,
                 token_loss_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                       dict[str, torch.Tensor]]:
    """megatron loss-function contract: (loss sum, loss-token count, {key: [sum, count]})."""
    loss_sum = (token_loss_BS.float() * loss_mask_BS).sum()
    num_tokens = loss_mask_BS.sum().to(torch.int)
    return loss_sum, num_tokens, {"loss": torch.stack([loss_sum.detach(),
                                                       num_tokens.detach().float()])}


def sft_forward_step(batch: MicroBatch, model: torch.nn.Module) -> tuple[torch.Tensor, LossFn]:
    """GPTModel with labels returns the per-token cross-entropy [b, s] (vocab-parallel under
    TP); on a non-last pipeline stage it returns hidden states and the loss fn is unused."""
    token_loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                       packed_seq_params=batch.get("packed_seq_params"))
    return token_loss, functools.partial(_masked_loss, batch["loss_mask"])


class _Batches(Sequence[MicroBatch]):
    """Micro-batches built when the schedule takes them (megatron pulls one at a time), so a
    held-out pass never holds more than the micro-batch in flight."""

    def __init__(self, dataset: SFTDataset, plans: list[MicroBatchPlan]) -> None:
        self.dataset, self.plans = dataset, plans

    def __len__(self) -> int:
        return len(self.plans)

    @overload
    def __getitem__(self, i: int) -> MicroBatch: ...

    @overload
    def __getitem__(self, i: slice) -> list[MicroBatch]: ...

    def __getitem__(self, i: int | slice) -> MicroBatch | list[MicroBatch]:
        if isinstance(i, slice):
            return [self.dataset.batch(p) for p in self.plans[i]]
        return self.dataset.batch(self.plans[i])


@dataclass(frozen=True)
class _EvalSet:
    batches: _Batches
    """This rank's micro-batches of the held-out set (built as they are consumed)."""
    loss_tokens: int
    """Loss tokens of those micro-batches over all ranks (weights the overall eval_loss)."""


def _eval_set(dataset: SFTDataset, session: Session, name: str) -> _EvalSet:
    """This rank's share of the whole eval set, in fixed order (whole micro-batches only),
    cut as training steps are."""
    layout, how = session.ctx.layout, micro_batching(session.cfg, session.ctx.layout)
    per_round = how.micro_batch_size * layout.data
    usable = len(dataset) // per_round * per_round
    if name and not usable:  # one source of a mix; a single source keeps today's silence
        raise ValueError(f"data.sources: the held-out set of {name!r} has {len(dataset)} "
                         f"samples, fewer than one round of train.micro_batch_size x "
                         f"data-parallel size = {per_round}")
    plans = plan_microbatches(range(usable), dataset.length_N[:usable].tolist(), layout.data,
                              how)
    return _EvalSet(_Batches(dataset, plans[session.ctx.dp_rank]),
                    int(dataset.loss_tokens_N[:usable].sum()))


def _data_cache(cfg: Config, session: Session, tokenizer: Any) -> Path:
    """The token-store directory, with the stores this run reads built by rank 0 while the
    other ranks wait (they then memory-map them); an error in the data (a bad JSONL line)
    stops every rank with rank 0's message. Collective."""
    cache_dir = Path(cfg.data.cache_dir or session.run_dir / "data_cache")
    error: list[str | None] = [None]
    if session.ctx.rank == 0:
        try:
            prepare_sft_data(cfg.data, tokenizer, cache_dir)
        except ValueError as err:
            error[0] = str(err)
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise ValueError(error[0])
    return cache_dir


def _held_out(evaluate: Callable[[Sequence[MicroBatch]], dict[str, float]],
              sets: dict[str, _EvalSet]) -> dict[str, float]:
    """`eval_loss` over every held-out loss token and, for a mix, `eval_loss/<name>` per
    source; the overall loss weighs the sources by their tokens (as one concatenated set
    would), not by the mix weights."""
    losses = {name: evaluate(s.batches)["loss"] for name, s in sets.items() if s.batches}
    if list(losses) == [""]:
        return {"eval_loss": losses[""]}
    if not losses:
        return {}
    total = sum(sets[name].loss_tokens for name in losses)
    result = {f"eval_loss/{name}": loss for name, loss in losses.items()}
    result["eval_loss"] = sum(loss * sets[name].loss_tokens for name, loss in losses.items()
                              ) / total
    return result


def _batch_metrics(batch: StepBatch) -> dict[str, float]:
    """The step's loss tokens over all ranks, and a mix's per-source sample counts: this
    step's and the run's so far."""
    metrics = {"loss_tokens": float(batch.global_loss_tokens)}
    metrics.update({f"data/{name}_samples": float(n) for name, n in batch.source_samples.items()})
    metrics.update({f"data/{name}_consumed_samples": float(n)
                    for name, n in batch.source_consumed.items()})
    return metrics


def run_sft(cfg: Config) -> dict[str, float]:
    """Train `cfg.train.steps` optimizer steps of SFT; return the last step's metrics plus
    held-out loss before and after (`eval_loss_start`, `eval_loss_end`)."""
    session = start_session(cfg)
    try:
        return _train(cfg, session)
    finally:
        end_session(session)


def _train(cfg: Config, session: Session) -> dict[str, float]:
    ctx = session.ctx
    tokenizer = run_tokenizer(session)
    source, eval_data = sft_batch_source(
        cfg.data, tokenizer, global_batch_size=cfg.train.global_batch_size,
        micro_batching=micro_batching(cfg, ctx.layout), dp_rank=ctx.dp_rank,
        dp_size=ctx.layout.data, cache_dir=_data_cache(cfg, session, tokenizer))
    if "data" in session.trainer_state:
        source.load_state_dict(session.trainer_state["data"])
    evaluate = functools.partial(eval_step, session.model, forward_step=sft_forward_step,
                                 metric_keys=METRIC_KEYS, ctx=ctx)
    eval_sets = {name: _eval_set(dataset, session, name) for name, dataset in eval_data.items()}

    summary: dict[str, float] = {}
    held_out = _held_out(evaluate, eval_sets)
    if held_out:
        summary["eval_loss_start"] = held_out["eval_loss"]
        session.metrics.log(session.start_step, held_out)
    metrics, last = run_steps(
        session, source, sft_forward_step, METRIC_KEYS, desc="sft",
        postfix=lambda m: {"loss": f"{m['loss']:.4f}",
                           "gnorm": f"{m.get('grad_norm', float('nan')):.3f}"},
        batch_metrics=_batch_metrics)
    held_out = _held_out(evaluate, eval_sets)
    if held_out:
        summary["eval_loss_end"] = held_out["eval_loss"]
        session.metrics.log(last, held_out)
    return {**metrics, **summary}

