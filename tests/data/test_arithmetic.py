"""The arithmetic generator and solver, checked against Python's own evaluation."""

from __future__ import annotations

import random
import re

import pytest

from megatron_r1.config.schema import DataConfig
from megatron_r1.data.arithmetic import (
    QUESTION_PREFIX,
    VALUE_RANGE_FACTOR,
    Problem,
    arithmetic_splits,
    generate_problem,
    make_splits,
    write_solution,
)

RANGES = [(1, 1, 9), (1, 3, 20), (2, 4, 50), (3, 3, 5)]
SOLUTION = re.compile(r"<think> (?P<steps>.+) </think> <answer> (?P<answer>\d+) </answer>")


def _problems(min_ops: int, max_ops: int, max_operand: int, n: int = 400) -> list[Problem]:
    rng = random.Random(7)
    return [generate_problem(rng, min_ops=min_ops, max_ops=max_ops, max_operand=max_operand)
            for _ in range(n)]


def _eval(expression: str) -> float:
    assert re.fullmatch(r"[0-9+\-*/() ]+", expression), expression
    return eval(expression, {"__builtins__": {}})  # Python's precedence and true division


@pytest.mark.parametrize(("min_ops", "max_ops", "max_operand"), RANGES)
def test_answer_equals_pythons_evaluation(min_ops: int, max_ops: int, max_operand: int) -> None:
    for problem in _problems(min_ops, max_ops, max_operand):
        assert _eval(problem.expression) == problem.answer, problem
        assert isinstance(problem.answer, int)
        assert problem.question == QUESTION_PREFIX + problem.expression


@pytest.mark.parametrize(("min_ops", "max_ops", "max_operand"), RANGES)
def test_problems_respect_the_ranges(min_ops: int, max_ops: int, max_operand: int) -> None:
    counts = set()
    for problem in _problems(min_ops, max_ops, max_operand):
        num_ops = len(re.findall(r" [+\-*/] ", problem.expression))
        counts.add(num_ops)
        assert len(problem.steps) == num_ops
        operands = [int(x) for x in re.findall(r"\d+", problem.expression)]
        assert len(operands) == num_ops + 1
        assert all(1 <= x <= max_operand for x in operands)
        for step in problem.steps:
            assert 0 <= step.result <= VALUE_RANGE_FACTOR * max_operand
    assert counts == set(range(min_ops, max_ops + 1))


def test_steps_are_correct_and_end_in_the_answer() -> None:
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
           "/": lambda a, b: a / b}
    seen_ops = set()
    for problem in _problems(1, 4, 20):
        for step in problem.steps:
            assert ops[step.op](step.left, step.right) == step.result, step
            seen_ops.add(step.op)
        assert problem.steps[-1].result == problem.answer
    assert seen_ops == {"+", "-", "*", "/"}


def test_solution_format_lists_each_step_then_the_answer() -> None:
    for problem in _problems(1, 3, 20, n=100):
        solution = write_solution(problem)
        match = SOLUTION.fullmatch(solution)
        assert match, solution
        assert int(match["answer"]) == problem.answer
        steps = match["steps"].split(", ")
        assert steps == [f"{s.left} {s.op} {s.right} = {s.result}" for s in problem.steps]


def test_solution_of_a_known_problem() -> None:
    rng = random.Random(0)
    problem = generate_problem(rng, min_ops=3, max_ops=3, max_operand=20)
    text = write_solution(problem)
    # The chain of thought evaluates sub-expressions left to right, innermost first.
    assert text.startswith("<think> ") and text.endswith(f" </think> <answer> {problem.answer} "
                                                         "</answer>")
    assert text.count(" = ") == 3


def test_splits_are_disjoint_distinct_and_sized() -> None:
    splits = make_splits(num_train=500, num_eval=50, min_ops=1, max_ops=3, max_operand=20,
                         seed=3)
    train_q = [p.question for p in splits.train]
    eval_q = [p.question for p in splits.eval]
    assert len(train_q) == 500 and len(eval_q) == 50
    assert len(set(train_q)) == 500 and len(set(eval_q)) == 50
    assert not set(train_q) & set(eval_q)


def test_splits_are_deterministic_by_seed() -> None:
    kwargs = dict(num_train=200, num_eval=20, min_ops=1, max_ops=3, max_operand=20)
    assert make_splits(seed=5, **kwargs) == make_splits(seed=5, **kwargs)
    assert make_splits(seed=5, **kwargs).train != make_splits(seed=6, **kwargs).train


def test_a_seed_pins_the_data_across_machines() -> None:
    # random.random() is the stream Python guarantees; this pins the whole pipeline on it.
    splits = make_splits(num_train=2, num_eval=1, min_ops=1, max_ops=3, max_operand=20, seed=0)
    assert [p.question for p in splits.eval + splits.train] == [
        "Compute (6 + (9 + 16)) - 12", "Compute 16 + (6 + 19)", "Compute (18 + (17 + 11)) - 8"]


def test_eval_split_does_not_move_when_num_train_changes() -> None:
    kwargs = dict(num_eval=30, min_ops=1, max_ops=3, max_operand=20, seed=1)
    assert make_splits(num_train=10, **kwargs).eval == make_splits(num_train=300, **kwargs).eval


def test_too_small_problem_space_fails_with_advice() -> None:
    with pytest.raises(ValueError, match=r"only \d+ distinct problems found for the 500 requested "
                                         r"\(num_train=400 \+ num_eval=100\) with 1..1 operations "
                                         r"and operands 1..3: raise arithmetic_max_operand"):
        make_splits(num_train=400, num_eval=100, min_ops=1, max_ops=1, max_operand=3, seed=0)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(min_ops=0, max_ops=2, max_operand=5), r"min_ops=0: must be >= 1"),
    (dict(min_ops=3, max_ops=2, max_operand=5), r"max_ops=2: must be >= min_ops=3"),
    (dict(min_ops=1, max_ops=2, max_operand=0), r"max_operand=0: must be >= 1"),
])
def test_bad_ranges_are_rejected(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_problem(random.Random(0), **kwargs)


def test_arithmetic_splits_follow_the_data_config() -> None:
    data = DataConfig(num_train_samples=64, num_eval_samples=8, arithmetic_min_ops=2,
                      arithmetic_max_ops=2, arithmetic_max_operand=9)
    splits = arithmetic_splits(data, seed=11)
    assert len(splits.train) == 64 and len(splits.eval) == 8
    assert all(len(p.steps) == 2 for p in splits.train + splits.eval)
    assert all(max(int(x) for x in re.findall(r"\d+", p.expression)) <= 9 for p in splits.train)
