"""The local spec's fused attention (model/attention.py) and grouped experts
(model/experts.py) compute what megatron-core's own DotProductAttention and SequentialMLP
compute, for outputs and gradients, in fp32 and bf16.

The reference is megatron-core 0.16.1's code itself, called on the same module
(`DotProductAttention.forward(module, ...)`, `SequentialMLP.forward(module, ...)`): its packed
form is its forward once per sequence, which is what the local spec did before.
Tolerance (STYLE.md): error(ours vs float64) <= 2 x error(megatron's, same dtype, vs float64)
+ atol, where the float64 value is megatron's own forward on float64 copies; atol is a few
units of roundoff of the output's scale (fp32: 1e-6, bf16: 2e-2 relative to max |out|), for
cases where megatron's own error happens to be ~0.

One fresh interpreter for every case (megatron's process groups are process-global; the
imports are the cost, about 10 s).
"""

from __future__ import annotations

import json

from procs import run_python

CODE = r"""
import json, torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron_r1.config import load_config
from megatron_r1.layout import resolve_layout
from megatron_r1.model.attention import PackedDotProductAttention
from megatron_r1.model.build import build_model
from megatron_r1.model.experts import GroupedSequentialMLP
from megatron_r1.parallel.init import init_parallel
from megatron_r1.parallel.launch_env import discover
from types import SimpleNamespace

ATOL = {torch.float32: 1e-6, torch.bfloat16: 2e-2}

def build(*overrides):
    cfg = load_config("configs/demo_sft.yaml", list(overrides))
    layout = resolve_layout(cfg.parallel, cfg.model, cfg.train, 1, cfg.data.seq_length)
    ctx = init_parallel(layout, cfg.parallel, discover({}), 1234)
    return build_model(cfg.model, cfg.parallel, ctx)[0]

def compare(ours, theirs, args, dtype, module=None):
    # outputs and input/weight gradients of `ours` and `theirs` in dtype against theirs in
    # float64 on the same (dtype-rounded) weights of `module`, converted in place (modules
    # holding process groups cannot be copied)
    def run(fn, cast):
        if module is not None:
            module.to(cast)
        params = list(module.parameters()) if module is not None else []
        xs = [a.detach().to(cast).requires_grad_() for a in args]
        out = fn(*xs)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).to(cast))
        grads = [x.grad for x in xs] + [p.grad.clone() for p in params]
        for p in params: p.grad = None
        return [out.detach().double()] + [g.double() for g in grads]
    mine, ref = run(ours, dtype), run(theirs, dtype)
    exact = run(theirs, torch.float64)
    worst = 0.0
    for a, b, e in zip(mine, ref, exact):
        atol = ATOL[dtype] * float(e.abs().max())
        err_ours, err_theirs = float((a - e).abs().max()), float((b - e).abs().max())
        if err_ours:  # a gradient that is exactly zero on both sides (an idle expert) passes
            worst = max(worst, err_ours / (2 * err_theirs + atol))
    return worst

out = {}
model = build()
attn = model.decoder.layers[0].self_attention.core_attention
assert type(attn) is PackedDotProductAttention, type(attn)
experts = model.decoder.layers[0].mlp.experts
assert type(experts) is GroupedSequentialMLP, type(experts)
torch.manual_seed(0)
heads, groups, dim = 4, 2, 32  # demo_sft: 4 heads, 2 query groups, kv_channels 32
for dtype in (torch.float32, torch.bfloat16):
    tag = str(dtype).split(".")[1]
    # padded batches: [s, b, heads, dim], causal, grouped-query heads
    q, k, v = torch.randn(37, 3, heads, dim), torch.randn(37, 3, groups, dim), torch.randn(37, 3, groups, dim)
    fused = lambda q, k, v: attn(q, k, v, None)
    mega = lambda q, k, v: DotProductAttention.forward(attn, q, k, v, None)
    out[f"padded_{tag}"] = compare(fused, mega, [q, k, v], dtype)
    # packed sequences (thd), one of length 1: megatron's forward per sequence is the reference
    lengths = [5, 17, 1, 30]
    cu = torch.tensor([0, 5, 22, 23, 53], dtype=torch.int32)
    packed = SimpleNamespace(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=30, max_seqlen_kv=30)
    q, k, v = torch.randn(53, heads, dim), torch.randn(53, groups, dim), torch.randn(53, groups, dim)
    fused = lambda q, k, v: attn(q, k, v, None, packed_seq_params=packed)
    def per_sequence(q, k, v):
        return torch.cat([DotProductAttention.forward(attn, q[a:b, None], k[a:b, None], v[a:b, None], None)
                          for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    out[f"packed_{tag}"] = compare(fused, per_sequence, [q, k, v], dtype)
    # the packed result is the padded result of each sequence alone
    one = attn(q[5:22, None].to(dtype), k[5:22, None].to(dtype), v[5:22, None].to(dtype), None)
    out[f"packed_is_per_sequence_{tag}"] = float((attn(q.to(dtype), k.to(dtype), v.to(dtype), None, packed_seq_params=packed)[5:22] - one).abs().max())

    # routed experts: 4 local experts, one of them without tokens (fp32 first: the bf16
    # case rounds the weights)
    counts = torch.tensor([7, 0, 12, 5])
    h, probs = torch.randn(24, experts.config.hidden_size), torch.rand(24)
    grouped = lambda h, p: experts(h, counts, p)[0]
    loop = lambda h, p: SequentialMLP.forward(experts, h, counts, p)[0]
    out[f"experts_{tag}"] = compare(grouped, loop, [h, probs], dtype, module=experts)
# megatron's own path where SDPA does not apply: an explicit mask
mask = torch.rand(2, 1, 9, 9) > 0.5
q, k, v = torch.randn(9, 2, heads, dim), torch.randn(9, 2, groups, dim), torch.randn(9, 2, groups, dim)
out["explicit_mask_falls_back"] = float((attn(q, k, v, mask) - DotProductAttention.forward(attn, q, k, v, mask)).abs().max())
print(json.dumps(out))
"""


def test_fused_attention_and_grouped_experts_match_megatrons_own_layers():
    proc = run_python(CODE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, ratio in got.items():
        if key.startswith(("padded_", "packed_", "experts_")) and "is_per" not in key:
            assert ratio <= 1.0, (key, ratio)  # within 2x megatron's own error (+ atol)
    assert got["packed_is_per_sequence_float32"] < 1e-6, got
    assert got["packed_is_per_sequence_bfloat16"] < 2e-2, got
    assert got["explicit_mask_falls_back"] == 0.0, got
