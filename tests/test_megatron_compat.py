"""Each fix in megatron_compat is still needed (megatron fails the same way without it) and
still works (the megatron call succeeds with it). One fresh interpreter per fix: the fixes are
process-global.

If a megatron-core upgrade makes a "needed" check fail, the fix has become dead code: delete
it from megatron_compat (and its row here).
"""

from __future__ import annotations

import pytest
import torch

from procs import run_python

SETUP = """
import torch
from megatron_r1 import megatron_compat
megatron_compat.apply(skip=frozenset([{SKIP!r}]))
from megatron_r1.config import load_config
from megatron_r1.layout import resolve_layout
from megatron_r1.parallel.launch_env import discover

def ctx_for(*overrides):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron_r1.parallel.init import ParallelContext
    cfg = load_config(None, list(overrides))
    launch = discover({{}})
    layout = resolve_layout(cfg.parallel, cfg.model, cfg.train, 1, cfg.data.seq_length)
    dist.init_process_group("gloo", rank=0, world_size=1,
                            init_method=f"tcp://127.0.0.1:{{launch.master_port}}")
    # torn down before the interpreter exits, as the CLI does (parallel/init.py): left to
    # static destructors, gloo's threads once aborted the probe after it had passed
    # ("terminate called without an active exception", CI of stop 26)
    import atexit
    atexit.register(dist.destroy_process_group)
    parallel_state.initialize_model_parallel(create_gloo_process_groups=False)
    ctx = ParallelContext(layout=layout, launch=launch, device=torch.device("cpu"), tp_rank=0,
                          pp_rank=0, cp_rank=0, ep_rank=0, dp_rank=0,
                          pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    return cfg, ctx

def model(*overrides):
    from megatron.core import tensor_parallel
    from megatron_r1.model.build import build_model
    cfg, ctx = ctx_for(*overrides)
    if {SKIP!r} != "rng_tracker_on_cpu_generator":
        tensor_parallel.model_parallel_cuda_manual_seed(1)
    return cfg, ctx, build_model(cfg.model, cfg.parallel, ctx)[0]

def forward(m):
    tokens = torch.randint(0, 500, (2, 16))
    return m(tokens, torch.arange(16).expand(2, 16), None, labels=tokens).mean()
"""

# fix name -> (probe code, the error megatron raises without the fix)
PROBES = {
    "rng_tracker_on_cpu_generator": (
        "cfg, ctx = ctx_for()\n"
        "from megatron.core import tensor_parallel\n"
        "tensor_parallel.model_parallel_cuda_manual_seed(1)\n"
        "with tensor_parallel.get_cuda_rng_tracker().fork():\n    torch.rand(3)",
        "Torch not compiled with CUDA enabled"),
    "alltoall_dispatcher_without_streams": (
        "cfg, ctx, m = model('parallel.moe_token_dispatcher=alltoall')\nforward(m).backward()",
        "torch.cuda.Stream requires CUDA support"),
    "cuda_device_queries_to_cpu": (
        "cfg, ctx, m = model('model.num_experts=0')\nforward(m).backward()",
        "Torch not compiled with CUDA enabled"),
    "cuda_literals_to_cpu": (
        "cfg, ctx, m = model()\n"
        "from megatron_r1.optim import wrap_for_training, build_optimizer\n"
        "w = wrap_for_training([m], cfg.model, cfg.parallel, ctx)\n"
        "opt, _ = build_optimizer(w, cfg.optim, cfg.model, cfg.parallel, 10, ctx)\n"
        "forward(w[0]).backward(); opt.step()",
        "Torch not compiled with CUDA enabled"),
    "causal_mask_on_cpu": (  # megatron's own attention: the local spec's fallback path
        "from megatron_r1.model.attention import PackedDotProductAttention\n"
        "PackedDotProductAttention._fused_applies = lambda self, *args: False\n"
        "cfg, ctx, m = model('model.recompute=full')\nforward(m).backward()",
        "Torch not compiled with CUDA enabled"),
    "router_gemm_without_te": (
        "cfg, ctx, m = model()\nforward(m).backward()",
        "name 'te_general_gemm' is not defined"),
    "mla_without_te": (
        "cfg, ctx, m = model('model.multi_latent_attention=true', 'model.q_lora_rank=32',\n"
        "    'model.kv_lora_rank=16', 'model.qk_head_dim=16', 'model.qk_pos_emb_head_dim=8',\n"
        "    'model.v_head_dim=16')\nforward(m).backward()",
        "isinstance() arg 2 must be a type"),
}


def probe(skip: str, code: str):
    return run_python(SETUP.format(SKIP=skip) + code + "\nprint('PROBE-OK')")


needs_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU redirections apply only "
                                                                 "without CUDA")


@needs_cpu
@pytest.mark.parametrize("name", sorted(PROBES))
def test_fix_is_needed_and_works(name):
    code, error = PROBES[name]
    without = probe(name, code)
    assert without.returncode != 0 and error in without.stderr, (
        f"megatron no longer fails without {name}: remove the fix\n{without.stderr[-3000:]}")
    with_fix = probe("", code)
    assert with_fix.returncode == 0 and "PROBE-OK" in with_fix.stdout, with_fix.stderr[-3000:]


@needs_cpu
def test_no_compile_on_cpu_keeps_megatron_helpers_eager():
    code = (
        "from megatron.core.transformer.moe.router import TopKRouter\n"
        "print('COMPILED' if hasattr(TopKRouter._apply_expert_bias, '_torchdynamo_orig_callable')"
        " else 'PLAIN')\n"
        "from torch._dynamo.utils import counters\n"
        "cfg, ctx, m = model('model.moe_router_expert_bias=true',"
        " 'model.moe_router_score_function=sigmoid')\n"
        "forward(m).backward()\n"
        "print('FRAMES', sum(counters['frames'].values()))")
    without = probe("no_compile_on_cpu", code)
    assert "COMPILED" in without.stdout, "megatron no longer torch.compiles the helper: drop the fix"
    assert "FRAMES 0" not in without.stdout, without.stdout  # dynamo compiled frames
    with_fix = probe("", code)
    assert with_fix.returncode == 0 and "FRAMES 0" in with_fix.stdout, with_fix.stderr[-3000:]
