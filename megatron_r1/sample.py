"""The rejection-sampling stage (`megatron-r1 sample`): the policy's correct, readable outputs
on the training prompts, written as an SFT data set (R1_RECIPE.md section 5, stage 3).

Layer L3 (above the GRPO stage, whose policy-and-engine set-up it reuses). The policy comes
from checkpoint.load_dir (or the run's own latest checkpoint) at any parallel layout; its
weights reach every engine group through the same sync and correctness gate as in GRPO. Each
group's engine then samples sample.samples_per_prompt outputs per prompt for its contiguous
block of the prompts, batch by batch (each request seeded by its prompt's index, so the data
set does not depend on the engine count), scores them with its rule rewards in its reward
worker pool and keeps what megatron_r1.rejection accepts; the kept outputs go to rank 0, which
writes the data set atomically (nothing is left behind by a failed run), with a report of
every verdict next to it; `megatron-r1 sft --set data.source=jsonl --set data.path=<output>`
trains on it. Ranks without an engine wait on the host (within rollout.engine_wait_minutes).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from tqdm import tqdm

from megatron_r1.config import Config
from megatron_r1.data.jsonl import write_jsonl
from megatron_r1.evaluation import reward_sample
from megatron_r1.grpo_trainer import Stage, close_stage, open_stage, sync_weights
from megatron_r1.rejection import KEPT, VERDICTS, KeptOutput, select_outputs
from megatron_r1.rollout.placement import split_prompts
from megatron_r1.rollout.types import SamplingConfig

log = logging.getLogger(__name__)

DEFAULT_OUTPUT = "rejection_sampled.jsonl"


def output_path(cfg: Config) -> Path:
    return Path(cfg.sample.output or Path(cfg.logging.run_dir) / DEFAULT_OUTPUT)


def run_sample(cfg: Config) -> dict[str, Any]:
    """Sample, filter and write the data set; return the report (on every rank)."""
    stage = open_stage(cfg, training=False)
    try:
        unverified = sorted({q.kind for q in stage.train_prompts} - stage.rewards.rule_kinds)
        if unverified:  # rejection sampling keeps verified-correct outputs only
            raise ValueError(f"data: prompts of kinds {unverified} have no reference answer or "
                             "tests for rejection sampling to check (reward.rule_kinds="
                             f"{list(cfg.reward.rule_kinds)}); sample math/code prompts only")
        max_new = cfg.sample.max_new_tokens or cfg.rollout.max_new_tokens
        longest = max(len(q.prompt_ids) for q in stage.train_prompts)
        if longest + max_new > cfg.data.seq_length + 1:
            raise ValueError(f"data.seq_length={cfg.data.seq_length} cannot hold the longest "
                             f"prompt ({longest} tokens) plus {max_new} new tokens "
                             "(sample.max_new_tokens, else rollout.max_new_tokens)")
        sync = sync_weights(stage)
        start = time.perf_counter()
        part = _sample_block(stage, max_new) if stage.engine is not None else None
        stage.wait("rejection sampling")  # on the host, not inside the gather below
        parts: list[Any] | None = [None] * dist.get_world_size() if stage.session.ctx.rank == 0 \
            else None
        dist.gather_object(part, parts, dst=0)  # the kept texts, to the one writer
        report: list[Any] = [None]
        if parts is not None:
            report[0] = _write(stage, [p for p in parts if p is not None], sync,
                               time.perf_counter() - start)
        dist.broadcast_object_list(report, src=0)
        stage.session.metrics.log(stage.session.start_step,
                                  {k: v for k, v in report[0].items() if isinstance(v, float)})
        result: dict[str, Any] = report[0]
        return result
    finally:
        close_stage(stage)


@dataclass
class _Block:
    """What one engine group sampled and kept from its block of the prompts."""

    kept: list[KeptOutput]
    verdicts: Counter[str]
    prompts: int
    prompts_with_kept: int


def _sample_block(stage: Stage, max_new_tokens: int) -> _Block:
    """This engine group's contiguous block of the prompts, batch by batch; every request
    seeded by its prompt's index among all prompts, so the data set does not depend on the
    number of engines."""
    cfg = stage.cfg
    s = cfg.sample
    assert stage.engine is not None and stage.scorer is not None
    prompts = stage.train_prompts[: s.max_prompts]
    group = stage.placement.group_of(stage.session.ctx.rank)
    block = split_prompts(len(prompts), len(stage.placement.groups))[group.index]
    result = _Block(kept=[], verdicts=Counter(), prompts=len(block), prompts_with_kept=0)
    bar = tqdm(total=len(block), desc="sample", unit="prompt",
               disable=not (cfg.logging.progress_bar and stage.session.is_logging_rank))
    stage.engine.wake_up()
    for first in range(block.start, block.stop, s.prompts_per_batch):
        indices = range(first, min(first + s.prompts_per_batch, block.stop))
        batch = [prompts[i] for i in indices]
        groups = stage.engine.generate(
            [q.prompt_ids for q in batch],
            SamplingConfig(n=s.samples_per_prompt, temperature=s.temperature, top_p=s.top_p,
                           max_new_tokens=max_new_tokens, seed=cfg.train.seed),
            prompt_indices=list(indices))
        samples = [reward_sample(q, cfg.reward.target_language)
                   for q in batch for _ in range(s.samples_per_prompt)]
        rewards = stage.scorer.score([c.text for g in groups for c in g], samples)
        batch_kept, batch_verdicts = select_outputs(batch, groups, rewards, s)
        result.kept += batch_kept
        result.verdicts += batch_verdicts
        result.prompts_with_kept += len({k.prompt for k in batch_kept})
        bar.update(len(batch))
        bar.set_postfix(kept=len(result.kept))
    stage.engine.sleep()
    bar.close()
    return result


def _write(stage: Stage, blocks: list[_Block], sync: dict[str, float],
           seconds: float) -> dict[str, Any]:
    """The data set (blocks in prompt order) and its report, written atomically (rank 0)."""
    cfg = stage.cfg
    kept = [k for b in blocks for k in b.kept]
    verdicts: Counter[str] = sum((b.verdicts for b in blocks), Counter())
    prompts = sum(b.prompts for b in blocks)
    prompts_with_kept = sum(b.prompts_with_kept for b in blocks)
    out = output_path(cfg)
    write_jsonl(out, (k.record() for k in kept))
    sampled = sum(verdicts.values())
    report: dict[str, Any] = {
        "output": str(out),
        "policy": cfg.checkpoint.load_dir or str(stage.session.checkpoint_dir),
        "sample/prompts": float(prompts), "sample/outputs": float(sampled),
        "sample/kept": float(verdicts[KEPT]),
        "sample/kept_fraction": verdicts[KEPT] / sampled if sampled else 0.0,
        "sample/prompts_with_kept": float(prompts_with_kept),
        **{f"sample/rejected_{v}": float(verdicts[v]) for v in VERDICTS if v != KEPT},
        "sample/engines": float(len(blocks)),
        "time/sample_s": seconds,
        **sync,
    }
    report_file = out.with_name(out.name + ".report.json")
    tmp = report_file.with_name(f".{report_file.name}.partial")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(report_file)
    log.info("kept %d of %d outputs (%d of %d prompts) -> %s", verdicts[KEPT], sampled,
             prompts_with_kept, prompts, out)
    return report
