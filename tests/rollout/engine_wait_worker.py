"""Test support: a generation longer than the collective timeout, at world size 2 on gloo.

The default process group's timeout plays parallel.timeout_minutes (2 s here); rank 0 leads
the one engine group and its engine takes 4 s to generate (the protocol's `generate`, with a
sleep: the real rollout path, dispatch.generate_rollout, runs around it with real rule
rewards); rank 1 has no engine. Three rollouts:
- `waited`: with an EngineWait on a gloo group of its own (rollout.engine_wait_minutes = 1):
  every rank gets the rollout;
- `wait_too_short`: the same with engine_wait_minutes = 2 s: both ranks stop with an error
  naming rollout.engine_wait_minutes;
- `unwaited`: without it (the code before this fix): rank 1 times out inside the first
  all-reduce after generation.
Prints `RESULT {json}` per rank.

Usage: torchrun --nproc-per-node=2 engine_wait_worker.py"""

import datetime
import json
import os
import time

import torch.distributed as dist

from megatron_r1.config.schema import RewardConfig, RolloutConfig
from megatron_r1.data.prompts import PromptExample
from megatron_r1.reward.kinds import RewardRouting
from megatron_r1.reward.scoring import RewardScorer
from megatron_r1.rollout.dispatch import EngineWait, generate_rollout
from megatron_r1.rollout.placement import resolve_placement
from megatron_r1.rollout.types import Completion, SamplingConfig

COLLECTIVE_TIMEOUT_S = 2.0
GENERATION_S = 4.0


class SlowEngine:
    """Generates a fixed, correct, well-formatted completion after GENERATION_S seconds."""

    def generate(self, prompts, sampling, *, prompt_indices=None):
        time.sleep(GENERATION_S)
        done = Completion(token_ids=(5, 6, 2), logprobs=(-0.1, -0.2, -0.3),
                          text="<think> 1 + 1 = 2 </think> <answer> 2 </answer>",
                          finish_reason="stop")
        return [[done] * sampling.n for _ in prompts]

    def wake_up(self):
        pass

    def sleep(self):
        pass


def rollout(engine, scorer, placement, wait):
    prompts = [PromptExample(question=f"q{i}", prompt=f"q{i}", answer="2",
                             prompt_ids=(1, 10 + i)) for i in range(2)]
    return generate_rollout(engine, scorer, placement, prompts,
                            SamplingConfig(n=2, temperature=1.0, top_p=1.0, max_new_tokens=3,
                                           seed=0),
                            rewards=RewardRouting.from_config(RewardConfig()),
                            target_language="en", std_normalize=True, wait=wait)


if __name__ == "__main__":
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    rank = dist.get_rank()
    harness = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=2))
    long_wait = EngineWait(dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=1)),
                           1.0)
    short_wait = EngineWait(dist.new_group(backend="gloo",
                                           timeout=datetime.timedelta(seconds=2)), 2 / 60)
    placement = resolve_placement(RolloutConfig(ranks_per_engine=2), 2, 2)
    engine = SlowEngine() if rank == 0 else None
    scorer = RewardScorer.from_config(RewardConfig(), num_workers=1) if rank == 0 else None
    result = {}
    try:
        start = time.perf_counter()
        generated = rollout(engine, scorer, placement, long_wait)
        result["waited"] = {"rows": int(generated.length_R.numel()),
                            "accuracy": generated.metrics["reward/accuracy_mean"],
                            "seconds": time.perf_counter() - start}
        dist.barrier(group=harness)
        for name, wait in (("wait_too_short", short_wait), ("unwaited", None)):
            try:
                rollout(engine, scorer, placement, wait)
                result[name] = "passed"
            except RuntimeError as err:
                result[name] = f"{type(err).__name__}: {err}"
            dist.barrier(group=harness)
    finally:
        if scorer is not None:
            scorer.close()
    print("RESULT " + json.dumps({"rank": rank, **result}), flush=True)
    os._exit(0)  # the default group may be broken after the timeout: no teardown
