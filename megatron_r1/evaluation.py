"""pass@1 and cons@k as the R1 paper reports them.

Layer L1. For each question, k outputs are sampled (temperature 0.6, top-p 0.95 by default);
pass@1 is the mean correctness over all k x questions outputs (the unbiased pass@1 estimate
from k samples), cons@k is the share of questions whose majority answer is correct (the most
frequent extracted final answer after whitespace normalisation; ties go to the answer seen
first; outputs without an answer do not vote; a math measure: the vote compares answer texts,
not what programs do, so for code prompts read pass@1). Correctness is the accuracy reward, scored in
the reward worker pool, so a verifier that hangs on one output cannot hang the evaluation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_r1.data.prompts import PromptExample
from megatron_r1.reward.accuracy import extract_answer
from megatron_r1.reward.scoring import RewardScorer
from megatron_r1.reward.types import CodeTest, Language, Sample
from megatron_r1.rollout.types import RolloutEngine, SamplingConfig


@dataclass(frozen=True, slots=True)
class EvalResult:
    pass_at_1: float
    cons_at_k: float
    k: int
    questions: int
    mean_response_tokens: float

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        return {f"{prefix}/pass@1": self.pass_at_1, f"{prefix}/cons@{self.k}": self.cons_at_k,
                f"{prefix}/response_tokens": self.mean_response_tokens}


def reward_sample(question: PromptExample, target_language: Language = "en") -> Sample:
    """What the rule rewards are told about a question (its answer, or its code tests)."""
    return Sample(answer=question.answer, target_language=target_language,
                  tests=tuple(CodeTest(i, o) for i, o in question.tests))


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """Index of one output carrying the majority answer; None if no output has an answer."""
    normalised = [" ".join(a.split()) if a and a.strip() else None for a in answers]
    counts = Counter(a for a in normalised if a is not None)
    if not counts:
        return None
    winner = counts.most_common(1)[0][0]
    return normalised.index(winner)


def evaluate(engine: RolloutEngine, questions: Sequence[PromptExample], scorer: RewardScorer, *,
             k: int, temperature: float, top_p: float, max_new_tokens: int,
             seed: int, target_language: Language = "en",
             prompt_indices: Sequence[int] | None = None) -> EvalResult:
    """Sample k outputs per question, score them, report pass@1 and cons@k.
    `prompt_indices`: the questions' indices in the whole evaluation set (their sampling
    seeds derive from them) when an engine evaluates a share of it."""
    groups = engine.generate([q.prompt_ids for q in questions],
                             SamplingConfig(n=k, temperature=temperature, top_p=top_p,
                                            max_new_tokens=max_new_tokens, seed=seed),
                             prompt_indices=prompt_indices)
    texts = [c.text for g in groups for c in g]
    samples = [reward_sample(q, target_language) for q in questions for _ in range(k)]
    accuracy = scorer.score(texts, samples).components_N["accuracy"].view(len(questions), k)
    consistent = 0
    for row, group in enumerate(groups):
        winner = majority_vote([extract_answer(c.text) for c in group])
        consistent += winner is not None and bool(accuracy[row, winner] > 0.5)
    tokens = sum(len(c.token_ids) for g in groups for c in g)
    n = len(questions)
    return EvalResult(pass_at_1=float(accuracy.mean()), cons_at_k=consistent / n, k=k,
                      questions=n, mean_response_tokens=tokens / (n * k))
