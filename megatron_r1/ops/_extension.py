"""Finding the compiled kernels (megatron_r1._C) and saying once when they are missing.

The extension is optional: setup.py builds it where torch is importable at install time.
Everything in megatron_r1.ops works without it through the PyTorch reference.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch

_MODULE = "megatron_r1._C"


def _probe() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(_MODULE), None
    except ImportError as exc:
        return None, f"{type(exc).__name__}: {exc}"


# Probed once at import (loading the .so takes milliseconds), so that `supports` is a plain
# lookup that torch.compile can trace without a graph break.
_loaded, _load_error = _probe()
_has_cuda = bool(_loaded is not None and _loaded.has_cuda())
_warned: set[str] = set()


def load() -> ModuleType | None:
    """The extension module, or None (the reason is in `load_error()`)."""
    return _loaded


def load_error() -> str | None:
    return _load_error


def supports(device: torch.device) -> bool:
    """Whether the built extension has kernels for tensors on `device`."""
    if _loaded is None:
        return False
    return device.type == "cpu" or (device.type == "cuda" and _has_cuda)


def why_unsupported(device: torch.device) -> str:
    """A one-line reason for `not supports(device)`, naming the fix."""
    if load() is None:
        return (f"{_MODULE} is not built ({load_error()}); reinstall with torch importable: "
                "pip install --no-build-isolation -e .")
    return (f"{_MODULE} was built without kernels for {device.type} tensors (CUDA kernels need "
            "a CUDA toolkit and a CUDA torch at install time)")


def warn_once(key: str, message: str) -> None:
    """A RuntimeWarning the first time `key` is seen in this process."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def warn_fallback_once(op: str, device: torch.device) -> None:
    """One warning per (op, device type) per process when 'auto' falls back to PyTorch."""
    warn_once(f"{op}:{device.type}", f"{op}: using the PyTorch reference (slower, more "
              f"memory) because {why_unsupported(device)}")
