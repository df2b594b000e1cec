"""Where the rollout engines live and who generates what: engine groups and request seeds.

Layer L0 (pure, cheap). The world is cut into engine groups of `rollout.ranks_per_engine`
consecutive ranks. Each group hosts one vLLM engine of `rollout.tensor_parallel` workers,
colocated with the group's first ranks (on GPUs the workers use those ranks' devices; on a CPU
each engine is its own process set, bound to its own cores). The group's first rank, the
leader, holds the engine's handle and the group's reward workers; every rollout's prompts are
split into contiguous blocks, one per group, and every request (prompt, sample) carries its
own seed, so the tokens of a rollout do not depend on how many engines produced it.
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

    @property
    def leader(self) -> int:
        """The rank that holds the engine's handle, its reward workers and its prompts."""
        return self.ranks[0]

    @property
    def worker_ranks(self) -> tuple[int, ...]:
        """Ranks whose devices hold one of the engine's tensor-parallel workers."""
        return self.ranks[:self.tensor_parallel]

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


def ranks_per_engine(rollout: RolloutConfig, ranks_per_node: int) -> int:
    """rollout.ranks_per_engine, or its default: one node, or `tensor_parallel` ranks when
    one engine needs more than a node."""
    if rollout.ranks_per_engine is not None:
        return rollout.ranks_per_engine
    return max(ranks_per_node, rollout.tensor_parallel)


def resolve_placement(rollout: RolloutConfig, world_size: int, ranks_per_node: int) -> Placement:
    """The engine groups of a run; raises ValueError naming the field when they do not fit."""
    size = ranks_per_engine(rollout, ranks_per_node)
    if size < rollout.tensor_parallel:
        raise ValueError(f"rollout.ranks_per_engine={size} is smaller than "
                         f"rollout.tensor_parallel={rollout.tensor_parallel}: every engine "
                         "worker sits on one rank of its group")
    if world_size % size:
        raise ValueError(f"rollout.ranks_per_engine={size}"
                         f"{'' if rollout.ranks_per_engine else ' (default: one node)'} does "
                         f"not divide the world size {world_size}")
    return Placement(tuple(EngineGroup(g, tuple(range(g * size, (g + 1) * size)),
                                       rollout.tensor_parallel)
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
