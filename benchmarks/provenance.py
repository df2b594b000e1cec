"""What every benchmark row records about where it ran: the commit and the machine.

Not part of the package (benchmarks import it from their own folder). The commit may be given
as MEGATRON_R1_COMMIT for copies of the tree without .git (e.g. on the lent GPU machine).
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def commit() -> str:
    """Short commit hash, with '-dirty' when tracked files differ from it."""
    if os.environ.get("MEGATRON_R1_COMMIT"):
        return os.environ["MEGATRON_R1_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                             capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, text=True, capture_output=True, timeout=10).stdout
        return (sha or "unknown") + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    """CPU model and core count, e.g. 'AMD EPYC 7B13 x2'."""
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.is_file() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu} x{os.cpu_count()}"


def write_rows(rows: list[dict[str, object]], out_dir: Path, name: str) -> Path:
    """`out_dir/<name>_<UTC time>.csv` with the rows (columns from the first); prints it."""
    import csv
    import datetime

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}_{stamp}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return path
