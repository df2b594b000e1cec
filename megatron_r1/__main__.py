"""`python -m megatron_r1` is the `megatron-r1` command."""

import sys

from megatron_r1.cli import main

if __name__ == "__main__":
    sys.exit(main())
