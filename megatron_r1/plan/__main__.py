"""`python -m megatron_r1.plan --config C --gpus N`: the planner before it is wired into the
`megatron-r1` command (same arguments, same exit codes: 0 fits, 3 does not, 2 bad input)."""

from __future__ import annotations

import argparse
import sys
import warnings

from megatron_r1.config import load_config
from megatron_r1.plan.command import add_plan_parser, run_plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_r1.plan")
    sub = parser.add_subparsers(dest="command", required=True)
    add_plan_parser(sub)
    args = parser.parse_args(["plan", *(sys.argv[1:] if argv is None else argv)])
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*")
    try:
        return run_plan(load_config(args.config, args.overrides), args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"megatron-r1 plan: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
