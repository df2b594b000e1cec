"""Rejection sampling's verdicts (megatron_r1.rejection) on outputs written by hand, scored by
the real reward scorer, and the data set writer that `sft` reads back."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_r1.config.schema import RewardConfig, SampleConfig
from megatron_r1.data.jsonl import write_jsonl
from megatron_r1.data.prompts import PromptExample
from megatron_r1.data.sft import read_jsonl
from megatron_r1.rejection import VERDICTS, readability_problem, select_outputs
from megatron_r1.reward.pool import Outcome
from megatron_r1.reward.scoring import RewardBatch, RewardScorer
from megatron_r1.reward.types import Sample
from megatron_r1.rollout.types import Completion


def out(reasoning: str, answer: str, finish: str = "stop") -> Completion:
    return Completion((1,), (0.0,), f"<think> {reasoning} </think> <answer> {answer} </answer>",
                      finish)


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer.from_config(RewardConfig(), num_workers=1) as s:
        yield s


def judge(scorer, questions, groups, cfg):
    samples = [Sample(answer=q.answer) for q, g in zip(questions, groups) for _ in g]
    rewards = scorer.score([c.text for g in groups for c in g], samples)
    return select_outputs(questions, groups, rewards, cfg)


def test_every_verdict_on_hand_written_outputs(scorer):
    q = PromptExample("Compute 3 + 4", "<template> Compute 3 + 4", "7", (1, 2))
    long_paragraph = "We add the numbers. " * 20  # 400 characters without a blank line
    group = [
        out("3 plus 4 gives 7", "7", finish="length"),           # truncated
        out("3 plus 4 gives 8", "8"),                            # incorrect
        Completion((1,), (0.0,), "The answer is \\boxed{7}", "stop"),  # correct, no template
        out("3 加 4 等于 7, so the answer is 7", "7"),            # mixed language
        out("in code:\n```\nprint(3 + 4)\n```\nwhich gives 7", "7"),
        out(long_paragraph + "so we get 7", "7"),                # long paragraph
        out("we add 3 and 4 to get 7", "7"),                     # kept
        out("we add 3 and 4 to get 7", "7"),                     # duplicate of the kept one
        out("adding 4 to 3 gives 7", "7"),                       # kept
        out("the sum of 3 and 4 is 7", "7"),                     # over the quota of 2
    ]
    cfg = SampleConfig(keep_per_prompt=2, max_paragraph_chars=300)
    kept, verdicts = judge(scorer, [q], [group], cfg)
    assert verdicts == {"truncated": 1, "incorrect": 1, "format": 1, "mixed_language": 1,
                        "code_block": 1, "long_paragraph": 1, "kept": 2, "duplicate": 1,
                        "over_quota": 1}
    assert set(verdicts) <= set(VERDICTS) and sum(verdicts.values()) == len(group)
    # the data set holds the question without its template, for SFT to template again
    assert [k.record() for k in kept] == [
        {"prompt": "Compute 3 + 4", "completion": group[6].text, "answer": "7"},
        {"prompt": "Compute 3 + 4", "completion": group[8].text, "answer": "7"}]

    # each filter can be switched off
    loose = SampleConfig(require_format=False, min_language_share=0.0, max_paragraph_chars=0,
                         reject_code_blocks=False)
    kept, verdicts = judge(scorer, [q], [group], loose)
    assert verdicts == {"truncated": 1, "incorrect": 1, "kept": 7, "duplicate": 1}


def test_a_failed_verifier_call_is_never_kept():
    """An accuracy call that raised or timed out scores 0 and is `reward_failed` (the reward
    pool's own tests cover the raising and the killing; here, the verdict on its outcome)."""
    q = PromptExample("q", "q", "7", (1,))
    group = [out("3 + 4 = 7", "7"), out("3 + 4 = 7!", "7"), out("4 + 3 = 7", "7")]
    ones = torch.ones(3)
    rewards = RewardBatch(
        total_N=ones, metrics={},
        components_N={"accuracy": torch.tensor([0.0, 0.0, 1.0]), "format": ones,
                      "language": ones},
        outcomes_N={"accuracy": torch.tensor([Outcome.ERROR, Outcome.TIMEOUT, Outcome.OK],
                                             dtype=torch.uint8)})
    kept, verdicts = select_outputs([q], [group], rewards, SampleConfig())
    assert verdicts == {"reward_failed": 2, "kept": 1}
    assert [k.completion for k in kept] == [group[2].text]
    with pytest.raises(ValueError, match="3 scored outputs for 2 sampled ones"):
        select_outputs([q], [group[:2]], rewards, SampleConfig())
    with pytest.raises(ValueError, match="1 groups of outputs for 2 questions"):
        select_outputs([q, q], [group], rewards, SampleConfig())


def test_readability_filters_read_only_the_chain_of_thought():
    cfg = SampleConfig(max_paragraph_chars=50)
    assert readability_problem("<think> short.\n\nalso short. </think> " + "x" * 200, cfg) is None
    assert readability_problem("<think> " + "y" * 60 + " </think>", cfg) == "long_paragraph"
    assert readability_problem("<think> a\n\n" + "y" * 49 + " </think>", cfg) is None
    assert readability_problem("<think> ```x``` </think>", cfg) == "code_block"
    assert readability_problem("no think block ```x```", cfg) is None  # format's business


def test_written_data_set_is_what_sft_reads(tmp_path):
    records = [{"prompt": "Compute 2 * 3", "completion": "<think> 6 </think> <answer> 6 </answer>",
                "answer": "6"},
               {"prompt": "数一数", "completion": "<think> 一 </think> <answer> 1 </answer>",
                "answer": "1"}]
    path = tmp_path / "out" / "data.jsonl"
    assert write_jsonl(path, records) == 2
    examples = read_jsonl(path)
    assert [(e.prompt, e.completion) for e in examples] == [
        (r["prompt"], r["completion"]) for r in records]
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[1])["prompt"] == "数一数"


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    def records():
        yield {"prompt": "a", "completion": "b"}
        raise RuntimeError("generation died")

    path = tmp_path / "data.jsonl"
    with pytest.raises(RuntimeError, match="generation died"):
        write_jsonl(path, records())
    assert list(tmp_path.iterdir()) == []
