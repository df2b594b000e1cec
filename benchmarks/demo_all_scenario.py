"""R1 stage 4 in miniature, end to end on the CPU: a helpfulness reward model trained from the
demo's SFT policy (`megatron-r1 rm --config configs/demo_rm.yaml`), then GRPO on prompts of
two kinds (`megatron-r1 train --config configs/demo_all_scenario.yaml`): `math` questions
scored by the rule rewards, `general` ones (the same task, no reference answer) by the reward
model reading the final summary. Reports how each kind's reward moved (mean of the first and
the last five rollouts) and the held-out pass@1 before and after.

    make demo                                   # once: the SFT checkpoint this starts from
    python benchmarks/demo_all_scenario.py      # about 5 minutes on 2 cores
    python benchmarks/demo_all_scenario.py --scores answer   # the model reads summaries only

Writes runs/demo/stage4/{prompts,eval}.jsonl and
benchmarks/results/all_scenario_cpu_<time>.json (device, commit, shapes, numbers).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance import commit, cpu_name  # noqa: E402

from megatron_r1.config import load_config  # noqa: E402
from megatron_r1.data.arithmetic import arithmetic_splits  # noqa: E402


def write_prompts(out: Path) -> tuple[int, int]:
    """The demo's arithmetic questions, alternately `math` (with the answer) and `general`
    (without); held-out: math questions only (pass@1)."""
    data = load_config(REPO / "configs/demo_grpo.yaml", []).data
    splits = arithmetic_splits(data, seed=data.seed)
    train = [{"prompt": p.question, "answer": str(p.answer)} if i % 2 == 0 else
             {"prompt": p.question, "kind": "general"} for i, p in enumerate(splits.train)]
    held_out = [{"prompt": p.question, "answer": str(p.answer)} for p in splits.eval]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("prompts", train), ("eval", held_out)):
        tmp = out / f".{name}.jsonl.partial"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(out / f"{name}.jsonl")
    return len(train), len(held_out)


def run(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "megatron_r1", *args], cwd=REPO, check=True)
    return time.perf_counter() - start


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def report(train: int, held_out: int, seconds: dict[str, float]) -> dict:
    """The numbers of the last runs, from their metrics.jsonl."""
    rm_evals = [r for r in rows(REPO / "runs/demo/rm") if "eval_accuracy" in r]
    logged = rows(REPO / "runs/demo/stage4")
    rollouts = [r for r in logged if "kind/math/reward_mean" in r]
    evals = [r for r in logged if "eval/pass@1" in r]

    def mean(key: str, part: list[dict]) -> float:
        return round(sum(r[key] for r in part) / len(part), 4)

    moved = {key: {"first5": mean(key, rollouts[:5]), "last5": mean(key, rollouts[-5:])}
             for key in ("kind/math/reward_mean", "kind/math/accuracy_mean",
                         "kind/general/reward_mean", "kind/general/helpful_mean",
                         "kind/general/format_mean", "reward/helpful_errors")}
    return {
        "device": f"cpu ({cpu_name()}), 2 cores", "commit": commit(),
        "shapes": {"prompts": train, "held_out": held_out, "model": "configs/demo_sft.yaml",
                   "rollout": "32 prompts x 8 outputs, kinds alternate", "rollouts": len(rollouts)},
        "reward_model_heldout_accuracy": [rm_evals[0]["eval_accuracy"],
                                          rm_evals[-1]["eval_accuracy"]],
        "moved": moved, "pass_at_1": [evals[0]["eval/pass@1"], evals[-1]["eval/pass@1"]],
        "seconds": seconds,
    }


def main() -> None:
    if not (REPO / "runs/demo/sft/checkpoints/latest").is_file():
        sys.exit("runs/demo/sft/checkpoints: run `make demo` first (its SFT stage)")
    # what the reward model reads: `response` (the config's), or `--scores answer`, the final
    # summary only, which this demo's reward model never saw in training (an ablation)
    scores = sys.argv[sys.argv.index("--scores") + 1] if "--scores" in sys.argv else "response"
    seconds = {}
    if "--report-only" not in sys.argv:  # e.g. after a run that the report step lost
        for old in ("runs/demo/rm", "runs/demo/stage4"):  # a run dir with checkpoints resumes
            shutil.rmtree(REPO / old, ignore_errors=True)
    train, held_out = write_prompts(REPO / "runs/demo/stage4")
    if "--report-only" not in sys.argv:
        seconds["rm"] = round(run("rm", "--config", "configs/demo_rm.yaml",
                                  "--set", "logging.progress_bar=false"), 1)
        seconds["grpo"] = round(run("train", "--config", "configs/demo_all_scenario.yaml",
                                    "--set", "logging.progress_bar=false",
                                    "--set", f"reward.models[0].scores={scores}"), 1)
    result = {**report(train, held_out, seconds), "reward_model_reads": scores}
    out = REPO / "benchmarks/results" / time.strftime("all_scenario_cpu_%Y%m%dT%H%M%SZ.json",
                                                      time.gmtime())
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
