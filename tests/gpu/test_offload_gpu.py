"""Offloading on CUDA gives the memory back to the driver, where the colocated engine (another
process) can take it: vLLM sizes itself from torch.cuda.mem_get_info and refuses to start
below gpu_memory_utilization x total (vllm/v1/worker/utils.py, around line 761). A storage
freed without torch.cuda.empty_cache() stays in this process's caching allocator, invisible
to the driver's free count. GPU check (skipped without CUDA); on CPU tests/test_offload.py
checks the round trip itself."""

from __future__ import annotations

import pytest
import torch

from megatron_r1.offload import ModelOffload

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_offload_returns_the_memory_to_the_driver_and_restores_exactly():
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    model = torch.nn.Linear(8192, 8192, device=device)  # 256 MiB of fp32 weights
    expected = model.weight.detach().cpu()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # start from an allocator that holds only the weights
    free_before = torch.cuda.mem_get_info(device)[0]
    offload = ModelOffload([model], device)
    offload.offload()
    free_after = torch.cuda.mem_get_info(device)[0]
    # the whole storage is free for another process (allocator granularity: 2 MiB blocks)
    assert free_after - free_before >= offload.nbytes - 2**21, (free_before, free_after)
    assert model.weight.untyped_storage().nbytes() == 0
    with offload.on_device():
        assert torch.equal(model.weight.cpu(), expected)
    assert torch.cuda.mem_get_info(device)[0] - free_before >= offload.nbytes - 2**21
