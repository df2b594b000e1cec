"""Worker processes that run reward functions with a wall-clock limit on every single call.

Layer L1 (standard library only, so a worker imports nothing but the reward functions' own
modules). The key decision is processes, not threads or signals:

- A thread cannot be stopped. A `concurrent.futures` wait with a timeout stops *waiting*, but
  the hung call keeps its core for ever, ThreadPoolExecutor joins its threads at exit (so one
  hang blocks the interpreter from exiting), and a call that holds the GIL starves the waiter
  too: math-verify on `\\boxed{10^{10^{10}}}` runs in C inside sympy without releasing the GIL,
  and a watchdog thread next to it never got to run.
- SIGALRM (math-verify's own mechanism) only works in the main thread, and its handler cannot
  run while C code holds the interpreter, the same case.
- A process can be killed. On a timeout the parent SIGKILLs the worker, records the call as
  timed out, starts a replacement and carries on. Processes also score in parallel, which
  threads cannot for CPU-bound sympy.

Workers come from the `forkserver` start method: forking the trainer itself (CUDA, NCCL and
vLLM threads) is unsafe, while the fork server is a fresh single-threaded interpreter; it
preloads the reward functions' modules, so a replacement worker starts in milliseconds. As with
any spawn/forkserver child, a worker re-imports the parent's `__main__` unless it was run with
`-m` (keep entry scripts light: the `megatron-r1` script imports only the CLI module). A worker
reports ready once its imports are done, and only then gets calls, so start-up time never
counts against a reward function. Workers are daemonic (multiprocessing terminates them at
interpreter exit, hung or not), ignore SIGINT (the parent handles Ctrl-C), and exit when the
parent's end of their pipe closes.

Work travels in chunks of samples; a worker sends one message per (sample, component) as each
call finishes, and the parent's deadline for that worker restarts with every message, so the
limit applies to each call and the parent knows exactly which call overran.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import pickle
import signal
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from megatron_r1.reward.types import RewardFn, Sample

logger = logging.getLogger(__name__)

_Call = tuple[int, int]
"""(sample index, component index): one reward-function call."""
_Task = list[tuple[int, str, Sample, tuple[int, ...]]]
"""What a worker receives: (sample index, completion, sample, component indices) entries."""
_READY = "ready"
"""A worker's first message: start-up (imports) is done, so the clock of its calls may run."""

STARTUP_TIMEOUT_S = 120.0
"""A worker that has not started (imported its reward functions) after this long is a broken
environment, not a slow reward: the pool raises."""


class Outcome(IntEnum):
    """How one reward-function call ended."""

    OK = 0
    ERROR = 1
    """It raised, returned a non-finite value, or its worker process died."""
    TIMEOUT = 2
    """It ran past the time limit and its worker was killed."""


@dataclass(frozen=True, slots=True)
class PoolResult:
    """Results of one `RewardWorkerPool.run`, indexed [component][sample]."""

    values: list[list[float]]
    """The returned values; 0.0 where the call did not end OK."""
    outcomes: list[list[Outcome]]
    """How each call ended."""
    first_errors: list[str | None]
    """Per component, the message of its first failed call (None if none failed)."""


