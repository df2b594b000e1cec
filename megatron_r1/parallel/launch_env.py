"""Who am I in this job? Rank, world size and rendezvous address from the launcher.

Layer L1 (no megatron). Three launchers are supported without Ray:
- torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
- srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the first host of SLURM_JOB_NODELIST),
- mpirun (PMI_RANK / OMPI_COMM_WORLD_RANK / PMIX_RANK; mpi4py broadcasts rank 0's host and a
  free port, so no address needs to be configured),
and a plain `python`/`megatron-r1` process is a world of one. torchrun wins when its
variables are present (torchrun inside an sbatch allocation is common); then srun; then MPI.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Launcher = Literal["torchrun", "slurm", "mpi", "single"]

_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MPI_LOCALRANKID")


@dataclass(frozen=True, slots=True)
class LaunchEnv:
    """This process's place in the job and where the ranks meet."""

    launcher: Launcher
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    local_world_size: int = 1
    """Ranks on this node (where the launcher says; 1 otherwise)."""


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM hostlist: `gpu[003-005,009],cpu1` -> `gpu003`.

    Raises:
        ValueError: if the list is empty or malformed (names the value).
    """
    text = nodelist.strip()
    match = re.match(r"^([^,\[]+)(\[([^\]]+)\])?", text)
    if not text or match is None:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot read a host name")
    prefix, ranges = match.group(1), match.group(3)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0].strip()
    if not first.isdigit():
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: bad range {ranges!r}")
    return prefix + first


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError as err:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from err


def free_port() -> int:
    """A TCP port that is free on this host right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _slurm_port(env: Mapping[str, str]) -> int:
    # Every task of the job must agree on the port without talking: derive it from the job
    # id (stable across the tasks, different between concurrent jobs on one node).
    if "MASTER_PORT" in env:
        return _int(env, "MASTER_PORT")
    job = int(env.get("SLURM_JOB_ID", "0") or 0)
    return 20000 + job % 20000


def _slurm_tasks_per_node(env: Mapping[str, str]) -> int:
    # SLURM_NTASKS_PER_NODE is set only with --ntasks-per-node; SLURM_TASKS_PER_NODE always,
    # in the compressed form "8(x4)" or "8,4": this node's is the one of the first node for
    # the homogeneous jobs the launch scripts submit.
    if "SLURM_NTASKS_PER_NODE" in env:
        return _int(env, "SLURM_NTASKS_PER_NODE")
    first = env.get("SLURM_TASKS_PER_NODE", "1").split(",")[0].split("(")[0]
    return int(first) if first.isdigit() else 1


def ranks_per_node_hint(env: Mapping[str, str] | None = None) -> int | None:
    """Ranks per node as the launcher's environment says before any rank exists (for the
    pre-flight, `--check-world-size`): torchrun's LOCAL_WORLD_SIZE, or SLURM's tasks per node
    (also in the batch script); None when neither is set."""
    env = os.environ if env is None else env
    if "LOCAL_WORLD_SIZE" in env:
        return _int(env, "LOCAL_WORLD_SIZE")
    if "SLURM_NTASKS_PER_NODE" in env or "SLURM_TASKS_PER_NODE" in env:
        return _slurm_tasks_per_node(env)
    return None


def _from_mpi(env: Mapping[str, str]) -> LaunchEnv:
    from mpi4py import MPI  # imported only under mpirun: it loads the MPI library

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    addr, port = (socket.gethostname(), free_port()) if rank == 0 else ("", 0)
    addr, port = comm.bcast((env.get("MASTER_ADDR", addr), int(env.get("MASTER_PORT", port))),
                            root=0)
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    return LaunchEnv("mpi", rank, size, node.Get_rank(), addr, port, node.Get_size())


def discover(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read the launcher's environment (os.environ by default)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv("torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE"),
                         _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                         env.get("MASTER_ADDR", "127.0.0.1"),
                         _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
                         _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else 1)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        # SLURM_STEP_ID distinguishes an srun task from the batch script itself, which also
        # carries SLURM_PROCID=0 but is not one of the job's ranks.
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        return LaunchEnv("slurm", _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"),
                         _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                         env.get("MASTER_ADDR") or first_slurm_host(nodelist), _slurm_port(env),
                         _slurm_tasks_per_node(env))
    if any(key in env for key in _MPI_RANK_VARS):
        return _from_mpi(env)
    return LaunchEnv("single", 0, 1, 0, "127.0.0.1", free_port())
