"""The code accuracy reward: real programs in the real sandbox (bubblewrap), each limit and each
isolation promise checked by a program that tries to break it."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from megatron_r1.config.schema import RewardConfig
from megatron_r1.data.prompts import read_prompt_jsonl
from megatron_r1.reward.code import (
    RuleAccuracy,
    SandboxLimits,
    code_accuracy,
    extract_program,
    outputs_match,
    run_program,
)
from megatron_r1.reward.scoring import RewardScorer
from megatron_r1.reward.types import CodeTest, Sample

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None,
                                 reason="bubblewrap (bwrap) is not installed; .ci/run installs it")
LIMITS = SandboxLimits(time_s=1.0, memory_mb=256, output_kb=64)
ADD = (CodeTest("3 4\n", "7\n"), CodeTest("10 -2\n", "8"), CodeTest("0 0\n", "0\n"))


def answer(program: str) -> str:
    return f"<think> read two numbers and add </think> <answer>\n```python\n{program}\n```\n</answer>"


def test_extraction_takes_the_last_python_block_after_the_reasoning():
    text = ("<think> first try:\n```python\nprint(1)\n```\n</think> <answer> ```python\n"
            "print(2)\n``` then better:\n```python\nprint(3)\n```\n</answer>")
    assert extract_program(text) == "print(3)\n"
    assert extract_program("<think> ```python\nprint(1)\n``` </think> no code") is None
    assert extract_program("```py\nx = 1\n```") == "x = 1\n"  # no think block: the whole text
    assert extract_program("```\nprint(1)\n```") is None  # a block must say it is Python
    assert outputs_match("7  \n\n\n", "7") and outputs_match("a\r\nb\n", "a\nb")
    assert not outputs_match("7 8", "7\n8")


@needs_bwrap
def test_right_wrong_and_partially_right_programs():
    right = answer("a, b = map(int, input().split())\nprint(a + b)")
    wrong = answer("a, b = map(int, input().split())\nprint(a + b if a == 3 else a - b)")
    assert code_accuracy(right, ADD, LIMITS) == 1.0
    assert code_accuracy(wrong, ADD, LIMITS) == 0.0  # passes 2 of 3: all or nothing
    partial = SandboxLimits(time_s=1.0, memory_mb=256, output_kb=64, partial_credit=True)
    assert code_accuracy(wrong, ADD, partial) == pytest.approx(2 / 3)
    assert code_accuracy("the answer is 7", ADD, LIMITS) == 0.0  # no program
    assert code_accuracy(answer("raise SystemExit(3)"), ADD, partial) == 0.0  # exit code != 0
    with pytest.raises(ValueError, match="at least one test"):
        code_accuracy(right, (), LIMITS)


@needs_bwrap
@pytest.mark.parametrize(("program", "why"), [
    ("while True: pass", "CPU time"),
    ("import time\ntime.sleep(60)", "wall clock"),
    ("x = bytearray(1 << 30)\nprint('allocated')", "memory"),
    ("print('x' * (1 << 22))", "output size"),
    ("import os\nwhile True: os.fork()", "processes"),
])
def test_limits_stop_a_program(program, why):
    start = time.monotonic()
    result = run_program(program, "", LIMITS)
    elapsed = time.monotonic() - start
    assert result.timed_out or result.returncode != 0, why
    assert elapsed < 2 * LIMITS.time_s + 3, (why, elapsed)  # the wall-clock limit plus slack
    assert len(result.stdout) <= LIMITS.output_kb << 10


@needs_bwrap
def test_no_network_no_host_files_no_environment(tmp_path, monkeypatch):
    secret = tmp_path / "secret.txt"
    secret.write_text("host data")
    monkeypatch.setenv("MR1_SECRET_TOKEN", "hunter2")
    probe = f"""
import os, socket
try:
    socket.create_connection(("1.1.1.1", 53), timeout=2)
    print("network")
except OSError:
    print("no network")
print("host file" if os.path.exists({str(secret)!r}) else "no host file")
print("host env" if "MR1_SECRET_TOKEN" in os.environ else "no host env")
print("writable /tmp" if open("/tmp/x", "w").write("1") == 1 else "")
try:
    open("/usr/evil", "w")
    print("writable /usr")
except OSError:
    print("read-only /usr")
"""
    result = run_program(probe, "", LIMITS)
    assert result.returncode == 0
    assert result.stdout.split("\n")[:5] == [
        "no network", "no host file", "no host env", "writable /tmp", "read-only /usr"]


@needs_bwrap
def test_code_prompts_score_through_the_reward_pool():
    """The accuracy component dispatches on the sample: code tests run, math answers verify."""
    cfg = RewardConfig(code_time_s=1.0, timeout_s=30.0)
    code = Sample(tests=ADD)
    with RewardScorer.from_config(cfg, num_workers=1) as scorer:
        batch = scorer.score(
            [answer("a, b = map(int, input().split())\nprint(a + b)"), answer("print(7)"),
             "<think> 3 + 4 </think> <answer> 7 </answer>"],
            [code, code, Sample(answer="7")])
    assert batch.components_N["accuracy"].tolist() == [1.0, 0.0, 1.0]
    assert batch.metrics["reward/accuracy_errors"] == 0.0
    assert RuleAccuracy()(answer("print(1)"), Sample(tests=(CodeTest("", "1"),))) == 1.0


def test_prompt_files_hold_math_and_code_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Compute 3 + 4", "answer": "7"},
        {"prompt": "Add two numbers", "tests": [{"input": "3 4\n", "output": "7\n"}]},
        {"prompt": "Write a haiku", "kind": "general"},
        {"prompt": "Compute 1 + 1", "answer": "2", "kind": "easy_math"},
    ]) + "\n")
    assert read_prompt_jsonl(path) == [
        ("Compute 3 + 4", "7", (), "math"), ("Add two numbers", "", (("3 4\n", "7\n"),), "code"),
        ("Write a haiku", "", (), "general"), ("Compute 1 + 1", "2", (), "easy_math")]


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "p"}, r"prompts.jsonl:1: needs \"answer\" \(a math prompt\), \"tests\""),
    ({"prompt": "p", "kind": ""}, r"prompts.jsonl:1: 'kind': must be a non-empty name"),
    ({"prompt": "p", "tests": []}, r"prompts.jsonl:1: 'tests': expected a non-empty list"),
    ({"prompt": "p", "tests": [{"input": "1"}]}, r"prompts.jsonl:1: 'tests': test 0: expected"),
    ({"prompt": "p", "answer": 7}, r"prompts.jsonl:1: 'answer': must be a string, got int 7"),
])
def test_bad_prompt_records_name_the_line(tmp_path, record, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=message):
        read_prompt_jsonl(path)
