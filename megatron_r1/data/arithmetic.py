"""The built-in task: multi-step integer arithmetic with a unique answer, and its solver.

Layer L1 (pure Python). A problem is a random binary expression tree, rendered fully
parenthesised ("((7 + 5) * 3) - 4") so that its value does not depend on precedence rules. The
key decision is that operators are chosen bottom-up *knowing the operand values*: every
intermediate and final value is an integer in 0..VALUE_RANGE_FACTOR x max_operand (no negative
numbers, division only when exact), which keeps the solver's chain of thought short and the task
learnable by a tiny model. The solver writes that chain of thought in the R1-Zero answer format:

    <think> 7 + 5 = 12, 12 * 3 = 36, 36 - 4 = 32 </think> <answer> 32 </answer>

Everything is deterministic from a seed. Random draws go through `random.Random.random()`,
the one method whose output Python guarantees across versions, so a seed names the same data
set on every machine (the eval split must not move between runs).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from megatron_r1.config.schema import DataConfig

OPERATORS = ("+", "-", "*", "/")
"""Operators in problems; `/` is exact integer division only."""

VALUE_RANGE_FACTOR = 5
"""Every intermediate and final value lies in 0..VALUE_RANGE_FACTOR x max_operand (0..100 for
the default operands 1..20)."""

QUESTION_PREFIX = "Compute "
"""A problem's question is this prefix followed by the expression."""


@dataclass(frozen=True, slots=True)
class Step:
    """One solver step: `left op right = result`."""

    left: int
    op: str
    right: int
    result: int

    def text(self) -> str:
        """The step as written in the chain of thought, e.g. "12 * 3 = 36"."""
        return f"{self.left} {self.op} {self.right} = {self.result}"


@dataclass(frozen=True, slots=True)
class Problem:
    """One arithmetic problem with its unique integer answer."""

    question: str
    """What the user asks, e.g. "Compute ((7 + 5) * 3) - 4"."""
    expression: str
    """The expression alone, fully parenthesised; Python's `eval` gives `answer`."""
    answer: int
    """The value of the expression."""
    steps: tuple[Step, ...]
    """Operations in evaluation order (left subtree, right subtree, then the node itself);
    the last step's result is the answer."""


@dataclass(frozen=True, slots=True)
class Splits:
    """Disjoint train and eval problems: no question text appears in both."""

    train: tuple[Problem, ...]
    eval: tuple[Problem, ...]


@dataclass(frozen=True, slots=True)
class _Node:
    text: str
    value: int
    steps: tuple[Step, ...]


def _randint(rng: random.Random, low: int, high: int) -> int:
    """Uniform integer in [low, high], derived from `rng.random()` (stable across Pythons)."""
    return low + min(int(rng.random() * (high - low + 1)), high - low)


def _apply(op: str, left: int, right: int, max_value: int) -> int | None:
    """The result of `left op right`, or None if it leaves 0..max_value or is inexact."""
    if op == "+":
        result = left + right
    elif op == "-":
        result = left - right
    elif op == "*":
        result = left * right
    else:
        if right == 0 or left % right != 0:
            return None
        result = left // right
    return result if 0 <= result <= max_value else None


def _build(rng: random.Random, num_ops: int, max_operand: int, max_value: int) -> _Node | None:
    """A random expression tree with `num_ops` operations, or None if no operator fits."""
    if num_ops == 0:
        value = _randint(rng, 1, max_operand)
        return _Node(str(value), value, ())
    left_ops = _randint(rng, 0, num_ops - 1)
    left = _build(rng, left_ops, max_operand, max_value)
    right = _build(rng, num_ops - 1 - left_ops, max_operand, max_value)
    if left is None or right is None:
        return None
    results = {op: _apply(op, left.value, right.value, max_value) for op in OPERATORS}
    valid = [op for op in OPERATORS if results[op] is not None]
    if not valid:
        return None
    op = valid[_randint(rng, 0, len(valid) - 1)]
    result = results[op]
    assert result is not None

    def wrap(node: _Node) -> str:
        return f"({node.text})" if node.steps else node.text

    step = Step(left.value, op, right.value, result)
    return _Node(f"{wrap(left)} {op} {wrap(right)}", result, left.steps + right.steps + (step,))


def _check_ranges(min_ops: int, max_ops: int, max_operand: int) -> None:
    if min_ops < 1:
        raise ValueError(f"min_ops={min_ops}: must be >= 1")
    if max_ops < min_ops:
        raise ValueError(f"max_ops={max_ops}: must be >= min_ops={min_ops}")
    if max_operand < 1:
        raise ValueError(f"max_operand={max_operand}: must be >= 1")


