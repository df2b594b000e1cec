"""Engine groups, the prompt split and per-request seeds (pure)."""

from __future__ import annotations

import re

import pytest

from megatron_r1.config.schema import RolloutConfig
from megatron_r1.rollout.placement import (
    cpu_binding,
    request_seed,
    resolve_placement,
    split_prompts,
)


def test_groups_of_consecutive_ranks():
    placement = resolve_placement(RolloutConfig(ranks_per_engine=2), 4, 4)
    assert [g.ranks for g in placement.groups] == [(0, 1), (2, 3)]
    assert placement.leaders == (0, 2)
    assert placement.group_of(3).index == 1 and placement.group_of(2).leader == 2
    assert placement.groups[0].worker_ranks == (0,)
    assert "ranks 2-3" in placement.groups[1].name


def test_default_is_one_node_or_the_engine_size():
    assert len(resolve_placement(RolloutConfig(), 16, 8).groups) == 2
    wide = resolve_placement(RolloutConfig(tensor_parallel=16), 32, 8)
    assert [len(g.ranks) for g in wide.groups] == [16, 16]
    assert wide.groups[1].worker_ranks == tuple(range(16, 32))


def test_engines_wider_than_a_node_span_whole_nodes():
    """TP16 on nodes of 8: each engine's workers fill two nodes, one beside each rank; the
    first rank on each node (its host) starts that node's workers and takes fragments from
    its own node's ranks first."""
    placement = resolve_placement(RolloutConfig(tensor_parallel=16), 32, 8)
    group = placement.groups[1]
    assert group.ranks == tuple(range(16, 32)) and group.nodes == 2
    assert group.workers_per_node == 8 and group.node_hosts == (16, 24)
    assert placement.node_hosts == (0, 8, 16, 24)
    assert group.nearby(24) == tuple(range(24, 32)) and group.nearby(16) == tuple(range(16, 24))
    # an engine within a node: its leader is its only host and asks its whole group first
    narrow = resolve_placement(RolloutConfig(tensor_parallel=2, ranks_per_engine=4), 8, 8)
    assert narrow.node_hosts == (0, 4) and narrow.groups[1].nearby(4) == (4, 5, 6, 7)
    assert narrow.groups[1].worker_ranks == (4, 5)  # none beside ranks 6 and 7
    # one rank per node: a TP2 engine across two nodes (the two-node tests' layout)
    pair = resolve_placement(RolloutConfig(tensor_parallel=2), 2, 1)
    assert pair.groups[0].node_hosts == (0, 1) and pair.groups[0].nearby(1) == (1,)


