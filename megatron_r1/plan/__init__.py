"""Memory and layout planner: will this config fit on N GPUs, and which layouts do.

Modules, bottom up: counts (per-rank parameter bookkeeping), activations (what a micro-batch
keeps for the backward), memory (bytes per GPU per phase of a colocated GRPO step), search
(layouts that fit, ranked), sync (bytes and seconds of the weight sync to the engines), report
(table), params (the measurement on megatron-core's real modules, L2) and command
(`megatron-r1 plan`). Only params and command import megatron.
"""

from __future__ import annotations

from typing import Any


def add_plan_parser(subparsers: Any) -> Any:
    """Add the `plan` sub-command to the CLI (see megatron_r1.plan.command)."""
    from megatron_r1.plan.command import add_plan_parser as add

    return add(subparsers)


def run_plan(cfg: Any, args: Any) -> int:
    """Run `megatron-r1 plan`; returns its exit code (0 fits, 3 does not fit)."""
    from megatron_r1.plan.command import run_plan as run

    return run(cfg, args)


__all__ = ["add_plan_parser", "run_plan"]
