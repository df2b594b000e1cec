"""Score a rollout: every reward component on every completion, weighted sum, metrics.

Layer L1 (torch, for the output tensors). The GRPO loop makes one `RewardScorer` per run and
calls `score` once per rollout. The key decision is that a failing component is data, not an
exception: a call that raises or runs past `timeout_s` scores 0 for that component, is counted
in the metrics (and flagged per sample in `RewardBatch.outcomes`), and the run goes on. The time
limit is enforced by killing worker processes (megatron_r1.reward.pool explains why processes).

A component with weight 0 is still computed and logged (e.g. the language share while
`language_weight` is 0), it just does not enter the total.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_r1.config.schema import RewardConfig
from megatron_r1.reward.code import RuleAccuracy, SandboxLimits
from megatron_r1.reward.format import format_reward
from megatron_r1.reward.language import language_reward
from megatron_r1.reward.pool import Outcome, RewardWorkerPool
from megatron_r1.reward.types import RewardFn, Sample

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RewardComponent:
    """One term of the total reward: weight x fn(completion, sample)."""

    name: str
    """Metric name, e.g. "accuracy"."""
    fn: RewardFn
    """The reward function (module-level, so that it pickles by reference)."""
    weight: float
    """Its weight in the total."""


def code_limits(config: RewardConfig) -> SandboxLimits:
    """The code sandbox's limits from the reward config."""
    return SandboxLimits(time_s=config.code_time_s, memory_mb=config.code_memory_mb,
                         output_kb=config.code_output_kb,
                         partial_credit=config.code_partial_credit,
                         processes=config.code_processes, python=config.code_python)


def reward_components(config: RewardConfig) -> tuple[RewardComponent, ...]:
    """The R1 rule rewards with the config's weights: accuracy, format, language.

    Args:
        config: The reward section of the run config.

    Returns:
        The three components, in that order.
    """
    return (
        RewardComponent(name="accuracy", fn=RuleAccuracy(code_limits(config)),
                        weight=config.accuracy_weight),
        RewardComponent(name="format", fn=format_reward, weight=config.format_weight),
        RewardComponent(name="language", fn=language_reward, weight=config.language_weight),
    )


@dataclass(frozen=True, slots=True)
class RewardBatch:
    """Rewards of one rollout of N completions.

    Shapes: N = completions; tensors are on the CPU.
    """

    total_N: torch.Tensor
    """float32 [N]: sum over components of weight x value."""
    components_N: dict[str, torch.Tensor]
    """Component name -> float32 [N] values (0 where the call failed)."""
    outcomes_N: dict[str, torch.Tensor]
    """Component name -> uint8 [N] `Outcome` codes (0 ok, 1 error, 2 timeout)."""
    metrics: dict[str, float]
    """`reward/total_mean`, and per component `reward/<name>_mean`, `reward/<name>_errors`,
    `reward/<name>_timeouts`; plus `reward/time_s`, the wall time of scoring."""


class RewardScorer:
    """Scores completions with a fixed set of weighted components in worker processes.

    Args:
        components: The reward terms; names must be unique.
        timeout_s: Wall-clock limit of one component on one completion.
        num_workers: Worker processes scoring in parallel.

    Raises:
        ValueError: for no components, duplicate names, a non-finite weight, or bad pool
            arguments.
    """

    def __init__(self, components: Sequence[RewardComponent], *, timeout_s: float,
                 num_workers: int) -> None:
        names = [c.name for c in components]
        if not names:
            raise ValueError("components: need at least one reward component")
        if len(set(names)) != len(names):
            raise ValueError(f"components: names must be unique, got {names}")
        for c in components:
            if not math.isfinite(c.weight):
                raise ValueError(f"component {c.name!r}: weight={c.weight} must be finite")
        self.components = tuple(components)
        self._pool = RewardWorkerPool([c.fn for c in components], num_workers=num_workers,
                                      timeout_s=timeout_s)

    @classmethod
    def from_config(cls, config: RewardConfig, *, num_workers: int) -> RewardScorer:
        """The R1 scorer (accuracy, format, language) for a reward config.

        Args:
            config: The component weights and `timeout_s` (the target language travels in
                each Sample).
            num_workers: Worker processes.

        Returns:
            A started scorer; close it (or use it as a context manager) when done.
        """
        return cls(reward_components(config), timeout_s=config.timeout_s,
                   num_workers=num_workers)

    def score(self, completions: Sequence[str], samples: Sequence[Sample]) -> RewardBatch:
        """Score a rollout.

        Args:
            completions: N generated texts (prompt excluded, no special tokens).
            samples: N samples; samples[i] describes the prompt of completions[i].

        Returns:
            Per-sample totals and component values, per-call outcomes, and metrics.

        Raises:
            ValueError: when the two sequences differ in length.
        """
        start = time.perf_counter()
        result = self._pool.run(completions, samples)
        n = len(completions)
        total_N = torch.zeros(n, dtype=torch.float32)
        components_N: dict[str, torch.Tensor] = {}
        outcomes_N: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        for k, component in enumerate(self.components):
            values_N = torch.tensor(result.values[k], dtype=torch.float32)
            codes_N = torch.tensor(result.outcomes[k], dtype=torch.uint8)
            total_N += component.weight * values_N
            components_N[component.name] = values_N
            outcomes_N[component.name] = codes_N
            errors = int((codes_N == Outcome.ERROR).sum())
            timeouts = int((codes_N == Outcome.TIMEOUT).sum())
            metrics[f"reward/{component.name}_mean"] = values_N.mean().item() if n else 0.0
            metrics[f"reward/{component.name}_errors"] = float(errors)
            metrics[f"reward/{component.name}_timeouts"] = float(timeouts)
            if errors or timeouts:
                logger.warning("reward %s: %d errors, %d timeouts in %d completions; first: %s",
                               component.name, errors, timeouts, n, result.first_errors[k])
        metrics["reward/total_mean"] = total_N.mean().item() if n else 0.0
        metrics["reward/time_s"] = time.perf_counter() - start
        return RewardBatch(total_N=total_N, components_N=components_N, outcomes_N=outcomes_N,
                           metrics=metrics)

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        self._pool.close()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
