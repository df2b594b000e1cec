"""Peak host memory of SFT data on one rank: the data set, then some steps of micro-batches.

Each measurement runs in a fresh process (peak RSS cannot be reset) that reads a synthetic
JSONL source through `megatron_r1.data.mix.sft_batch_source` and takes --steps steps; it
reports the peak RSS and its growth over the process before the data (imports and the
tokenizer). Variants:
- `memory`: tokenized into memory on every rank (the only way before the token store; the
  former code padded every example to seq_length + 1 into [N, S] tensors);
- `cache_build`: rank 0 building the memory-mapped token store in data.cache_dir;
- `cache_open`: any other rank (or a later run) opening that store.

--repo measures another checkout's code (e.g. the parent commit, extracted with
`git archive`), which has only the `memory` variant when it predates the store.

    python benchmarks/bench_sft_data_memory.py                        # 20,000 at 4,096
    python benchmarks/bench_sft_data_memory.py --repo /tmp/before --variants memory

Writes benchmarks/results/sft_data_memory_<device>_<time>.csv (device, commit, shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance import commit, cpu_name, write_rows  # noqa: E402

CHILD = """
import json, resource, sys, time
from pathlib import Path
from megatron_r1.batching import MicroBatching
from megatron_r1.config.schema import DataConfig
from megatron_r1.data.mix import sft_batch_source
from megatron_r1.data.tokenizer import build_arithmetic_tokenizer

args = json.loads(sys.argv[1])
tok = build_arithmetic_tokenizer(Path(args["tokenizer"]), vocab_size=512)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
data = DataConfig(source="jsonl", path=args["path"], seq_length=args["seq_length"],
                  template="none")
cache = {} if args["cache_dir"] is None else {"cache_dir": args["cache_dir"]}
source, _ = sft_batch_source(data, tok, global_batch_size=args["global_batch"],
                             micro_batching=MicroBatching(args["micro_batch"]), dp_rank=0,
                             dp_size=1, **cache)
ready = time.perf_counter() - start
positions = 0
for _ in range(args["steps"]):
    positions += sum(mb["tokens"].numel() for mb in source.next_step().micro_batches)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT " + json.dumps({"peak_rss_mb": peak / 1024, "growth_mb": (peak - before) / 1024,
                              "data_ready_s": ready, "batch_positions": positions,
                              "mean_positions": float(source.dataset.length_N.double().mean())}))
"""


def write_source(path: Path, examples: int, mean_tokens: int, seed: int) -> float:
    """Arithmetic-style examples whose completions have log-normal lengths (median
    mean_tokens / 2, a long tail) up to about 3,500 tokens; returns the mean characters."""
    rng = random.Random(seed)
    chars = 0
    with path.open("w") as f:
        for i in range(examples):
            steps = min(int(rng.lognormvariate(0.0, 1.0) * mean_tokens / 24) + 1, 350)
            work = " ".join(f"{i % 89} + {k} = {i % 89 + k} ;" for k in range(steps))
            line = json.dumps({"prompt": f"Compute {i} + {i % 97}",
                               "completion": f"<think> {work} </think> <answer> {i} </answer>"})
            chars += len(line)
            f.write(line + "\n")
    return chars / examples


def measure(repo: Path, args: dict[str, object]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--mean-tokens", type=int, nargs="+", default=[40, 1000],
                        help="completion length scales (tokens) to measure")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose code runs")
    parser.add_argument("--commit", default=None, help="the commit --repo holds")
    parser.add_argument("--variants", nargs="+", default=["memory", "cache_build", "cache_open"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    opts = parser.parse_args()

    from megatron_r1.data.tokenizer import build_arithmetic_tokenizer

    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Path(tmp) / "tok"
        build_arithmetic_tokenizer(tokenizer, vocab_size=512)
        for mean in opts.mean_tokens:
            path = Path(tmp) / f"sft_{mean}.jsonl"
            chars = write_source(path, opts.examples, mean, seed=0)
            for variant in opts.variants:
                args = {"tokenizer": str(tokenizer), "path": str(path),
                        "seq_length": opts.seq_length, "steps": opts.steps,
                        "global_batch": opts.global_batch, "micro_batch": opts.micro_batch,
                        "cache_dir": None if variant == "memory" else str(Path(tmp) / "cache")}
                result = measure(opts.repo, args)
                rows.append({"device": cpu_name(), "commit": opts.commit or commit(),
                             "variant": variant, "examples": opts.examples,
                             "seq_length": opts.seq_length, "mean_chars": round(chars),
                             "global_batch": opts.global_batch,
                             "micro_batch": opts.micro_batch, "steps": opts.steps,
                             **{k: round(v, 2) for k, v in result.items()}})
                print(rows[-1])
    write_rows(rows, opts.out, "sft_data_memory_cpu")


if __name__ == "__main__":
    main()
