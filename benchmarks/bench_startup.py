"""Start-up of a training stage from a checkpoint: `start_session` with checkpoint.load_dir.

Every stage after the first starts from a checkpoint (R1's stages chain them; a requeued job
resumes from its own). Before issue 21 the policy was built with random weights drawn on the
CPU (megatron's use_cpu_initialization: each rank draws its layers' full, unsharded weights,
then keeps its shard) and the checkpoint then overwrote all of them; now a checkpoint loaded
next skips the draw (megatron_r1/session.py). This measures the whole `start_session` (process
groups, build, DDP wrap, optimizer, load) at world size 1 on a dense model large enough for the
draw to show, in a fresh process per repetition, for the code in --code (default: this
checkout; pass an export of an older commit to measure before/after on the same machine):

    git archive 1cf053d megatron_r1 | tar -x -C /tmp/before   # plus megatron_r1/_C*.so
    python benchmarks/bench_startup.py --label before --code /tmp/before
    python benchmarks/bench_startup.py --label after

Wall time and the rank's CPU time (process_time: on a loaded machine CPU time moves less than
wall time). Writes benchmarks/results/startup_cpu_<time>.csv (device, commit, shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the package measured: this checkout, or the --code export a worker was started for
sys.path.insert(0, os.environ.get("BENCH_STARTUP_CODE", str(REPO)))

from provenance import commit, cpu_name, write_rows  # noqa: E402

# A dense Llama-shaped model of 0.33B parameters (fp32: 1.3 GB): hidden 1536, 8 layers.
MODEL = ["model.num_layers=8", "model.hidden_size=1536", "model.ffn_hidden_size=6144",
         "model.num_attention_heads=12", "model.num_query_groups=4", "model.num_experts=0",
         "model.vocab_size=32000", "model.qk_layernorm=false", "model.params_dtype=fp32",
         "logging.progress_bar=false", "logging.tensorboard=false"]


def worker(mode: str, checkpoint: str, run_dir: str) -> None:
    """`save`: a step-0 checkpoint of freshly initialised weights; `load`: start a stage from
    it (weights only, as a next R1 stage does) and print the time."""
    wall, cpu = time.perf_counter(), time.process_time()
    import megatron_r1
    from megatron_r1.config import load_config
    from megatron_r1.session import end_session, start_session

    assert Path(megatron_r1.__file__).parents[1] == Path(os.environ["BENCH_STARTUP_CODE"])
    imported = time.perf_counter() - wall
    overrides = [*MODEL, f"logging.run_dir={run_dir}"]
    if mode == "load":
        overrides += [f"checkpoint.load_dir={checkpoint}", "checkpoint.load_optimizer=false"]
    else:
        overrides += [f"checkpoint.save_dir={checkpoint}"]
    wall, cpu = time.perf_counter(), time.process_time()
    session = start_session(load_config(None, overrides))
    seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    params = sum(p.numel() for chunk in session.model for p in chunk.parameters())
    if mode == "save":
        session.save(0, {})
    end_session(session)
    print("RESULT " + json.dumps({"start_session_s": seconds, "start_session_cpu_s": cpu_seconds,
                                  "import_s": imported, "params": params}), flush=True)


def run_worker(code: Path, *args: str) -> dict[str, float]:
    env = {**os.environ, "BENCH_STARTUP_CODE": str(code), "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    proc = subprocess.run([sys.executable, __file__, "--worker", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result: dict[str, float] = json.loads(line[len("RESULT "):])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "CKPT", "RUN"), default=None)
    parser.add_argument("--code", type=Path, default=REPO,
                        help="directory holding the megatron_r1 package to measure")
    parser.add_argument("--label", default="", help="what --code is (e.g. before, after)")
    parser.add_argument("--commit", default=None,
                        help="the commit --code was exported from (default: this checkout's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        ckpt = Path(tmp) / "ckpt"
        made = run_worker(REPO, "save", str(ckpt), str(Path(tmp) / "save"))
        runs = [run_worker(args.code, "load", str(ckpt), str(Path(tmp) / f"load{i}"))
                for i in range(args.repeats)]
    rows = [{"device": f"cpu ({cpu_name()})", "commit": args.commit or commit(),
             "code": args.label or str(args.code), "model": "dense 8 x 1536, ffn 6144, GQA 12/4, "
             "vocab 32000, fp32", "params": made["params"], "world_size": 1,
             "repeats": args.repeats,
             "start_session_s_median": statistics.median(r["start_session_s"] for r in runs),
             "start_session_s_min": min(r["start_session_s"] for r in runs),
             "start_session_cpu_s_median": statistics.median(r["start_session_cpu_s"]
                                                             for r in runs),
             "load_avg_1min": os.getloadavg()[0]}]
    print(json.dumps(rows[0], indent=1))
    write_rows(rows, args.out, "startup_cpu")


if __name__ == "__main__":
    main()
