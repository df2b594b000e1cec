"""Test support: under torchrun (gloo, world 4), the hand-over of one sync bucket from every
engine node's host to its leader, for two placements of the same world: one TP4 engine over
two "nodes" of two ranks (hosts 0 and 2), and two TP2 engines over nodes of one rank (hosts
0-1 and 2-3). Every host writes the bucket to its node's directory (engine_nodes.hand_over),
the leader receives every host's payload in node order (EngineNodes.gather), reads each file
back and compares it with the bucket; after the barrier each host removes its file. Non-hosts
get no EngineNodes. Prints RESULT ok on every rank that passed.

Usage: torchrun --nproc-per-node=4 engine_nodes_worker.py"""

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from megatron_r1.config.schema import RolloutConfig
from megatron_r1.rollout.engine_nodes import engine_nodes, hand_over, release, transfer_directory
from megatron_r1.rollout.placement import resolve_placement

if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cases = {"tp4 over nodes of 2": (RolloutConfig(tensor_parallel=4), 2, {0: (0, 2), 2: (0, 2)}),
             "tp2 over nodes of 1": (RolloutConfig(tensor_parallel=2), 1,
                                     {0: (0, 1), 1: (0, 1), 2: (2, 3), 3: (2, 3)})}
    for name, (rollout, per_node, hosts_of) in cases.items():
        placement = resolve_placement(rollout, 4, per_node)
        nodes = engine_nodes(placement, rank, timeout_minutes=1.0)
        if rank not in hosts_of:
            assert nodes is None, (name, rank, nodes)
            continue
        assert nodes is not None and nodes.hosts == hosts_of[rank], (name, rank, nodes)
        assert nodes.node == nodes.hosts.index(rank)
        assert nodes.master_port > 0 and nodes.master_addr, nodes  # the leader's, on every host
        assert nodes.vllm_kwargs()["nnodes"] == 2 and nodes.vllm_kwargs()["node_rank"] == nodes.node
        bucket = [("w", torch.arange(6.0).view(2, 3) + rank), ("b", torch.ones(4) * rank)]
        directory = transfer_directory()
        payload = hand_over(bucket, 7, directory, nodes)
        payloads = nodes.gather(payload)
        if nodes.node == 0:
            assert payloads is not None and len(payloads) == 2
            for host, path in zip(nodes.hosts, payloads):
                got = load_file(str(path))
                assert torch.equal(got["w"], torch.arange(6.0).view(2, 3) + host), (name, host)
                assert torch.equal(got["b"], torch.ones(4) * host)
        else:
            assert payloads is None
        nodes.barrier()  # the leader has read every file
        release(payload)
        assert not Path(str(payload)).exists()
        directory.rmdir()
    print(f"RESULT ok rank {rank}")
    dist.destroy_process_group()
