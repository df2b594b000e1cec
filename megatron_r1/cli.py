"""The `megatron-r1` command line.

Layer L4. Parses arguments, loads the config (defaults < --config file < --set overrides) and
hands each sub-command its stage. Bad input (config values, layouts, files) ends the process
with exit code 2 and one line naming the key, value or file; nothing else is caught here.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from megatron_r1.config import Config, load_config
from megatron_r1.layout import resolve_layout
from megatron_r1.parallel.launch_env import ranks_per_node_hint
from megatron_r1.rollout.placement import resolve_placement

log = logging.getLogger("megatron_r1")

def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML",
                        help="sparse YAML override of the defaults (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="override one config value; repeatable, applied after --config")
    parser.add_argument("--check-world-size", type=int, metavar="N",
                        help="only check the config and the parallel layout for N processes, "
                             "then exit (0: valid, 2: the first problem, named)")
    parser.add_argument("--ranks-per-node", type=int, metavar="M",
                        help="with --check-world-size: M processes per node (default: the "
                             "launcher's LOCAL_WORLD_SIZE or SLURM tasks per node, else all "
                             "N on one node); the rollout engines must start on that layout")


# The commands that run a stage from the config system: (name, --help line, description).
_STAGE_COMMANDS = (
    ("sft", "supervised fine-tuning (R1 cold start, distillation)",
     "Supervised fine-tuning on prompt/completion pairs. Without --config it runs the embedded "
     "tiny job."),
    ("train", "GRPO reinforcement learning with rule rewards",
     "GRPO with vLLM rollouts, rule-based rewards and a reference model; evaluates before and "
     "after."),
    ("eval", "pass@1 and cons@k of a checkpoint",
     "Held-out pass@1 from k samples and cons@k (eval.* settings) of checkpoint.load_dir."),
    ("sample", "rejection sampling into an SFT data set",
     "Sample the policy of checkpoint.load_dir on the training prompts (sample.* settings) and "
     "write the correct, readable outputs as JSONL for `sft`."),
    ("rm", "train a reward model (pairwise or pointwise preferences)",
     "Train a reward model (a scalar head on the policy's backbone, from checkpoint.load_dir or "
     "from scratch) on preference pairs (Bradley-Terry) or labelled responses "
     "(reward_model.objective); held-out accuracy before and after."),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-r1",
        description="DeepSeek-R1 style RL training for Mixture-of-Experts models on "
                    "megatron-core.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary, description in _STAGE_COMMANDS:
        _add_config_args(sub.add_parser(name, help=summary, description=description))
    from megatron_r1.convert import add_convert_parser
    from megatron_r1.plan import add_plan_parser

    add_convert_parser(sub)
    add_plan_parser(sub)
    return parser


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID",
                              os.environ.get("PMI_RANK", "0"))))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{rank} %(name)s] %(message)s",
                        datefmt="%H:%M:%S")
    # megatron-core logs its parameter lists and full optimizer config at INFO.
    logging.getLogger("megatron.core").setLevel(logging.WARNING)


def _run(args: argparse.Namespace, cfg: Config) -> int:
    """Run the sub-command; returns the process exit code."""
    command = args.command
    if command == "plan":
        from megatron_r1.plan import run_plan

        return run_plan(cfg, args)
    if command == "sft":
        from megatron_r1.sft import run_sft

        summary = run_sft(cfg)
        if "eval_loss_start" in summary:
            log.info("held-out loss %.4f -> %.4f", summary["eval_loss_start"],
                     summary["eval_loss_end"])
    elif command == "train":
        from megatron_r1.grpo_trainer import run_grpo

        summary = run_grpo(cfg)
        for key in sorted(k for k in summary if k.startswith("end/")):
            log.info("%s: %.3f -> %.3f", key[4:], summary.get("start/" + key[4:], float("nan")),
                     summary[key])
    elif command == "eval":
        from megatron_r1.grpo_trainer import run_eval

        for key, value in sorted(run_eval(cfg).items()):
            log.info("%s = %.4f", key, value)
    elif command == "sample":
        from megatron_r1.sample import run_sample

        report = run_sample(cfg)
        log.info("wrote %d outputs to %s", int(report["sample/kept"]), report["output"])
    elif command == "rm":
        from megatron_r1.reward_training import run_reward_training

        summary = run_reward_training(cfg)
        for key in sorted(k for k in summary if k.startswith("eval_") and k.endswith("_end")):
            name = key.removeprefix("eval_").removesuffix("_end")
            log.info("held-out %s %.4f -> %.4f", name, summary.get(f"eval_{name}_start",
                                                                  float("nan")), summary[key])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    if args.command == "convert":  # reads its own --config (only the model section)
        return int(args.handler(args))
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.data.sources and args.command not in ("sft", "plan"):
            # Only SFT mixes sources; rather than ignore the list, the other stages refuse it.
            raise ValueError(f"data.sources: only `sft` mixes sources; `{args.command}` reads "
                             "one data file, data.path")
        if getattr(args, "check_world_size", None) is not None:
            world = args.check_world_size
            per_node = args.ranks_per_node
            if per_node is None:
                per_node = ranks_per_node_hint() or world
            resolve_layout(cfg.parallel, cfg.model, cfg.train, world, cfg.data.seq_length)
            if args.command in ("train", "eval", "sample"):  # engines that start on these nodes
                resolve_placement(cfg.rollout, world, per_node)
            print(f"megatron-r1 {args.command}: config and layout valid for {world} "
                  f"process(es), {per_node} per node")
            return 0
        if getattr(args, "ranks_per_node", None) is not None:
            raise ValueError("--ranks-per-node: only with --check-world-size (a run reads its "
                             "node size from the launcher)")
        return _run(args, cfg)
    except (ValueError, TypeError, FileNotFoundError) as err:
        # Input errors (config, layout, data, checkpoints) are reported, not traced.
        if isinstance(err, (ValueError, TypeError)) and not _is_input_error(err):
            raise
        print(f"megatron-r1 {args.command}: error: {err}", file=sys.stderr)
        return 2


def _is_input_error(err: BaseException) -> bool:
    """Errors raised by our own validation (config, layout, data, checkpoint) carry
    messages meant for users; anything raised inside torch or megatron is a bug to trace."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    origin = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return origin.startswith("megatron_r1")
