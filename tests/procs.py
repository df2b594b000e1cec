"""Test support: run the real CLI in fresh processes (torchrun for world size > 1).

Imported by tests as `procs` (tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["OMP_NUM_THREADS"] = "1"  # 2 cores shared by up to 4 ranks
    return env


def run_module(args: list[str], *, nproc: int = 1, timeout: float = 300,
               check: bool = True) -> subprocess.CompletedProcess[str]:
    """`python -m megatron_r1 ARGS`, or under torchrun with `nproc` processes."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "megatron_r1", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "megatron_r1", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_script(script: Path, args: list[str], *, nproc: int = 1, timeout: float = 300,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python SCRIPT ARGS` (under torchrun for nproc > 1), with `env` added to the
    environment; raises with its stderr on failure."""
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone",
                                      f"--nproc-per-node={nproc}"]
    proc = subprocess.run([sys.executable, *launcher, str(script), *args], cwd=REPO,
                          env={**_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed:\n{proc.stderr[-6000:]}")
    return proc


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]



def run_python(code: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter (megatron's global state and the CPU redirections
    stay out of the test process); the caller inspects returncode, stdout and stderr."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def private_shm_available() -> bool:
    """Whether this machine lets an unprivileged process mount its own /dev/shm (a user and
    mount namespace: `unshare --mount --map-root-user`)."""
    try:
        probe = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c",
                                "mount -t tmpfs tmpfs /dev/shm"], capture_output=True,
                               timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def run_two_nodes(args: list[str], *, nproc_per_node: int = 1, timeout: float = 600,
                  private_shm: bool = True, script: Path | None = None,
                  env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess[str]]:
    """`python -m megatron_r1 ARGS` (or `python SCRIPT ARGS`, with `env` added to the
    environment) as a job of two simulated nodes: two torchrun agents on
    this host (`--nnodes 2 --node-rank 0|1`, one static rendezvous), `nproc_per_node` ranks
    each. With `private_shm`, node 1's agent and everything it starts see a /dev/shm of their
    own (a tmpfs in a mount namespace of their own), as on a second host: nothing passes
    between the "nodes" through shared memory. Returns both agents' results (node 0 first);
    raises with their output when either fails."""
    port = _free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               f"--node-rank={node}", f"--nproc-per-node={nproc_per_node}",
               "--master-addr=127.0.0.1", f"--master-port={port}",
               *([str(script)] if script else ["-m", "megatron_r1"]), *args]
        if node == 1 and private_shm:
            cmd = ["unshare", "--mount", "--map-root-user", "sh", "-c",
                   'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "sh", *cmd]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env={**_env(), **(env or {})},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    # read both agents' pipes as they run (a full pipe would stall an agent), stop the other
    # one shortly after either fails (its ranks would wait for the failed node until timeout)
    outputs: list[list[str]] = [["", ""], ["", ""]]

    def drain(n: int) -> None:
        outputs[n][0], outputs[n][1] = procs[n].communicate()

    readers = [threading.Thread(target=drain, args=(n,), daemon=True) for n in (0, 1)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + timeout
    failed_at = None
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > 60:
            break
        time.sleep(0.5)
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the agent and its ranks
    for reader in readers:
        reader.join(timeout=60)  # an orphan holding the pipe must not hang the test
    results = [subprocess.CompletedProcess(p.args, p.returncode, *outputs[n])
               for n, p in enumerate(procs)]
    if any(r.returncode for r in results):
        raise AssertionError("\n".join(f"node {n} ({r.returncode}):\n{r.stdout[-3000:]}\n"
                                       f"{r.stderr[-6000:]}" for n, r in enumerate(results)))
    return results


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
