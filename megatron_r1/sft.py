"""Supervised fine-tuning: the R1 cold-start stage (also rejection-sampled SFT, distillation).

Layer L3. The loop reads top to bottom: batches, one optimizer step, metrics, checkpoint.
The loss is the token-level cross-entropy on completion tokens, summed over the step and
divided by the step's total number of completion tokens over all micro-batches and
data-parallel ranks (megatron's calculate_per_token_loss), so the result does not depend on
how the global batch is split.
"""

from __future__ import annotations

import functools
import logging
import math
import time

import torch
from tqdm import tqdm

from megatron_r1.batching import plan_microbatches
from megatron_r1.config import Config
from megatron_r1.data.sft import MicroBatch, SFTBatchSource, SFTDataset, sft_datasets
from megatron_r1.schedule import LossFn
from megatron_r1.session import (
    Session,
    end_session,
    micro_batching,
    run_tokenizer,
    start_session,
)
from megatron_r1.train_step import NonFiniteGuard, eval_step, train_step

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


def _eval_batches(dataset: SFTDataset, session: Session) -> list[MicroBatch]:
    """This rank's share of the whole eval set, in fixed order (whole micro-batches only),
    cut as training steps are."""
    layout, how = session.ctx.layout, micro_batching(session.cfg, session.ctx.layout)
    per_round = how.micro_batch_size * layout.data
    usable = len(dataset) // per_round * per_round
    plans = plan_microbatches(range(usable), dataset.length_N[:usable].tolist(), layout.data,
                              how)
    return [dataset.batch(plan) for plan in plans[session.ctx.dp_rank]]


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
    train_set, eval_set = sft_datasets(cfg.data, tokenizer, seed=cfg.data.seed)
    source = SFTBatchSource(train_set, global_batch_size=cfg.train.global_batch_size,
                            micro_batching=micro_batching(cfg, ctx.layout), dp_rank=ctx.dp_rank,
                            dp_size=ctx.layout.data, seed=cfg.data.seed)
    if "data" in session.trainer_state:
        source.load_state_dict(session.trainer_state["data"])
    evaluate = functools.partial(eval_step, session.model, forward_step=sft_forward_step,
                                 metric_keys=METRIC_KEYS, ctx=ctx)
    guard = NonFiniteGuard(cfg.train.max_consecutive_nonfinite)
    eval_batches = _eval_batches(eval_set, session) if eval_set is not None else []

    summary: dict[str, float] = {}
    if eval_batches:
        summary["eval_loss_start"] = evaluate(eval_batches)["loss"]
        session.metrics.log(session.start_step, {"eval_loss": summary["eval_loss_start"]})
    bar = tqdm(total=cfg.train.steps, initial=session.start_step, desc="sft", unit="step",
               disable=not (session.is_logging_rank and cfg.logging.progress_bar))
    metrics: dict[str, float] = {}
    last = min(cfg.train.steps, cfg.train.stop_at_step or cfg.train.steps)
    for step in range(session.start_step + 1, last + 1):
        batch = source.next_step()
        result = train_step(session.model, session.optimizer, session.scheduler,
                            batch.micro_batches, sft_forward_step, METRIC_KEYS, ctx)
        metrics = {k: v for k, v in result.metrics.items() if math.isfinite(v)}
        metrics.update(guard.observe(step, result))
        # positions the step trained on over all ranks, padding excluded
        metrics["tokens_per_s"] = batch.global_positions / metrics["step_time_s"]
        metrics["loss_tokens"] = float(batch.global_loss_tokens)
        metrics["padding_fraction"] = batch.padding_fraction
        metrics["epoch"] = float(batch.epoch)
        if step % cfg.logging.log_interval == 0 or step == last:
            session.metrics.log(step, metrics)
        bar.set_postfix(loss=f"{result.metrics['loss']:.4f}",
                        gnorm=f"{metrics.get('grad_norm', float('nan')):.3f}")
        bar.update(1)
        interval = cfg.checkpoint.save_interval
        if (interval and step % interval == 0) or step == last:
            start = time.perf_counter()
            path = session.save(step, {"data": source.state_dict()})
            if session.is_logging_rank:
                log.info("saved %s in %.1f s", path, time.perf_counter() - start)
    bar.close()
    if eval_batches:
        summary["eval_loss_end"] = evaluate(eval_batches)["loss"]
        session.metrics.log(last, {"eval_loss": summary["eval_loss_end"]})
    return {**metrics, **summary}