def generate_problem(rng: random.Random, *, min_ops: int, max_ops: int,
                     max_operand: int) -> Problem:
    """Draw one problem.

    Args:
        rng: The random source; the problem is a function of its state.
        min_ops: Fewest operations (>= 1).
        max_ops: Most operations; the count is uniform in [min_ops, max_ops].
        max_operand: Operands are drawn uniformly from 1..max_operand.

    Returns:
        A problem whose intermediate and final values all lie in
        0..VALUE_RANGE_FACTOR x max_operand.

    Raises:
        ValueError: for an empty range of operations or operands.
    """
    _check_ranges(min_ops, max_ops, max_operand)
    max_value = VALUE_RANGE_FACTOR * max_operand
    num_ops = _randint(rng, min_ops, max_ops)
    # A tree fails only when some node's children admit no operator (a < b with a + b too
    # large); that is rare, and a one-operation tree always succeeds (a - b or a + b fits).
    for _ in range(1000):
        node = _build(rng, num_ops, max_operand, max_value)
        if node is not None:
            return Problem(question=QUESTION_PREFIX + node.text, expression=node.text,
                           answer=node.value, steps=node.steps)
    raise AssertionError(f"no valid {num_ops}-operation tree in 1000 draws")


def write_solution(problem: Problem, answer: int | None = None) -> str:
    """The solver's completion: each step in the chain of thought, then the answer.

    Args:
        problem: The problem to solve.
        answer: The final answer to write (default: the right one; noisy cold-start data
            passes a wrong one).

    Returns:
        `<think> a op b = c, ... </think> <answer> N </answer>`, the R1-Zero answer format.
    """
    reasoning = ", ".join(step.text() for step in problem.steps)
    final = problem.answer if answer is None else answer
    return f"<think> {reasoning} </think> <answer> {final} </answer>"


def wrong_answer(problem: Problem, rng: random.Random, max_value: int) -> int:
    """A value in 0..max_value other than the problem's answer (uniformly drawn)."""
    value = _randint(rng, 0, max_value - 1)
    return value + 1 if value >= problem.answer else value


def make_splits(*, num_train: int, num_eval: int, min_ops: int, max_ops: int,
                max_operand: int, seed: int) -> Splits:
    """Draw distinct problems and split them into disjoint train and eval sets.

    One stream of problems is drawn from `seed`; repeats of an earlier question are skipped;
    the first `num_eval` distinct problems are the eval set and the next `num_train` the train
    set. So the eval set does not change when only `num_train` does.

    Args:
        num_train: Train problems (>= 0).
        num_eval: Eval problems (>= 0).
        min_ops: Fewest operations per problem.
        max_ops: Most operations per problem.
        max_operand: Operands are drawn from 1..max_operand.
        seed: Seed of the stream.

    Returns:
        The two splits; every question text in them is distinct.

    Raises:
        ValueError: for negative counts, bad ranges, or when the ranges hold too few distinct
            problems for the requested counts.
    """
    if num_train < 0 or num_eval < 0:
        raise ValueError(f"num_train={num_train}, num_eval={num_eval}: must be >= 0")
    _check_ranges(min_ops, max_ops, max_operand)
    rng = random.Random(seed)
    wanted = num_train + num_eval
    seen: set[str] = set()
    problems: list[Problem] = []
    # Generous budget: a small problem space (e.g. one operation, operands 1..5) must fail
    # with a message instead of looping forever.
    for _ in range(20 * wanted + 1000):
        if len(problems) == wanted:
            break
        problem = generate_problem(rng, min_ops=min_ops, max_ops=max_ops,
                                   max_operand=max_operand)
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    if len(problems) < wanted:
        raise ValueError(
            f"only {len(problems)} distinct problems found for the {wanted} requested "
            f"(num_train={num_train} + num_eval={num_eval}) with {min_ops}..{max_ops} "
            f"operations and operands 1..{max_operand}: raise arithmetic_max_operand or "
            "arithmetic_max_ops, or ask for fewer samples")
    return Splits(train=tuple(problems[num_eval:]), eval=tuple(problems[:num_eval]))


def arithmetic_splits(data: DataConfig, *, seed: int) -> Splits:
    """The train and eval problems a data config asks for.

    Args:
        data: Uses num_train_samples, num_eval_samples and the arithmetic_* fields.
        seed: Seed of the problem stream.

    Returns:
        Disjoint splits of data.num_train_samples and data.num_eval_samples problems.
    """
    return make_splits(num_train=data.num_train_samples, num_eval=data.num_eval_samples,
                       min_ops=data.arithmetic_min_ops, max_ops=data.arithmetic_max_ops,
                       max_operand=data.arithmetic_max_operand, seed=seed)
