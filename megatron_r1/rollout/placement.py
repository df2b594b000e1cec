"""Where the rollout engines live and who generates what: engine groups and request seeds.

Layer L0 (pure, cheap). The world is cut into engine groups of `rollout.ranks_per_engine`
consecutive ranks. Each group hosts one vLLM engine of `rollout.tensor_parallel` workers,
colocated with the group's first ranks, one worker beside each (on GPUs the worker uses that
rank's device; on a CPU it is bound to that rank's share of the node's cores). The group's
first rank, the leader, holds the engine's handle and the group's reward workers; every
rollout's prompts are split into contiguous blocks, one per group, and every request (prompt,
sample) carries its own seed, so the tokens of a rollout do not depend on how many engines
produced it.

Ranks are numbered node by node (`ranks_per_node` consecutive ranks per node: torchrun, srun
and mpirun's default mapping). An engine wider than a node spans whole nodes: its workers
fill the first `tensor_parallel / ranks_per_node` nodes of its group, and on each of those
nodes the group's first rank there, the node's *host*, starts that node's share of the
workers (vLLM's headless workers, rollout/vllm_engine.py) and receives the weights they load.
The rules below accept exactly the layouts the engine code starts, so that the pre-flight
(`--check-world-size`, the planner) refuses the others before any rank builds a model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from megatron_r1.config.schema import RolloutConfig


@dataclass(frozen=True, slots=True)
class EngineGroup:
    """One engine and the consecutive trainer ranks it lives beside."""

    index: int
    ranks: tuple[int, ...]
    tensor_parallel: int
    """The engine's workers: one on each of the group's first `tensor_parallel` ranks."""
    ranks_per_node: int = 0
    """Ranks per node of the job (0: the group's ranks are all on one node)."""

    @property
    def leader(self) -> int:
        """The rank that holds the engine's handle, its reward workers and its prompts."""
        return self.ranks[0]

    @property
    def worker_ranks(self) -> tuple[int, ...]:
        """Ranks whose devices hold one of the engine's tensor-parallel workers."""
        return self.ranks[:self.tensor_parallel]

    @property
    def workers_per_node(self) -> int:
        """The engine's workers on each node it spans (all of them on one node)."""
        if self.ranks_per_node and self.tensor_parallel > self.ranks_per_node:
            return self.ranks_per_node
        return self.tensor_parallel

    @property
    def nodes(self) -> int:
        """How many nodes the engine's workers span."""
        return self.tensor_parallel // self.workers_per_node

    @property
    def node_hosts(self) -> tuple[int, ...]:
        """Per node of the engine, in vLLM's node order (its worker ranks are node-major), the
        rank that starts that node's workers and receives their weights; the leader first."""
        return self.ranks[:self.tensor_parallel:self.workers_per_node]

    def nearby(self, host: int) -> tuple[int, ...]:
        """The ranks a node host takes the weights' fragments from first (resharding's
        `nearby`): its node's ranks of the group, or the whole group when the engine is on
        one node."""
        if self.nodes == 1:
            return self.ranks
        k = self.node_hosts.index(host)
        return self.ranks[k * self.workers_per_node:(k + 1) * self.workers_per_node]

    @property
    def name(self) -> str:
        return f"engine group {self.index} (ranks {self.ranks[0]}-{self.ranks[-1]})"


@dataclass(frozen=True, slots=True)
class Placement:
    groups: tuple[EngineGroup, ...]

    def group_of(self, rank: int) -> EngineGroup:
        size = len(self.groups[0].ranks)
        return self.groups[rank // size]

    @property
    def leaders(self) -> tuple[int, ...]:
        return tuple(g.leader for g in self.groups)

    @property
    def node_hosts(self) -> tuple[int, ...]:
        """Every rank that starts engine workers and receives their weights (the leaders
        and, for engines wider than a node, the other nodes' hosts)."""
        return tuple(h for g in self.groups for h in g.node_hosts)


def ranks_per_engine(rollout: RolloutConfig, ranks_per_node: int) -> int:
    """rollout.ranks_per_engine, or its default: one node, or `tensor_parallel` ranks when
    one engine needs more than a node."""
    if rollout.ranks_per_engine is not None:
        return rollout.ranks_per_engine
    return max(ranks_per_node, rollout.tensor_parallel)


def resolve_placement(rollout: RolloutConfig, world_size: int, ranks_per_node: int) -> Placement:
    """The engine groups of a run of `world_size` ranks, `ranks_per_node` per node; raises
    ValueError naming the field when the engines would not start:
    - every worker sits on one rank of its group (ranks_per_engine >= tensor_parallel);
    - groups do not straddle nodes unevenly: a group inside a node divides it, a group wider
      than a node is whole nodes (its first rank is then a node's first rank);
    - an engine wider than a node fills whole nodes (vLLM's multiprocessing executor starts
      the same number of workers on every node: world_size % nnodes,
      v1/executor/multiproc_executor.py `_get_parallel_sizes`)."""
    if ranks_per_node < 1 or world_size % ranks_per_node:
        raise ValueError(f"{world_size} ranks cannot be {ranks_per_node} per node: the ranks "
                         "per node must divide the world size")
    if rollout.tensor_parallel > ranks_per_node and rollout.tensor_parallel % ranks_per_node:
        raise ValueError(f"rollout.tensor_parallel={rollout.tensor_parallel} spans nodes of "
                         f"{ranks_per_node} ranks but not whole ones: an engine wider than a "
                         "node has a worker beside every rank of each node it spans (vLLM "
                         "starts the same number of workers on each)")
    size = ranks_per_engine(rollout, ranks_per_node)
    default = '' if rollout.ranks_per_engine else ' (default: one node)'
    if size < rollout.tensor_parallel:
        raise ValueError(f"rollout.ranks_per_engine={size} is smaller than "
                         f"rollout.tensor_parallel={rollout.tensor_parallel}: every engine "
                         "worker sits on one rank of its group")
    if world_size % size:
        raise ValueError(f"rollout.ranks_per_engine={size}{default} does "
                         f"not divide the world size {world_size}")
    if (size < ranks_per_node and ranks_per_node % size) or \
            (size > ranks_per_node and size % ranks_per_node):
        raise ValueError(f"rollout.ranks_per_engine={size}{default} straddles nodes of "
                         f"{ranks_per_node} ranks: an engine group is a divisor of a node or "
                         "whole nodes")
    return Placement(tuple(EngineGroup(g, tuple(range(g * size, (g + 1) * size)),
                                       rollout.tensor_parallel, ranks_per_node)
                           for g in range(world_size // size)))


def split_prompts(num_prompts: int, num_groups: int) -> list[range]:
    """Contiguous blocks of prompt indices, one per engine group, sizes differing by at most
    one (the first groups take the extra prompts)."""
    base, extra = divmod(num_prompts, num_groups)
    blocks, start = [], 0
    for g in range(num_groups):
        stop = start + base + (g < extra)
        blocks.append(range(start, stop))
        start = stop
    return blocks


def request_seed(base_seed: int, prompt_index: int, sample_index: int) -> int:
    """The sampling seed of one request (sample `sample_index` of prompt `prompt_index` of a
    call whose seed is `base_seed`): a hash, so that nearby indices give unrelated streams
    and no engine count or batch order changes it. 63 bits (vLLM takes a signed int64)."""
    digest = hashlib.blake2b(f"{base_seed}/{prompt_index}/{sample_index}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def cpu_binding(cores: list[int], group_on_node: int, groups_on_node: int,
                workers: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for one CPU engine: this node's cores cut evenly between its
    engines, and each engine's share between its workers ('0-3|4-7'). Measured on the 2-core
    machine: two engines left on vLLM's default binding both pin to core 0 (8.0k tok/s
    together), bound to a core each 11.1k."""
    if not cores:
        raise ValueError("no CPU cores are available to this process")
    share = max(len(cores) // groups_on_node, 1)
    mine = cores[(group_on_node * share) % len(cores):][:share] or cores[:share]
    per_worker = max(len(mine) // workers, 1)
    parts = []
    for w in range(workers):
        chunk = mine[(w * per_worker) % len(mine):][:per_worker] or mine[:per_worker]
        parts.append(",".join(str(c) for c in chunk))
    return "|".join(parts)
