"""Test support: write the step-0 checkpoint (the initial weights) of a config at world size 1,
so that runs at other layouts can start from exactly the same weights."""

import sys

from megatron_r1.config import load_config
from megatron_r1.session import end_session, start_session

if __name__ == "__main__":
    session = start_session(load_config(None, sys.argv[1:]))
    session.save(0, {})
    end_session(session)
