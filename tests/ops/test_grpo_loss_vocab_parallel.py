"""megatron_r1.ops.grpo_loss_vocab_parallel: the loss over a vocabulary split across gloo ranks
equals the unsharded result (values and each shard's gradient, 2x rule vs float64)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ops._grpo_loss_cases import shard_bounds, tp_worker

from megatron_r1.ops import grpo_token_loss, grpo_token_loss_reference


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_equals_unsharded(world, tmp_path) -> None:
    # kernels and the PyTorch backend, float32 and bfloat16, equal and uneven shards,
    # backward-time, forward-time and rescaled gradients (see tp_scenarios).
    # Forked ranks (1 thread each) inherit the imported torch, including torch._dynamo, which
    # custom ops import on first call (~5 s per process when spawned). A process group left
    # initialised in this process would be inherited too: spawn then.
    import torch._dynamo  # noqa: F401

    method = "spawn" if dist.is_initialized() else "fork"
    mp.start_processes(tp_worker, args=(world, str(tmp_path / "init")), nprocs=world,
                       join=True, start_method=method)


def test_shard_bounds_cover_the_vocabulary() -> None:
    for world in (2, 3, 4):
        bounds = [shard_bounds(1003, world, r, even=False) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == 1003
        assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))


def test_single_rank_group_is_the_unsharded_path(tmp_path) -> None:
    """A tp_group of world size 1 takes the unsharded path (no collectives needed)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init1'}", rank=0,
                            world_size=1)
    try:
        x = torch.randn(5, 40)
        t = torch.randint(0, 40, (5,))
        args = (x, t, None, None, torch.randn(5), torch.ones(5))
        got = grpo_token_loss(*args, tp_group=dist.group.WORLD, fused="off")
        ref = grpo_token_loss_reference(*args)
        assert torch.equal(got.loss, ref.loss)
    finally:
        dist.destroy_process_group()
