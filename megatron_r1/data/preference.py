"""Reward-model data: preference pairs and labelled responses, and the ids a reward model scores.

Layer L1 (pure Python + a tokenizer). Two formats, one JSON object per line (errors name
file:line, megatron_r1.data.jsonl):
- pairwise `{"prompt", "chosen", "rejected"}` (the paper's helpfulness model),
- pointwise `{"prompt", "response", "label"}`, label 0/1 or false/true (its safety model).
`data.source: arithmetic` generates both from the built-in task instead: the chosen response
is the solver's, the rejected one the same worked steps ending in a wrong final answer;
pointwise responses are either, labelled 1 when the answer is correct.

`reward_input_ids` is the one definition of what a reward model reads, used by its training
here and by GRPO when it serves the model: `bos prompt response eos` (bos only for tokenizers
that have one), prompt and response tokenized separately as the policy produced them, the
score read at the eos. Prompts are used as given; the data sets below apply data.template to
them first, as SFT does, so serving passes the prompt the policy saw.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from megatron_r1.config.schema import DataConfig
from megatron_r1.data.arithmetic import (
    VALUE_RANGE_FACTOR,
    Problem,
    arithmetic_splits,
    write_solution,
    wrong_answer,
)
from megatron_r1.data.jsonl import jsonl_splits, read_jsonl_records
from megatron_r1.data.template import render_prompt


@dataclass(frozen=True, slots=True)
class PreferencePair:
    """Two responses to one prompt, the first preferred."""

    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True, slots=True)
class LabelledResponse:
    """One response to a prompt with a binary label (1: good, e.g. safe or correct)."""

    prompt: str
    response: str
    label: int


# ----------------------------------------------------------------------------- reading


def _label(value: Any) -> int:
    """A label as 0 or 1: JSON 0/1 or false/true (nothing else, e.g. not 0.5 or "1")."""
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return int(value)
    raise ValueError(f"must be 0, 1, false or true, got {type(value).__name__} {value!r}")


def _require_label(record: dict[str, Any]) -> None:
    if "label" not in record:
        raise ValueError("missing key 'label'")


def read_pairwise_jsonl(path: str | Path) -> list[PreferencePair]:
    """`{"prompt", "chosen", "rejected"}` lines (strings); errors name file:line."""
    return [PreferencePair(r["prompt"], r["chosen"], r["rejected"])
            for r in read_jsonl_records(path, ("prompt", "chosen", "rejected"))]


def read_pointwise_jsonl(path: str | Path) -> list[LabelledResponse]:
    """`{"prompt", "response", "label"}` lines (label 0/1 or false/true); errors name
    file:line."""
    return [LabelledResponse(r["prompt"], r["response"], r["label"])
            for r in read_jsonl_records(path, ("prompt", "response"), {"label": _label},
                                        check=_require_label)]


# ----------------------------------------------------------------------------- arithmetic


def _wrong_solution(problem: Problem, rng: random.Random, max_value: int) -> str:
    return write_solution(problem, wrong_answer(problem, rng, max_value))


def arithmetic_pairs(data: DataConfig, *,
                     seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, eval) pairs of the arithmetic task: the solver's solution preferred over the same
    worked steps with a wrong final answer (uniform over 0..the value range, not the right
    one). Each split draws its wrong answers from its own stream, so the eval pairs do not
    change with data.num_train_samples. Prompts are the bare questions (no template)."""
    splits = arithmetic_splits(data, seed=seed)
    max_value = VALUE_RANGE_FACTOR * data.arithmetic_max_operand

    def pairs(problems: tuple[Problem, ...], name: str) -> list[PreferencePair]:
        rng = random.Random(f"preference-{name}:{seed}")
        return [PreferencePair(p.question, write_solution(p), _wrong_solution(p, rng, max_value))
                for p in problems]

    return pairs(splits.train, "train"), pairs(splits.eval, "eval")


def arithmetic_labels(data: DataConfig, *,
                      seed: int) -> tuple[list[LabelledResponse], list[LabelledResponse]]:
    """(train, eval) labelled responses of the arithmetic task: each problem's solution with the
    correct final answer (label 1) or a wrong one (label 0), each with probability one half."""
    splits = arithmetic_splits(data, seed=seed)
    max_value = VALUE_RANGE_FACTOR * data.arithmetic_max_operand

    def labelled(problems: tuple[Problem, ...], name: str) -> list[LabelledResponse]:
        rng = random.Random(f"pointwise-{name}:{seed}")
        out = []
        for p in problems:
            correct = rng.random() < 0.5
            response = write_solution(p) if correct else _wrong_solution(p, rng, max_value)
            out.append(LabelledResponse(p.question, response, int(correct)))
        return out

    return labelled(splits.train, "train"), labelled(splits.eval, "eval")


def preference_examples(data: DataConfig, objective: str, *, seed: int
                        ) -> tuple[list[Any], list[Any]]:
    """The (train, eval) examples of a reward-model run, prompts templated with data.template.

    Args:
        data: data.source arithmetic (generated) or jsonl (data.path, and data.eval_path or
            data.eval_fraction for the held-out split, as SFT).
        objective: `pairwise` (PreferencePair) or `pointwise` (LabelledResponse).
        seed: Seed of the generated problems.
    """
    splits: tuple[list[Any], list[Any]]
    if data.source == "arithmetic":
        splits = (arithmetic_pairs if objective == "pairwise" else arithmetic_labels)(data,
                                                                                     seed=seed)
    else:
        splits = jsonl_splits(data, read_pairwise_jsonl if objective == "pairwise"
                              else read_pointwise_jsonl)
    train, held_out = ([dataclasses.replace(e, prompt=render_prompt(e.prompt, data.template))
                        for e in split] for split in splits)
    return train, held_out


# ----------------------------------------------------------------------------- ids


def reward_input_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str,
                     max_length: int) -> list[int]:
    """The ids a reward model scores for (prompt, response); its score is read at the last.

    `bos prompt response eos` (no bos for a tokenizer without one), prompt and response
    tokenized separately without special tokens. When that exceeds `max_length`, the prompt
    loses ids from its start first (its end, next to the response, stays), then the response
    from its start (its end, holding the final answer, stays); bos and eos always stay. The
    cut depends on the ids only, so it is deterministic.

    Raises:
        ValueError: for a tokenizer without eos, or a max_length with no room for one
            response id.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token; a reward "
                         "model reads its score there")
    head = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    room = max_length - len(head) - 1
    if room < 1:
        raise ValueError(f"max_length={max_length}: no room for a response between bos and eos")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    response_ids = response_ids[max(0, len(response_ids) - room):]
    keep = room - len(response_ids)
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - keep):] if keep else []
    return [*head, *prompt_ids, *response_ids, eos]
