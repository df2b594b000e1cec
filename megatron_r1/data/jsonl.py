"""Reading JSON-lines data files whose errors name the file and the line, and writing them.

Layer L1 (pure Python). SFT examples and GRPO prompts are both JSONL; one reader checks them,
and one writer makes them (rejection sampling writes an SFT data set).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from megatron_r1.config.schema import DataConfig

T = TypeVar("T")


def iter_jsonl_records(path: str | Path, keys: Sequence[str],
                       optional: dict[str, Callable[[Any], Any]] | None = None,
                       check: Callable[[dict[str, Any]], None] | None = None
                       ) -> Iterator[dict[str, Any]]:
    """The records of read_jsonl_records one at a time (a large file is never held whole),
    with the same checks and errors."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    count = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")  # keeps error columns on the line
            except UnicodeDecodeError as err:
                raise ValueError(f"{where}: not UTF-8 ({err.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected an object with keys "
                                 f"{' and '.join(repr(k) for k in keys)}, got a JSON "
                                 f"{type(obj).__name__}")
            for key in keys:
                if key not in obj:
                    raise ValueError(f"{where}: missing key {key!r}")
                if not isinstance(obj[key], str):
                    raise ValueError(f"{where}: {key!r} must be a string, got "
                                     f"{type(obj[key]).__name__} {obj[key]!r}")
            record = {key: obj[key] for key in keys}
            for key, convert in (optional or {}).items():
                if key in obj:
                    try:
                        record[key] = convert(obj[key])
                    except ValueError as err:
                        raise ValueError(f"{where}: {key!r}: {err}") from None
            if check is not None:
                try:
                    check(record)
                except ValueError as err:
                    raise ValueError(f"{where}: {err}") from None
            count += 1
            yield record
    if not count:
        raise ValueError(f"{path}: holds no examples")


def read_jsonl_records(path: str | Path, keys: Sequence[str],
                       optional: dict[str, Callable[[Any], Any]] | None = None,
                       check: Callable[[dict[str, Any]], None] | None = None
                       ) -> list[dict[str, Any]]:
    """Read one JSON object per line (blank lines skipped), keeping the string values of `keys`.

    Args:
        path: The JSONL file. Other keys are ignored.
        keys: Keys every object must have, each with a string value.
        optional: Keys an object may have, each with the function that checks and converts
            its value (a ValueError it raises is reported with the file, line and key).
        check: Called with each record; a ValueError it raises is reported with the file and
            line.

    Returns:
        {key: value} per object, in file order (optional keys only where present).

    Raises:
        ValueError: naming the file and the 1-based line for bad UTF-8, bad JSON, a value that
            is not an object, a missing key or a non-string value; naming the file when it is
            missing or holds no object.
    """
    return list(iter_jsonl_records(path, keys, optional, check))


def write_jsonl(path: str | Path, records: Iterable[dict[str, str]]) -> int:
    """Write one JSON object per line, atomically (a temporary file beside `path`, renamed
    into place when complete), so a crash never leaves half a data set. Returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def held_out_rows(data: DataConfig, records: int) -> list[int]:
    """The record indices (ascending) that `data.eval_fraction` holds out of data.path's
    `records` records: chosen by a permutation seeded with data.seed, so SFT and GRPO reading
    one file hold out the same lines.

    Raises:
        ValueError: when the fraction would leave no training (or no held-out) record.
    """
    count = round(records * data.eval_fraction)
    if not 0 < count < records:
        raise ValueError(f"data.eval_fraction={data.eval_fraction} of the {records} records "
                         f"of {data.path} holds out {count}: need at least one held-out and "
                         "one training record")
    return sorted(random.Random(f"held-out:{data.seed}").sample(range(records), count))


def jsonl_splits(data: DataConfig, read: Callable[[str], list[T]]) -> tuple[list[T], list[T]]:
    """(train, held-out) records of a JSONL source: `data.eval_path` read the same way, or a
    `data.eval_fraction` share of `data.path`'s records (held_out_rows), or none.

    Raises:
        ValueError: when the fraction would leave no training (or no held-out) record.
    """
    assert data.path is not None  # DataConfig checks it for source=jsonl
    records = read(data.path)
    if data.eval_path:
        return records, read(data.eval_path)
    if not data.eval_fraction:
        return records, []
    held = set(held_out_rows(data, len(records)))
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])
