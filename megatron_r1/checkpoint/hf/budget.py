"""Host-memory budget of a conversion: account the tensors held at once, and measure RSS.

Layer L0/L1 (no torch needed). A conversion works on one unit at a time (one megatron
parameter and the Hugging Face tensors it is made of, or a batch of such units); before it
takes a unit it charges the unit's bytes to the budget and releases them when done. A unit
that alone exceeds the budget is an error naming the tensor, raised while planning, before
anything is written. The accounted peak is what the converter itself holds; the process's
peak resident set (VmHWM) is reported next to it, since it also counts the interpreter,
torch and megatron (a few hundred MB).
"""

from __future__ import annotations

import re
import resource
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2,
          "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str | int) -> int:
    """`"8GiB"`, `"500MB"`, `"1.5g"` or a plain number of bytes -> bytes.

    Raises:
        ValueError: naming the text that is not a size.
    """
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (examples: 8GiB, 500MB, 1048576)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(nbytes: float) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= factor:
            return f"{nbytes / factor:.2f} {unit}"
    return f"{int(nbytes)} B"


class MemoryBudget:
    """Bytes of tensors the converter holds at once, against a limit (thread-safe)."""

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes <= 0:
            raise ValueError(f"memory budget must be > 0 bytes, got {limit_bytes}")
        self.limit = limit_bytes
        self.current = 0
        self.peak = 0
        self._lock = threading.Lock()

    def check_fits(self, nbytes: int, what: str) -> None:
        """Raise if one unit of `nbytes` can never fit (called while planning).

        Raises:
            ValueError: naming `what`, its size and the budget.
        """
        if nbytes > self.limit:
            raise ValueError(f"{what} needs {format_size(nbytes)} at once, more than the memory "
                             f"budget of {format_size(self.limit)}; raise --memory-budget")

    @contextmanager
    def hold(self, nbytes: int, what: str) -> Iterator[None]:
        """Account `nbytes` while the block runs."""
        self.check_fits(nbytes, what)
        with self._lock:
            if self.current + nbytes > self.limit:
                # The planner sizes every unit and batch to fit; reaching this is a bug.
                raise RuntimeError(f"memory budget overrun: {what} ({format_size(nbytes)}) on top "
                                   f"of {format_size(self.current)} held, budget "
                                   f"{format_size(self.limit)}")
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        try:
            yield
        finally:
            with self._lock:
                self.current -= nbytes


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (VmHWM on Linux)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux: /proc/self/clear_refs),
    so peak_rss_bytes() measures from now; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def current_rss_bytes() -> int:
    """Resident set size of this process now (VmRSS on Linux; 0 where unknown)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
