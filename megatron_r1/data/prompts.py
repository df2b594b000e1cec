"""Questions with reference answers: what GRPO samples from and evaluation scores against.

Layer L1. Two sources, as for SFT: the built-in arithmetic task (train and held-out splits of
data.py's generator) or a JSONL file of {"prompt": ..., "answer": ...} (math) and
{"prompt": ..., "tests": [{"input": ..., "output": ...}]} (code) objects (errors name the file
and line). Any line may carry a `kind` (R1's all-scenario RL: `general` prompts, scored by
reward models, need neither answer nor tests); without one it is `math` or `code` by what it
carries. Prompts are rendered with the configured template and tokenized once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from megatron_r1.config.schema import DataConfig
from megatron_r1.data.arithmetic import arithmetic_splits
from megatron_r1.data.jsonl import jsonl_splits, read_jsonl_records
from megatron_r1.data.template import render_prompt


@dataclass(frozen=True, slots=True)
class PromptExample:
    question: str
    """The question as the data source holds it (no template)."""
    prompt: str
    """The full prompt text (template applied)."""
    answer: str
    """The reference answer the accuracy reward compares with ("" for a code prompt)."""
    prompt_ids: tuple[int, ...]
    """Token ids of the prompt as the engine receives them (with bos when the tokenizer
    adds one)."""
    tests: tuple[tuple[str, str], ...] = ()
    """A code prompt's (stdin, expected stdout) tests; the accuracy reward then runs the
    completion's program on them."""
    kind: str = "math"
    """Which rewards score it (reward.rule_kinds, reward.models[].kinds)."""


Tests = tuple[tuple[str, str], ...]


def _code_tests(value: object) -> Tests:
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of {\"input\": ..., \"output\": ...}")
    tests = []
    for i, test in enumerate(value):
        if not (isinstance(test, dict) and isinstance(test.get("input"), str)
                and isinstance(test.get("output"), str)):
            raise ValueError(f"test {i}: expected {{\"input\": str, \"output\": str}}, got "
                             f"{test!r}")
        tests.append((test["input"], test["output"]))
    return tuple(tests)


def _answer(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {type(value).__name__} {value!r}")
    return value


def _kind(value: object) -> str:
    if not (isinstance(value, str) and value and "/" not in value):
        raise ValueError(f"must be a non-empty name without '/', got {value!r}")
    return value


Row = tuple[str, str, Tests, str]
"""(question, answer, tests, kind) of one prompt."""


def read_prompt_jsonl(path: str | Path) -> list[Row]:
    """(prompt, answer, tests, kind) from a JSONL file: {"prompt": ..., "answer": ...} for a
    math prompt, {"prompt": ..., "tests": [{"input": ..., "output": ...}, ...]} for a code
    prompt, {"prompt": ..., "kind": "general"} for one scored by reward models. The errors name
    the file and line."""
    def scorable(record: dict[str, object]) -> None:
        if "answer" not in record and "tests" not in record and "kind" not in record:
            raise ValueError("needs \"answer\" (a math prompt), \"tests\" (a code prompt) "
                             "or \"kind\" (e.g. \"general\", scored by reward.models)")

    records = read_jsonl_records(path, ("prompt",),
                                 {"answer": _answer, "tests": _code_tests, "kind": _kind},
                                 check=scorable)
    return [(r["prompt"], r.get("answer", ""), r.get("tests", ()),
             r.get("kind", "code" if "tests" in r else "math")) for r in records]


def prompt_splits(data: DataConfig, tokenizer: PreTrainedTokenizerBase
                  ) -> tuple[list[PromptExample], list[PromptExample]]:
    """(train, held-out) prompts; a JSONL source's held-out prompts come from data.eval_path
    or a data.eval_fraction of data.path (none without either)."""
    train: list[Row]
    held_out: list[Row]
    if data.source == "arithmetic":
        splits = arithmetic_splits(data, seed=data.seed)
        train = [(p.question, str(p.answer), (), "math") for p in splits.train]
        held_out = [(p.question, str(p.answer), (), "math") for p in splits.eval]
    else:
        train, held_out = jsonl_splits(data, read_prompt_jsonl)

    def encode(rows: list[Row]) -> list[PromptExample]:
        if not rows:  # transformers 5's tokenizer raises IndexError on an empty batch
            return []
        texts = [render_prompt(q, data.template) for q, _, _, _ in rows]
        ids = tokenizer(texts)["input_ids"]
        return [PromptExample(q, t, a, tuple(i), tests, kind)
                for t, (q, a, tests, kind), i in zip(texts, rows, ids)]

    return encode(train), encode(held_out)
