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


TRAIN_STATE = """
import json, tempfile, torch
from megatron_r1.config import load_config
from megatron_r1.offload import TrainStateOffload
from megatron_r1.parallel.launch_env import discover
from megatron_r1.session import end_session, start_session

cfg = load_config(None, ["model.params_dtype=bf16", "logging.tensorboard=false",
                         f"logging.run_dir={tempfile.mkdtemp()}", "model.num_layers=4",
                         "model.hidden_size=1024", "model.ffn_hidden_size=4096",
                         "model.num_attention_heads=8", "model.num_experts=0",
                         "model.vocab_size=32000", "rollout.offload_train_state=true"])
session = start_session(cfg, discover({"MASTER_PORT": "29637"}))
device = session.ctx.device
weights = sum(p.numel() * p.element_size() for c in session.model for p in c.parameters())
before = torch.cuda.memory_allocated(device)
offload = TrainStateOffload(session.model, session.optimizer, device)  # as open_stage does
moved = offload.offload()
torch.cuda.synchronize()
out = {"weights": weights, "before": before, "after": torch.cuda.memory_allocated(device),
       "reserved": torch.cuda.memory_reserved(device), "moved": moved}
offload.restore()
end_session(session)
print("RESULT " + json.dumps(out))
"""


def test_the_train_state_leaves_the_gpu_before_the_engine_starts():
    """What grpo_trainer.open_stage does before the engines start, on CUDA (bf16, NCCL world
    size 1, no Transformer Engine needed): after the offload this process holds the weights
    (and a little besides: RoPE tables, the allocator's 2 MiB granularity) and has given the
    rest back to the driver, where vLLM's start-up check looks."""
    import json

    from procs import run_python

    proc = run_python(TRAIN_STATE, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(next(x for x in proc.stdout.splitlines()
                        if x.startswith("RESULT "))[len("RESULT "):])
    # bf16 weights + fp32 master weights + fp32 gradients before: about 5x the weights
    assert r["before"] > 4 * r["weights"], r
    assert r["after"] <= r["weights"] + 64 * 2**20, r
    assert r["reserved"] - r["after"] <= 64 * 2**20, r  # returned, not cached
    assert r["moved"]["offload/grads_freed_gb"] * 1e9 >= 2 * r["weights"] * 0.99
