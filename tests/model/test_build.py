"""The policy built from our config is the model the config describes.

Each check runs in a fresh interpreter (megatron's process groups and the CPU redirections
are process-global).
"""

from __future__ import annotations

import json

from procs import run_python

PRELUDE = """
import json, torch
from megatron_r1.config import load_config
from megatron_r1.layout import resolve_layout
from megatron_r1.model.build import build_model, count_parameters
from megatron_r1.parallel.init import init_parallel
from megatron_r1.parallel.launch_env import discover

def build(path, *overrides, device=None):
    cfg = load_config(path, list(overrides))
    launch = discover({})
    layout = resolve_layout(cfg.parallel, cfg.model, cfg.train, 1, cfg.data.seq_length)
    ctx = init_parallel(layout, cfg.parallel, launch, 1234)
    chunks = build_model(cfg.model, cfg.parallel, ctx, device=device)
    return cfg, chunks
"""


def run_json(code: str) -> dict:
    proc = run_python(PRELUDE + code)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_deepseek_v3_on_meta_has_671b_total_and_37b_activated():
    got = run_json("""
cfg, chunks = build("configs/deepseek_v3_671b.yaml", "model.fp8=none", device=torch.device("meta"))
c = count_parameters(chunks, cfg.model)
print(json.dumps({"total": c.total, "activated": c.activated,
                  "meta": all(p.is_meta for p in chunks[0].parameters())}))
""")
    assert got["meta"]
    # DeepSeek-V3 report: 671B total, 37B activated per token (MTP module excluded).
    assert abs(got["total"] - 671e9) < 0.5e9, got
    assert 36.5e9 < got["activated"] < 38e9, got


def test_qwen3_moe_30b_a3b_counts():
    got = run_json("""
cfg, chunks = build("configs/qwen3_moe_30b_a3b.yaml", "parallel.expert=1", device=torch.device("meta"))
c = count_parameters(chunks, cfg.model)
print(json.dumps({"total": c.total, "activated": c.activated}))
""")
    # Qwen3-30B-A3B model card: 30.5B total, 3.3B activated.
    assert abs(got["total"] - 30.5e9) < 0.1e9, got
    assert abs(got["activated"] - 3.3e9) < 0.1e9, got


def test_dense_count_matches_the_architecture_by_hand():
    got = run_json("""
cfg, chunks = build(None, "model.num_experts=0", "model.num_query_groups=2")
print(json.dumps({"total": count_parameters(chunks, cfg.model).total}))
""")
    h, f, layers, vocab, heads, groups = 64, 128, 2, 512, 4, 2
    head = h // heads
    per_layer = (h * (heads + 2 * groups) * head  # fused QKV (GQA)
                 + heads * head * h                 # attention output
                 + h * 2 * f + f * h                # SwiGLU fc1 (gate, up) and fc2
                 + 2 * head                         # query and key RMSNorm (Qwen3)
                 + 2 * h)                           # two RMSNorm weights
    assert got["total"] == vocab * h + layers * per_layer + h + vocab * h


def test_deepseek_style_tiny_moe_trains_a_step_and_is_causal():
    """MLA (on the local spec, through LatentDotProductAttention), YaRN, a dense first layer,
    shared expert, sigmoid routing with expert bias and group-limited routing."""
    got = run_json("""
cfg, chunks = build(None, "model.num_layers=3", "model.multi_latent_attention=true",
    "model.q_lora_rank=32", "model.kv_lora_rank=16", "model.qk_head_dim=16",
    "model.qk_pos_emb_head_dim=8", "model.v_head_dim=24", "model.position_embedding=yarn",
    "model.rotary_scaling_factor=4", "model.original_max_position_embeddings=32",
    "model.moe_first_dense_layers=1", "model.moe_shared_expert_size=64",
    "model.moe_router_score_function=sigmoid", "model.moe_router_expert_bias=true",
    "model.moe_router_num_groups=2", "model.moe_router_group_topk=1",
    "model.moe_router_topk_scaling_factor=2.5")
m = chunks[0]
names = [n for n, _ in m.named_parameters()]
buffers = [n for n, _ in m.named_buffers()]
tokens = torch.randint(0, 500, (2, 32)); pos = torch.arange(32).expand(2, 32)
logits = m(tokens, pos, None)
loss = m(tokens, pos, None, labels=tokens).mean(); loss.backward()
changed = tokens.clone(); changed[:, -1] = (changed[:, -1] + 1) % 500
logits2 = m(changed, pos, None)
print(json.dumps({
    "dense_first": not any(n.startswith("decoder.layers.0.mlp.router") for n in names),
    "moe_second": any(n.startswith("decoder.layers.1.mlp.router") for n in names),
    "shared": any(".shared_experts." in n for n in names),
    "expert_bias": any(b.endswith("router.expert_bias") for b in buffers),
    "mla": any("linear_kv_down_proj" in n for n in names),
    "all_grads": all(p.grad is not None for p in m.parameters()),
    "finite": bool(torch.isfinite(loss)),
    "prefix_unchanged": bool((logits[:, :-1] - logits2[:, :-1]).abs().max() == 0),
    "last_changed": bool((logits[:, -1] - logits2[:, -1]).abs().max() > 0),
}))
""")
    assert got == {k: True for k in got}, got
