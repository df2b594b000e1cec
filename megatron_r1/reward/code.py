"""The accuracy reward for code: run the completion's program on the prompt's tests, sandboxed.

Layer L1 (pure Python + subprocess). R1_RECIPE.md section 3: compile and run against test cases
in a sandbox with time and memory limits, no network and no access to the host's files; the
reward is 1 when all tests pass (or the fraction passed, `reward.code_partial_credit`).

- Tests are stdin/stdout pairs (the Codeforces / LiveCodeBench form): the program reads the
  test's input and must print its output; outputs compare after stripping trailing whitespace
  on every line and trailing blank lines.
- The program is the last fenced ```python block after the chain of thought (inside the
  `<answer>` block if there is one). No block, no program: reward 0.
- The sandbox is bubblewrap (`bwrap`, Debian package `bubblewrap`, what Flatpak uses): new
  user, PID, network, IPC and UTS namespaces; the root file system holds only /usr (and the
  Python installation), read-only, plus an empty private /tmp, /proc and /dev; no environment
  variables. Resource limits (setrlimit) bound CPU seconds, address space, file size and the
  number of processes (root runs the sandbox as `nobody`, since RLIMIT_NPROC does not bind
  root); a wall-clock limit kills the whole process group. Without bwrap the reward refuses to run
  code (`check_sandbox` says so at start-up) rather than running it unconfined.
"""

from __future__ import annotations

import math
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from megatron_r1.reward.accuracy import accuracy_reward
from megatron_r1.reward.types import CodeTest, Sample

_THINK_END = "</think>"
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_PYTHON_BLOCK = re.compile(r"```(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """Limits of one program run (RewardConfig.code_*)."""

    time_s: float = 2.0
    """CPU seconds per test; the wall-clock limit is twice this plus a second."""
    memory_mb: int = 512
    """Address space of the program."""
    output_kb: int = 1024
    """Largest stdout a test may produce."""
    partial_credit: bool = False
    """Reward the fraction of tests passed instead of all-or-nothing."""
    processes: int = 16
    """Processes and threads the program may add (a fork bomb stops there)."""
    python: str = "/usr/bin/python3"
    """The interpreter, from the host's read-only /usr (or its own installation, bound
    read-only), so the program sees the standard library and no site-packages."""


@dataclass(frozen=True, slots=True)
class RunResult:
    stdout: str
    returncode: int
    timed_out: bool


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create its namespaces here."""


def extract_program(completion: str) -> str | None:
    """The last ```python block after `</think>` (inside the last `<answer>` block when there
    is one), or None."""
    region = completion.rpartition(_THINK_END)[2]
    blocks = _ANSWER_BLOCK.findall(region)
    if blocks:
        region = blocks[-1]
    programs = _PYTHON_BLOCK.findall(region)
    return programs[-1] if programs else None


def outputs_match(got: str, expected: str) -> bool:
    """Equal up to trailing whitespace on each line and trailing blank lines."""
    def norm(text: str) -> list[str]:
        lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    return norm(got) == norm(expected)


def _bwrap_command(program: str, python: str) -> list[str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable("the code reward runs programs under bubblewrap, and `bwrap` "
                                 "is not on PATH (Debian/Ubuntu: apt-get install bubblewrap)")
    cmd = [bwrap, "--ro-bind", "/usr", "/usr"]
    # Merged-/usr systems link /bin, /lib, ... into /usr; others have real directories.
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        path = Path(top)
        if path.is_symlink():
            cmd += ["--symlink", os.readlink(path), top]
        elif path.is_dir():
            cmd += ["--ro-bind", top, top]
    interpreter = Path(python)
    if not interpreter.is_file():
        raise SandboxUnavailable(f"reward.code_python={python!r}: no such interpreter")
    prefix = interpreter.resolve().parents[1]  # <prefix>/bin/python3
    if not prefix.is_relative_to("/usr"):
        cmd += ["--ro-bind", str(prefix), str(prefix)]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--chdir", "/tmp",
            "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
            python, "-I", "-S", "-c", program]
    return cmd