@pytest.mark.parametrize(("rollout", "world", "per_node", "message"), [
    (RolloutConfig(tensor_parallel=12), 24, 8,
     "rollout.tensor_parallel=12 spans nodes of 8 ranks but not whole ones"),
    (RolloutConfig(ranks_per_engine=3), 12, 4,
     "rollout.ranks_per_engine=3 straddles nodes of 4 ranks"),
    (RolloutConfig(tensor_parallel=8, ranks_per_engine=12), 24, 8,
     "rollout.ranks_per_engine=12 straddles nodes of 8 ranks"),
    (RolloutConfig(), 12, 8, "12 ranks cannot be 8 per node"),
])
def test_layouts_that_would_not_start_are_refused(rollout, world, per_node, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_placement(rollout, world, per_node)


def test_bad_placements_name_the_field():
    with pytest.raises(ValueError, match=re.escape("rollout.ranks_per_engine=2 is smaller "
                                                   "than rollout.tensor_parallel=4")):
        resolve_placement(RolloutConfig(ranks_per_engine=2, tensor_parallel=4), 8, 8)
    with pytest.raises(ValueError, match=r"rollout.ranks_per_engine=3 does not divide the "
                                         r"world size 4"):
        resolve_placement(RolloutConfig(ranks_per_engine=3), 4, 4)
    with pytest.raises(ValueError, match=re.escape("rollout.ranks_per_engine=0: must be > 0")):
        RolloutConfig(ranks_per_engine=0)


@pytest.mark.parametrize(("prompts", "groups"), [(8, 2), (7, 3), (2, 4), (0, 2)])
def test_prompt_blocks_cover_every_prompt_once_in_order(prompts, groups):
    blocks = split_prompts(prompts, groups)
    assert len(blocks) == groups
    assert [p for b in blocks for p in b] == list(range(prompts))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_request_seeds_are_stable_and_distinct():
    seeds = {request_seed(7, p, s) for p in range(64) for s in range(16)}
    assert len(seeds) == 64 * 16
    assert all(0 <= x < 2**63 for x in seeds)
    assert request_seed(7, 3, 1) == request_seed(7, 3, 1) != request_seed(8, 3, 1)


def test_cpu_binding_gives_each_engine_its_own_cores():
    assert [cpu_binding([0, 1], g, 2, 1) for g in (0, 1)] == ["0", "1"]
    assert cpu_binding([0, 1], 0, 1, 2) == "0|1"
    cores = list(range(8))
    assert [cpu_binding(cores, g, 2, 2) for g in (0, 1)] == ["0,1|2,3", "4,5|6,7"]
    assert cpu_binding([5], 1, 2, 2) == "5|5"  # fewer cores than workers: shared, not none


def test_engine_environment_places_each_engine(monkeypatch):
    """On GPUs the engine's workers see its group's devices; on a CPU its cores."""
    import torch

    from megatron_r1.parallel.launch_env import LaunchEnv
    from megatron_r1.rollout.vllm_engine import engine_environment

    placement = resolve_placement(RolloutConfig(ranks_per_engine=4, tensor_parallel=2), 8, 8)
    leader = LaunchEnv("torchrun", 4, 8, 4, "127.0.0.1", 0, local_world_size=8)
    cuda = torch.device("cuda", 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert engine_environment(placement.groups[1], leader, cuda) == {"CUDA_VISIBLE_DEVICES": "4,5"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7,6,5,4,3,2,1,0")
    assert engine_environment(placement.groups[1], leader, cuda) == {"CUDA_VISIBLE_DEVICES": "3,2"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4")  # a per-task GPU binding
    with pytest.raises(ValueError, match="every GPU of the node visible"):
        engine_environment(placement.groups[1], leader, cuda)
    # an engine across two nodes of 8: each node's host gives its workers its node's devices
    wide = resolve_placement(RolloutConfig(tensor_parallel=16), 32, 8)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    host = LaunchEnv("torchrun", 24, 32, 0, "", 0, 8)  # node 1 of engine group 1
    assert engine_environment(wide.groups[1], host, cuda) == {
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}

    monkeypatch.setattr("os.sched_getaffinity", lambda _: {0, 1, 2, 3})
    two = resolve_placement(RolloutConfig(ranks_per_engine=1), 2, 2)
    env = [engine_environment(g, LaunchEnv("torchrun", g.leader, 2, g.leader, "", 0, 2),
                              torch.device("cpu")) for g in two.groups]
    assert env == [{"VLLM_CPU_OMP_THREADS_BIND": "0,1"}, {"VLLM_CPU_OMP_THREADS_BIND": "2,3"}]


def test_every_node_host_hands_its_bucket_to_the_leader_at_world_size_4():
    """engine_nodes under gloo (tests/rollout/engine_nodes_worker.py): the hosts of each
    multi-node engine, their leader's address, the gather of their payloads in node order, the
    barrier, the files' contents and their removal; for two placements of one world."""
    from procs import REPO, run_script

    proc = run_script(REPO / "tests/rollout/engine_nodes_worker.py", [], nproc=4, timeout=300)
    assert proc.stdout.count("RESULT ok") == 4, proc.stdout[-2000:]
