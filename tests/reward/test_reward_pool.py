"""Reward worker pool: per-call time limits that really stop waiting, errors, dead workers, exit.

The misbehaving reward functions (conftest.py) act up when the completion contains a trigger
word: "boom" raises, "nan" returns NaN, "slow" sleeps a minute, "die" kills the worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from megatron_r1.reward.accuracy import accuracy_reward
from megatron_r1.reward.pool import Outcome, RewardWorkerPool
from megatron_r1.reward.types import Sample

if TYPE_CHECKING:
    from tests.reward.conftest import Misbehaving

TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def pool(misbehaving: Misbehaving) -> Iterator[RewardWorkerPool]:
    fns = [misbehaving.length, misbehaving.raising, misbehaving.slow]
    with RewardWorkerPool(fns, num_workers=2, timeout_s=TIMEOUT_S) as pool:
        yield pool


def test_values_come_back_in_order(pool: RewardWorkerPool) -> None:
    completions = ["x" * i for i in range(300)]  # several chunks per worker
    result = pool.run(completions, [Sample()] * 300)
    assert result.values[0] == [float(i) for i in range(300)]
    assert result.values[1] == [0.5] * 300
    assert all(o == Outcome.OK for outcomes in result.outcomes for o in outcomes)
    assert result.first_errors == [None, None, None]


def test_raise_and_timeout_give_zero_and_are_counted(pool: RewardWorkerPool) -> None:
    completions = ["ok", "boom", "slow", "four", "slow boom", "nan"]
    start = time.monotonic()
    result = pool.run(completions, [Sample()] * len(completions))
    elapsed = time.monotonic() - start
    # Two 60 s sleeps were cut at 1 s each (on two workers); far below one sleep.
    assert elapsed < 15
    assert result.values[0] == [2.0, 4.0, 4.0, 4.0, 9.0, 3.0]  # other components unaffected
    assert result.outcomes[1] == [Outcome.OK, Outcome.ERROR, Outcome.OK, Outcome.OK,
                                  Outcome.ERROR, Outcome.ERROR]
    assert result.values[1] == [0.5, 0.0, 0.5, 0.5, 0.0, 0.0]
    assert result.outcomes[2] == [Outcome.OK, Outcome.OK, Outcome.TIMEOUT, Outcome.OK,
                                  Outcome.TIMEOUT, Outcome.OK]
    assert result.values[2] == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert result.first_errors[1] in ("RuntimeError: boom in completion",
                                      "ValueError: reward function returned nan")
    assert result.first_errors[2] is not None and "ran past 1.0 s" in result.first_errors[2]
    # The replaced workers serve the next run.
    again = pool.run(["ok"], [Sample()])
    assert again.values == [[2.0], [0.5], [1.0]]


def test_dead_worker_is_an_error_and_is_replaced(pool: RewardWorkerPool) -> None:
    result = pool.run(["die", "fine"], [Sample(), Sample()])
    assert result.outcomes[2] == [Outcome.ERROR, Outcome.OK]
    assert result.first_errors[2] == "reward worker died (exit code 3)"
    assert result.values[0] == [3.0, 4.0]
    assert pool.run(["ok"], [Sample()]).outcomes[2] == [Outcome.OK]


def test_runs_from_a_non_main_thread(pool: RewardWorkerPool) -> None:
    # No signals involved: the GRPO loop may score from any thread.
    with ThreadPoolExecutor(max_workers=1) as executor:
        result = executor.submit(pool.run, ["abc", "slow"], [Sample(), Sample()]).result()
    assert result.values == [[3.0, 4.0], [0.5, 0.5], [1.0, 0.0]]
    assert result.outcomes[2] == [Outcome.OK, Outcome.TIMEOUT]


def test_length_mismatch_raises(pool: RewardWorkerPool) -> None:
    with pytest.raises(ValueError, match="got 2 completions but 1 samples"):
        pool.run(["a", "b"], [Sample()])


def test_math_verify_hang_holding_the_gil_is_killed() -> None:
    # sympy evaluates 10^(10^10) in C without releasing the GIL: a thread-based timeout
    # could not even regain control; the worker process is killed instead.
    completions = ["<answer> \\boxed{10^{10^{10}}} </answer>", "<answer> 36 </answer>"]
    samples = [Sample(answer="36"), Sample(answer="36")]
    with RewardWorkerPool([accuracy_reward], num_workers=1, timeout_s=TIMEOUT_S) as pool:
        start = time.monotonic()
        result = pool.run(completions, samples)
        assert time.monotonic() - start < 15
    assert result.outcomes == [[Outcome.TIMEOUT, Outcome.OK]]
    assert result.values == [[0.0, 1.0]]


def test_bad_arguments_raise(misbehaving: Misbehaving) -> None:
    with pytest.raises(TypeError, match="picklable"):
        RewardWorkerPool([lambda c, s: 1.0], num_workers=1, timeout_s=1.0)
    with pytest.raises(ValueError, match="num_workers=0"):
        RewardWorkerPool([misbehaving.length], num_workers=0, timeout_s=1.0)
    with pytest.raises(ValueError, match="timeout_s=0"):
        RewardWorkerPool([misbehaving.length], num_workers=1, timeout_s=0)
    with pytest.raises(RuntimeError, match="exited during start-up"):
        RewardWorkerPool([misbehaving.unloadable], num_workers=1, timeout_s=1.0)


def test_closed_pool_raises(misbehaving: Misbehaving) -> None:
    pool = RewardWorkerPool([misbehaving.length], num_workers=1, timeout_s=1.0)
    process = pool._workers[0].process
    pool.close()
    assert not process.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        pool.run(["a"], [Sample()])


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_hung_call_does_not_block_interpreter_exit(tmp_path: Path) -> None:
    script = tmp_path / "hang_at_exit.py"
    script.write_text(textwrap.dedent("""
        import sys, threading, time
        from megatron_r1.reward.pool import RewardWorkerPool
        from megatron_r1.reward.types import Sample
        def hang(completion, sample):
            time.sleep(3600)
            return 1.0

        if __name__ == "__main__":
            pool = RewardWorkerPool([hang], num_workers=1, timeout_s=3600)
            print(pool._workers[0].process.pid, flush=True)
            threading.Thread(target=pool.run, args=(["x"], [Sample()]), daemon=True).start()
            time.sleep(0.5)  # the worker is now inside the hung call
            sys.exit(0)      # no close(): exit must not wait for the call
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 30
    worker_pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker_pid)