def _task_count(uid: int) -> int:
    """Processes and threads of `uid` now (what RLIMIT_NPROC counts)."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:  # the process ended meanwhile
                continue
    return count


def _process_budget(limits: SandboxLimits) -> tuple[int | None, int]:
    """(uid to run as, RLIMIT_NPROC). RLIMIT_NPROC counts every task of the real user and
    does not bind root, so root runs the sandbox as `nobody`; another user keeps its uid and
    gets its current task count plus the allowance."""
    if os.geteuid() == 0:
        return _NOBODY, _task_count(_NOBODY) + limits.processes
    return None, _task_count(os.getuid()) + limits.processes


_NOBODY = 65534


def _limit_resources(limits: SandboxLimits, uid: int | None, nproc: int) -> None:
    """In the child, before exec: the user and the limits every process of the sandbox
    inherits."""
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    cpu = math.ceil(limits.time_s)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    memory = limits.memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    size = limits.output_kb << 10
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_program(program: str, stdin: str, limits: SandboxLimits,
                budget: tuple[int | None, int] | None = None) -> RunResult:
    """Run `program` with `stdin` in the sandbox; stdout goes to a size-limited file.
    `budget` is `_process_budget(limits)` when the caller runs several tests in a row (it
    scans /proc)."""
    cmd = _bwrap_command(program, limits.python)
    uid, nproc = budget or _process_budget(limits)
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out,
                                stderr=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=lambda: _limit_resources(limits, uid, nproc))
        timed_out = False
        try:
            proc.communicate(stdin.encode(), timeout=2 * limits.time_s + 1)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except BrokenPipeError:  # the program exited without reading its input
            proc.wait()
        out.seek(0)
        stdout = out.read(limits.output_kb << 10).decode("utf-8", errors="replace")
    return RunResult(stdout=stdout, returncode=proc.returncode, timed_out=timed_out)


def check_sandbox(limits: SandboxLimits) -> None:
    """Run a trivial program in the sandbox; raise SandboxUnavailable with the reason if that
    fails (called at start-up when the prompts hold code tests)."""
    try:
        result = run_program("print(input()[::-1])", "ok", limits)
    except OSError as err:
        raise SandboxUnavailable(f"the code sandbox cannot start: {err}") from err
    if result.stdout.strip() != "ko" or result.returncode != 0:
        raise SandboxUnavailable(
            f"the code sandbox does not run programs here (bwrap exit code "
            f"{result.returncode}); bubblewrap needs user namespaces (or a setuid bwrap)")


def code_accuracy(completion: str, tests: tuple[CodeTest, ...],
                  limits: SandboxLimits) -> float:
    """1.0 when the completion's program passes every test (the fraction passed with
    partial credit), 0.0 without a program.

    Raises:
        ValueError: no tests (a data problem, counted as an error by the scorer).
        SandboxUnavailable: no working sandbox (also counted as an error, never run unconfined).
    """
    if not tests:
        raise ValueError("code accuracy needs at least one test")
    program = extract_program(completion)
    if program is None:
        return 0.0
    passed = 0
    budget = _process_budget(limits)
    for test in tests:
        result = run_program(program, test.input, limits, budget)
        ok = (not result.timed_out and result.returncode == 0
              and outputs_match(result.stdout, test.output))
        passed += ok
        if not ok and not limits.partial_credit:
            return 0.0  # all-or-nothing: the remaining tests cannot change the reward
    return passed / len(tests)


@dataclass(frozen=True, slots=True)
class RuleAccuracy:
    """The accuracy component: code prompts (Sample.tests) run in the sandbox, every other
    prompt is a math answer (megatron_r1.reward.accuracy). An instance of a module-level
    class, so it pickles to the reward workers with its limits."""

    limits: SandboxLimits = SandboxLimits()

    def __call__(self, completion: str, sample: Sample, /) -> float:
        if sample.tests:
            return code_accuracy(completion, sample.tests, self.limits)
        return accuracy_reward(completion, sample)
