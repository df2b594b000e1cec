"""Two engine overheads issue 23 removed, measured on the same machine in one run:

- where vLLM's engine core runs: in the trainer's process (VLLMEngine's default,
  VLLM_ENABLE_V1_MULTIPROCESSING=0) or in a process of its own (vLLM's default): the time to
  construct a `VLLMEngine` (worker start, model load, KV cache), in a fresh process each;
- vLLM's per-step detokenisation and per-logprob dicts: one `LLM.generate` of 256 requests x
  48 tokens (ignore_eos, so every setting generates the same number of tokens) with
  `detokenize=True` and dict log-probs (before) against `detokenize=False, flat_logprobs=True`
  (what `VLLMEngine.generate` asks for; its texts are decoded once afterwards, `_texts`).

The engine loads dummy weights into the model of --model (a Hugging Face directory with
config.json and tokenizer; default: the demo's engine directory, which `make demo` writes).

    python benchmarks/bench_engine_overheads.py

Writes benchmarks/results/engine_overheads_cpu_<time>.csv (device, commit, shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance import commit, cpu_name, write_rows  # noqa: E402

REQUESTS, TOKENS = 256, 48


def worker(core: str, model: str, repeats: int) -> None:
    import torch
    from vllm import SamplingParams

    from megatron_r1.config.schema import RolloutConfig
    from megatron_r1.rollout.vllm_engine import VLLMEngine

    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"} if core == "separate" else None
    start = time.perf_counter()
    engine = VLLMEngine(model, RolloutConfig(), max_model_len=128, seed=0, dtype=torch.float32,
                        load_format="dummy", env=env)
    result: dict[str, float] = {"start_s": time.perf_counter() - start}
    prompts = [{"prompt_token_ids": [1, *range(10 + i % 50, 30 + i % 50)]}
               for i in range(REQUESTS)]
    settings = {"detokenized_dict_logprobs": dict(detokenize=True, flat_logprobs=False),
                "no_detokenize_flat_logprobs": dict(detokenize=False, flat_logprobs=True)}
    times: dict[str, list[float]] = {name: [] for name in settings}
    for i in range(repeats + 1):  # the first round warms up
        for name, extra in settings.items():
            params = SamplingParams(n=1, temperature=1.0, max_tokens=TOKENS, ignore_eos=True,
                                    logprobs=0, seed=i, **extra)
            t = time.perf_counter()
            engine._llm.generate(prompts, params, use_tqdm=False)
            if i:
                times[name].append(time.perf_counter() - t)
    result.update({f"generate_{name}_s": statistics.median(v) for name, v in times.items()})
    engine.close()
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=2, metavar=("CORE", "MODEL"), default=None)
    parser.add_argument("--model", type=Path,
                        default=REPO / "runs/demo/grpo/engine_model/group0")
    parser.add_argument("--repeats", type=int, default=3, help="generates per setting")
    parser.add_argument("--starts", type=int, default=2, help="fresh processes per core mode")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.repeats)
        return
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"--model {args.model}: no config.json (run `make demo` first, or "
                         "pass a Hugging Face model directory)")
    rows = []
    for core in ("separate", "in_process"):
        for _ in range(args.starts):
            proc = subprocess.run([sys.executable, __file__, "--worker", core, str(args.model),
                                   "--repeats", str(args.repeats)], cwd=REPO,
                                  capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-4000:])
            line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
            rows.append({"device": f"cpu ({cpu_name()})", "commit": commit(),
                         "engine_core": core, "model": str(args.model),
                         "requests": REQUESTS, "new_tokens": TOKENS, "dtype": "fp32",
                         **json.loads(line[len("RESULT "):]),
                         "load_avg_1min": os.getloadavg()[0]})
            print(json.dumps(rows[-1]), flush=True)
    write_rows(rows, args.out, "engine_overheads_cpu")


if __name__ == "__main__":
    main()