def _worker_main(conn: Connection, fns: tuple[RewardFn, ...]) -> None:
    """Worker loop: receive a task, send (index, component, value, error) per call."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn.send(_READY)
    while True:
        try:
            task: _Task | None = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if task is None:
            return
        for index, completion, sample, components in task:
            for k in components:
                error: str | None = None
                value = 0.0
                try:
                    value = float(fns[k](completion, sample))
                    if not math.isfinite(value):
                        raise ValueError(f"reward function returned {value}")
                except Exception as exc:
                    value, error = 0.0, f"{type(exc).__name__}: {exc}"
                conn.send((index, k, value, error))


@dataclass(slots=True)
class _Worker:
    process: BaseProcess
    conn: Connection
    started: float
    """time.monotonic() at start; bounds the start-up."""
    expected: deque[_Call]
    """Calls sent and not yet answered, in the order the worker makes them."""
    deadline: float = math.inf
    """When the call at the head of `expected` runs out of time."""
    ready: bool = False
    """Start-up is done (its first message arrived); only ready workers get calls."""


class _Batch:
    """The state of one `run`: inputs, results so far, and the calls not yet sent."""

    def __init__(self, completions: Sequence[str], samples: Sequence[Sample],
                 num_fns: int) -> None:
        n = len(completions)
        self.completions = completions
        self.samples = samples
        self.values = [[0.0] * n for _ in range(num_fns)]
        self.outcomes = [[Outcome.OK] * n for _ in range(num_fns)]
        self.first_errors: list[str | None] = [None] * num_fns
        self.pending: deque[list[_Call]] = deque()

    def fail(self, call: _Call, outcome: Outcome, message: str) -> None:
        index, k = call
        self.values[k][index] = 0.0
        self.outcomes[k][index] = outcome
        if self.first_errors[k] is None:
            self.first_errors[k] = message


def _shutdown(workers: list[_Worker]) -> None:
    """Stop every worker: ask the idle ones to exit, kill the rest (also run at exit/GC)."""
    for worker in workers:
        if worker.process.is_alive() and not worker.expected:
            with contextlib.suppress(OSError):
                worker.conn.send(None)
    for worker in workers:
        worker.process.join(timeout=0.0 if worker.expected else 1.0)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(timeout=1.0)
        worker.conn.close()
    workers.clear()


class RewardWorkerPool:
    """A fixed number of worker processes evaluating reward functions under a time limit.

    Args:
        fns: The reward functions; picklable by reference (module-level functions).
        num_workers: Worker processes (each runs one call at a time).
        timeout_s: Wall-clock limit of one call, counted by the parent from the moment the
            worker could start it.

    Raises:
        ValueError: for num_workers < 1 or timeout_s <= 0.
        TypeError: when a reward function cannot be pickled.
    """

    def __init__(self, fns: Sequence[RewardFn], *, num_workers: int, timeout_s: float) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers}: must be >= 1")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s}: must be > 0")
        self._fns = tuple(fns)
        try:
            pickle.dumps(self._fns)
        except Exception as exc:
            raise TypeError(
                f"reward functions must be picklable by reference (module-level functions) to "
                f"run in worker processes: {exc}") from exc
        self.timeout_s = timeout_s
        self._ctx = mp.get_context("forkserver")
        # Takes effect only if the process's fork server is not running yet; otherwise each
        # worker imports the modules itself (slower to start, same behaviour).
        self._ctx.set_forkserver_preload(sorted({
            module for fn in self._fns
            if isinstance(module := getattr(fn, "__module__", None), str) and module != "__main__"
        }))
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        for _ in range(num_workers):
            self._workers.append(self._start_worker())
        # Wait here, so that a reward function that cannot be imported fails the constructor.
        while starting := self._starting():
            self._poll_starting(starting, timeout=None)

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_worker_main, args=(child_conn, self._fns),
                                    name="reward-worker", daemon=True)
        process.start()
        # Only the worker may hold its end, so that its death reads as EOF here.
        child_conn.close()
        return _Worker(process=process, conn=parent_conn, started=time.monotonic(),
                       expected=deque())

    def _starting(self) -> list[int]:
        return [slot for slot, worker in enumerate(self._workers) if not worker.ready]

    def _poll_starting(self, slots: list[int], *, timeout: float | None) -> None:
        """Mark the starting workers that reported ready; wait up to `timeout` (None: until
        one does or the start-up limit passes).

        Raises:
            RuntimeError: when a worker exits or exceeds STARTUP_TIMEOUT_S while starting.
        """
        if not slots:
            return
        if timeout is None:
            first_start = min(self._workers[slot].started for slot in slots)
            timeout = max(0.0, first_start + STARTUP_TIMEOUT_S - time.monotonic())
        ready = wait([self._workers[slot].conn for slot in slots], timeout=timeout)
        for slot in slots:
            worker = self._workers[slot]
            if worker.conn not in ready:
                if time.monotonic() - worker.started > STARTUP_TIMEOUT_S:
                    raise RuntimeError(
                        f"a reward worker did not start within {STARTUP_TIMEOUT_S} s")
                continue
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                worker.process.join(timeout=1.0)
                raise RuntimeError(
                    f"a reward worker exited during start-up (exit code "
                    f"{worker.process.exitcode}): can the reward functions' modules be "
                    "imported in a fresh interpreter (sys.path, PYTHONPATH)?") from None
            assert message == _READY, f"unexpected first message {message!r}"
            worker.ready = True

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    def run(self, completions: Sequence[str], samples: Sequence[Sample]) -> PoolResult:
        """Call every reward function on every (completion, sample) pair.

        Args:
            completions: N generated texts.
            samples: N samples, one per completion.

        Returns:
            Values and outcomes of the N x num_fns calls. A call that raises, or whose worker
            dies, is an ERROR; one that runs past `timeout_s` is a TIMEOUT; both have value 0.

        Raises:
            ValueError: when the two sequences differ in length.
            RuntimeError: when the pool is closed.
        """
        if len(completions) != len(samples):
            raise ValueError(f"got {len(completions)} completions but {len(samples)} samples")
        if not self._workers:
            raise RuntimeError("the reward worker pool is closed")
        batch = _Batch(completions, samples, len(self._fns))
        # Chunks small enough to balance the workers, large enough to amortise the messages.
        n = len(completions)
        chunk = max(1, min(32, n // (4 * len(self._workers))))
        for start in range(0, n, chunk):
            batch.pending.append([(i, k) for i in range(start, min(start + chunk, n))
                                  for k in range(len(self._fns))])
        try:
            while batch.pending or any(w.expected for w in self._workers):
                self._step(batch)
        finally:
            # Interrupted (Ctrl-C, a bug): busy workers would answer into the next run.
            for slot, worker in enumerate(self._workers):
                if worker.expected:
                    worker.expected.clear()
                    self._restart(slot)
        return PoolResult(values=batch.values, outcomes=batch.outcomes,
                          first_errors=batch.first_errors)

    def _step(self, batch: _Batch) -> None:
        """Feed idle workers, wait for a result or the nearest deadline, act on both."""
        for slot, worker in enumerate(self._workers):
            if batch.pending and worker.ready and not worker.expected:
                self._send(slot, batch.pending.popleft(), batch)
        busy = [slot for slot, worker in enumerate(self._workers) if worker.expected]
        starting = self._starting()  # replacements of killed workers
        if not busy:
            self._poll_starting(starting, timeout=None)
            return
        next_deadline = min(self._workers[slot].deadline for slot in busy)
        ready = wait([self._workers[slot].conn for slot in busy + starting],
                     timeout=max(0.0, next_deadline - time.monotonic()))
        self._poll_starting(starting, timeout=0.0)
        for slot in busy:
            if self._workers[slot].conn in ready:
                self._receive(slot, batch)
        now = time.monotonic()
        for slot in busy:
            worker = self._workers[slot]
            # A result already in the pipe arrived in time: it is read on the next step.
            if worker.expected and worker.deadline <= now and not worker.conn.poll():
                index, k = worker.expected[0]
                self._abandon(slot, batch, Outcome.TIMEOUT,
                              f"component {k} on sample {index} ran past {self.timeout_s} s")

    def _send(self, slot: int, calls: list[_Call], batch: _Batch) -> None:
        task: _Task = []
        for index, k in calls:
            if task and task[-1][0] == index:
                task[-1] = (*task[-1][:3], (*task[-1][3], k))
            else:
                task.append((index, batch.completions[index], batch.samples[index], (k,)))
        worker = self._workers[slot]
        try:
            worker.conn.send(task)
        except OSError:  # the idle worker died (killed from outside): requeue, replace it
            batch.pending.appendleft(calls)
            self._restart(slot)
            return
        worker.expected.extend(calls)
        worker.deadline = time.monotonic() + self.timeout_s

    def _receive(self, slot: int, batch: _Batch) -> None:
        worker = self._workers[slot]
        try:
            while worker.expected and worker.conn.poll():
                index, k, value, error = worker.conn.recv()
                call = worker.expected.popleft()
                assert call == (index, k), f"expected call {call}, got {(index, k)}"
                batch.values[k][index] = value
                if error is not None:
                    batch.fail(call, Outcome.ERROR, error)
                # The worker started its next call no later than now.
                worker.deadline = time.monotonic() + self.timeout_s
        except (EOFError, OSError):
            worker.process.join(timeout=1.0)  # EOF can come before the exit status
            code = worker.process.exitcode
            logger.warning("reward worker died (exit code %s); restarting it", code)
            self._abandon(slot, batch, Outcome.ERROR, f"reward worker died (exit code {code})")

    def _abandon(self, slot: int, batch: _Batch, outcome: Outcome, message: str) -> None:
        """The worker's current call failed: record it, replace the worker, requeue the rest."""
        worker = self._workers[slot]
        batch.fail(worker.expected.popleft(), outcome, message)
        if worker.expected:
            batch.pending.appendleft(list(worker.expected))
            worker.expected.clear()
        self._restart(slot)

    def _restart(self, slot: int) -> None:
        worker = self._workers[slot]
        worker.process.kill()
        worker.process.join(timeout=1.0)
        worker.conn.close()
        self._workers[slot] = self._start_worker()

    def close(self) -> None:
        """Stop the workers (idempotent; also happens when the pool is garbage-collected)."""
        self._finalizer()

    def __enter__(self) -> RewardWorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
