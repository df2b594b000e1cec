"""The optimizer-step loop of the supervised stages: SFT and reward-model training.

Layer L3. Steps from the stage's batch source, one `train_step` each, metrics logged
every logging.log_interval steps (a non-finite value as null, counted in
nonfinite_metrics), non-finite steps skipped and counted (NonFiniteGuard), a
progress bar, and checkpoints every checkpoint.save_interval steps and at the last, each with
the source's position (`{"data": source.state_dict()}`) so that a resume continues the same
stream. What differs between the stages (batches, forward step, metrics, the progress bar's
figures, what megatron_r1.json records) comes in as arguments.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from tqdm import tqdm

from megatron_r1.metrics import count_nonfinite
from megatron_r1.schedule import ForwardStep
from megatron_r1.session import Session
from megatron_r1.train_step import NonFiniteGuard, train_step

log = logging.getLogger(__name__)


class StepBatches(Protocol):
    """A stage's batch source: each call gives one optimizer step's batch, which has
    `micro_batches` (this rank's), `global_positions`, `padding_fraction` and `epoch`."""

    def next_step(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...


def run_steps(session: Session, source: StepBatches, forward_step: ForwardStep,
              metric_keys: list[str], *, desc: str,
              postfix: Callable[[dict[str, float]], dict[str, str]],
              batch_metrics: Callable[[Any], dict[str, float]] | None = None,
              describe: dict[str, Any] | None = None) -> tuple[dict[str, float], int]:
    """Train from the session's step to train.steps (or train.stop_at_step).

    Args:
        postfix: the progress bar's figures from a step's metrics.
        batch_metrics: further metrics of a step's batch (e.g. a data mix's counts).
        describe: megatron_r1.json entries of every checkpoint (Session.save).

    Returns:
        (the last step's metrics, the last step).
    """
    cfg, ctx = session.cfg, session.ctx
    guard = NonFiniteGuard(cfg.train.max_consecutive_nonfinite)
    bar = tqdm(total=cfg.train.steps, initial=session.start_step, desc=desc, unit="step",
               disable=not (session.is_logging_rank and cfg.logging.progress_bar))
    metrics: dict[str, float] = {}
    last = min(cfg.train.steps, cfg.train.stop_at_step or cfg.train.steps)
    for step in range(session.start_step + 1, last + 1):
        batch = source.next_step()
        result = train_step(session.model, session.optimizer, session.scheduler,
                            batch.micro_batches, forward_step, metric_keys, ctx)
        metrics = count_nonfinite(result.metrics)  # NaN/inf logged as null, counted
        metrics.update(guard.observe(step, result))
        # positions the step trained on over all ranks, padding excluded
        metrics["tokens_per_s"] = batch.global_positions / metrics["step_time_s"]
        metrics["padding_fraction"] = batch.padding_fraction
        metrics["epoch"] = float(batch.epoch)
        if batch_metrics is not None:
            metrics.update(batch_metrics(batch))
        if step % cfg.logging.log_interval == 0 or step == last:
            session.metrics.log(step, metrics)
        bar.set_postfix(**postfix(result.metrics | metrics))
        bar.update(1)
        interval = cfg.checkpoint.save_interval
        if (interval and step % interval == 0) or step == last:
            start = time.perf_counter()
            path = session.save(step, {"data": source.state_dict()}, describe)
            if session.is_logging_rank:
                log.info("saved %s in %.1f s", path, time.perf_counter() - start)
    bar.close()
    return metrics, last
