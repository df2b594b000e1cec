"""Start torch.distributed and megatron-core's process groups for a resolved layout.

Layer L2, and the only module that touches `megatron.core.parallel_state`: everything else
receives the ParallelContext (ranks and process groups) as an argument. The layout has been
validated (megatron_r1.layout) before anything here runs.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_r1 import megatron_compat, versions
from megatron_r1.config.schema import ParallelConfig
from megatron_r1.layout import Layout
from megatron_r1.parallel.launch_env import LaunchEnv

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ParallelContext:
    """This rank's coordinates in the layout, and the process groups megatron-core uses."""

    layout: Layout
    launch: LaunchEnv
    device: torch.device
    tp_rank: int
    pp_rank: int
    cp_rank: int
    ep_rank: int
    dp_rank: int
    """Rank among the data-parallel replicas of the dense part (decides the data shard)."""
    pg_collection: object
    """megatron.core.process_groups_config.ProcessGroupCollection of this rank."""

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pipeline - 1

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.pg_collection.dp  # type: ignore[attr-defined,no-any-return]

    @property
    def dp_cp_group(self) -> dist.ProcessGroup:
        return self.pg_collection.dp_cp  # type: ignore[attr-defined,no-any-return]

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.pg_collection.tp  # type: ignore[attr-defined,no-any-return]

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.pg_collection.pp  # type: ignore[attr-defined,no-any-return]


def _backend(parallel: ParallelConfig) -> str:
    if parallel.backend != "auto":
        return parallel.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_parallel(layout: Layout, parallel: ParallelConfig, launch: LaunchEnv,
                  seed: int) -> ParallelContext:
    """Create the default process group and megatron's model-parallel groups; seed the RNGs.

    Args:
        layout: the validated layout; its world size must equal the launcher's.
        parallel: the parallel config section (backend, timeout).
        launch: this process's rank and the rendezvous address.
        seed: base seed; megatron derives the tensor- and expert-parallel RNG streams from it.
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    if layout.world_size != launch.world_size:
        raise ValueError(f"the layout was resolved for world size {layout.world_size} but the "
                         f"launcher ({launch.launcher}) started {launch.world_size} processes")
    versions.check_megatron_core()  # before any group exists: fail at start-up, not deep in
    megatron_compat.apply()
    backend = _backend(parallel)
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        dist.init_process_group(
            backend=backend, rank=launch.rank, world_size=launch.world_size,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            timeout=datetime.timedelta(minutes=parallel.timeout_minutes))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
        context_parallel_size=layout.context,
        expert_model_parallel_size=layout.expert,
        expert_tensor_parallel_size=layout.expert_tensor,
        distributed_timeout_minutes=parallel.timeout_minutes,
        # Gloo side groups exist for CPU-side collectives of the distributed optimizer on NCCL
        # jobs; with gloo as the main backend they would only duplicate the groups.
        create_gloo_process_groups=backend == "nccl",
    )
    # The CPU generator drives `use_cpu_initialization` weight init (full master weights,
    # then split), so a fixed seed gives the same full weights under any TP degree.
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    ctx = ParallelContext(
        layout=layout, launch=launch, device=device,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )
    log.info("rank %d/%d (%s, %s): tp=%d pp=%d cp=%d ep=%d dp=%d", launch.rank,
             launch.world_size, launch.launcher, backend, ctx.tp_rank, ctx.pp_rank, ctx.cp_rank,
             ctx.ep_rank, ctx.dp_rank)
    return ctx


def new_wait_group(timeout_minutes: float) -> dist.ProcessGroup | None:
    """A gloo group of every rank with its own timeout, for waits on the host that may last
    longer than any collective should (rollout.engine_wait_minutes; rollout/dispatch.py,
    EngineWait); None at world size 1. Collective: every rank calls it, in the same order as
    its other group creations (torch.distributed.new_group's contract)."""
    if dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo",
                          timeout=datetime.timedelta(minutes=timeout_minutes))


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
