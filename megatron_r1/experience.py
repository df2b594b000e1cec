"""The experience store: every rollout's sequences, log-probs, rewards and advantages, in zarr.

Layer L1 (torch, torch.distributed, zarr). One zarr group per run
(`<run_dir>/experience.zarr`), one row per sampled output. Readers see one table: per-token
columns [rows, S] in the trainer's label layout (model input `tokens`, next ids `labels`;
position t holds the log-prob of token t + 1; zeros outside the completion), so a row can be
fed back to the trainer as is (`grpo.rollout_batch.stored_rollout`: the GPU benchmark trains on
a recorded rollout), rejection sampling and analysis tools read any column without the rest.
`step` is the number of optimizer steps of the policy that sampled the row; with MoE routing
replay from the engine (grpo.routing_replay=r3) a `routing` column holds, per row and model
input position, the experts the engine routed it to: int16 [rows, S, moe_layers, top_k].

How it is written (key decisions):
- Every rank that holds rows writes them itself, into its own part (`parts/<writer>/`): after
  training a rollout, each data-parallel rank's writer (the rank holding its old and reference
  log-probs) appends the rows that rank trained, which it already holds. No rank receives
  another rank's rows; the only traffic is two scalar all-reduces (`write_rollout`).
- Rows are ragged: a part holds per-row arrays [n] and per-token arrays flat over its rows'
  positions (prompt + completion - 1 each, routing ids included), nothing padded to S.
- A part is append-only with one writer, its per-row and per-token arrays written first and
  its `step` last, so a crash mid-append leaves rows beyond `step`'s length that readers
  ignore and the next append overwrites. A rollout becomes visible when rank 0, after every
  writer has finished, appends it to the commit log (`rollouts/`): readers see committed
  rollouts only, in commit order, rows in rollout order. The table a reader gets is the one
  the former single writer produced, padding included (tokens and labels hold the pad id up
  to the rollout's longest row, zeros after).
- `read_experience` also reads stores of the former layout (format 1: dense [rows, S] arrays
  at the top, written by rank 0 alone), e.g. recorded rollouts.

Shapes: R rows of a rollout, P positions of a part's rows, S = data.seq_length, W the longest
row of a rollout.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import zarr

FORMAT = 2
"""This layout (parts and a commit log); format 1 was one dense table written by rank 0."""

PER_ROW: dict[str, str] = {
    "rollout": "int32", "prompt_index": "int32", "prompt_len": "int32",
    "completion_len": "int32", "reward": "float32", "advantage": "float32",
}
"""Per-row columns every store holds (reward_<component> columns are added per run)."""
PER_TOKEN: dict[str, str] = {
    "tokens": "int32", "labels": "int32", "loss_mask": "bool", "old_logp": "float32",
    "ref_logp": "float32", "sampler_logp": "float32",
}
"""Per-token columns every store holds (routing is added with grpo.routing_replay=r3)."""
PAD_FILLED = ("tokens", "labels")
"""Per-token columns whose padding up to the rollout's longest row is the pad id."""
ROWS_PER_CHUNK = 4096
POSITIONS_PER_CHUNK = 1 << 16


def _array(group: zarr.Group, name: str) -> zarr.Array:
    array = group[name]
    assert isinstance(array, zarr.Array), f"{name} is not an array"
    return array


def _group(group: zarr.Group, name: str) -> zarr.Group:
    child = group[name]
    assert isinstance(child, zarr.Group), f"{name} is not a group"
    return child


def positions_of(prompt_len: np.ndarray, completion_len: np.ndarray) -> np.ndarray:
    """Positions each row uses in the trainer's layout: prompt + completion - 1, at least 1."""
    return np.maximum(prompt_len.astype(np.int64) + completion_len.astype(np.int64) - 1, 1)


class ExperienceStore:
    """The run's store: its schema, commit log and readers (rank 0 creates and truncates it,
    commits rollouts and answers `len`); every writer appends to its own part."""

    def __init__(self, path: str | os.PathLike[str], seq_length: int,
                 reward_components: list[str], routing_shape: tuple[int, int] | None = None,
                 pad_id: int = 0) -> None:
        """Open the store, creating it when absent.

        Args:
            seq_length: S, the width of the table readers see.
            reward_components: names of the reward_<name> columns.
            routing_shape: (moe_layers, top_k) of the `routing` column, None for none.
            pad_id: what tokens and labels hold on padding in the table readers see.

        Raises:
            ValueError: naming the path for a store of the former layout or of another
                schema (seq_length, reward components, routing shape): use a new run directory.
        """
        self.path = Path(path)
        self.attrs: dict[str, Any] = {
            "format": FORMAT, "seq_length": seq_length, "components": list(reward_components),
            "routing_shape": list(routing_shape) if routing_shape else None, "pad_id": pad_id}
        group = zarr.open_group(str(self.path), mode="a")
        if "step" in group:
            raise ValueError(f"{self.path} holds a store of the former layout (format 1, one "
                             "dense table): use a new run directory")
        if "rollouts" not in group:
            group.attrs.update(dict(self.attrs))
            log = group.create_group("rollouts")
            for name in ("index", "step", "rows"):
                log.create_array(name, shape=(0,), chunks=(ROWS_PER_CHUNK,), dtype="int32")
            group.create_group("parts")
        self._check(dict(group.attrs))
        self.group = group

    def _check(self, saved: dict[str, Any]) -> None:
        if saved.get("format") != FORMAT:
            raise ValueError(f"{self.path}: experience store format {saved.get('format')}, "
                             f"this version writes {FORMAT}: use a new run directory")
        for key, mine in self.attrs.items():
            if saved.get(key) != mine:
                what = {"seq_length": "data.seq_length", "components": "reward components",
                        "routing_shape": "(MoE layers, top_k) of grpo.routing_replay=r3",
                        "pad_id": "the tokenizer's pad id"}[key]
                raise ValueError(f"{self.path} holds rows with {key}={saved.get(key)}, this run's "
                                 f"are {mine} ({what}): use a new run directory")

    def _log(self) -> dict[str, np.ndarray]:
        return _commit_log(self.group)

    def __len__(self) -> int:
        """Rows of all committed rollouts."""
        return int(self._log()["rows"].sum())

    def commit(self, rollout: int, step: int, rows: int) -> None:
        """Make a rollout visible: every writer has appended its rows (rank 0 only)."""
        log = _group(self.group, "rollouts")
        for name, value in (("index", rollout), ("rows", rows), ("step", step)):  # step last
            _array(log, name).append(np.asarray([value], dtype="int32"))

    def truncate(self, rows: int) -> None:
        """Keep the first `rows` committed rows (a rollout boundary) and drop every part's
        rows of later or uncommitted rollouts: a resumed run samples them again (rank 0,
        before any writer appends).

        Raises:
            ValueError: if `rows` is not a rollout boundary of the commit log.
        """
        log = self._log()
        bounds = np.concatenate([[0], np.cumsum(log["rows"])])
        kept = np.flatnonzero(bounds == rows)
        if not len(kept):
            raise ValueError(f"{self.path}: {rows} rows is not a rollout boundary of the "
                             f"committed {bounds.tolist()}")
        committed = int(kept[0])
        for name in ("step", "index", "rows"):  # step first: the entry stops being committed
            _array(_group(self.group, "rollouts"), name).resize((committed,))
        keep = set(log["index"][:committed].tolist())
        parts = _group(self.group, "parts")
        for name in parts.group_keys():
            part = _Part(_group(parts, name))
            rollout = part.rollouts()
            part.resize(next((i for i, r in enumerate(rollout) if r not in keep), len(rollout)))

    def read(self, columns: list[str] | None = None,
             step: int | None = None) -> dict[str, np.ndarray]:
        """Columns of all committed rows (or of one optimizer step's rollout), per-token ones
        as [rows, S, ...]."""
        return _read(self.group, columns, step)


class _Part:
    """One writer's rows: per-row arrays [n] and per-token arrays [P, ...]."""

    def __init__(self, group: zarr.Group) -> None:
        self.group = group

    def array(self, name: str) -> zarr.Array:
        return _array(self.group, name)

    def __len__(self) -> int:
        """Complete rows (those whose step was written)."""
        return int(self.array("step").shape[0])

    def rollouts(self) -> np.ndarray:
        return np.asarray(self.array("rollout")[:len(self)])

    def positions(self, rows: int) -> np.ndarray:
        """Positions of each of the first `rows` rows."""
        return positions_of(np.asarray(self.array("prompt_len")[:rows]),
                            np.asarray(self.array("completion_len")[:rows]))

    def resize(self, rows: int) -> None:
        """Keep the first `rows` rows (fewer than the complete ones)."""
        total = int(self.positions(rows).sum())
        for name in self.group.array_keys():
            array = self.array(name)
            per_token = name in PER_TOKEN or name == "routing"
            size = total if per_token else rows
            if array.shape[0] != size:
                array.resize((size, *array.shape[1:]))


def ragged_rows(length_R: torch.Tensor,
                per_token: Mapping[str, torch.Tensor | Sequence[torch.Tensor]],
                per_row: Mapping[str, torch.Tensor | Sequence[int] | int]
                ) -> dict[str, np.ndarray]:
    """One writer's rows as the columns of its part: per-token values cut to each row's
    positions and laid back to back, per-row values as they are.

    Args:
        length_R: positions each row uses.
        per_token: [R, W, ...] tensors (each row's first length_R[r] positions are kept), or
            one tensor of exactly length_R[r] positions per row.
        per_row: [R] values, or one value for every row.
    """
    rows = len(length_R)
    valid_RW: torch.Tensor | None = None
    out: dict[str, np.ndarray] = {}
    for name, values in per_token.items():
        if isinstance(values, torch.Tensor):
            if valid_RW is None:
                valid_RW = torch.arange(values.shape[1]).unsqueeze(0) < length_R.unsqueeze(1)
            flat = values[valid_RW]
        else:
            assert [len(v) for v in values] == length_R.tolist(), f"{name}: ragged lengths"
            flat = torch.cat(list(values)) if rows else torch.zeros(0)
        out[name] = flat.detach().cpu().numpy()
    for name, value in per_row.items():
        if isinstance(value, int):
            out[name] = np.full(rows, value)
        elif isinstance(value, torch.Tensor):
            out[name] = value.detach().cpu().numpy()
        else:
            out[name] = np.asarray(value)
    return out


def write_rollout(path: str | os.PathLike[str], coordinator: ExperienceStore | None, *,
                  writer: str, part: Mapping[str, np.ndarray] | None, rollout: int, step: int,
                  rows: int) -> dict[str, float]:
    """Store one rollout: every rank with rows appends them to its own part (`part`, from
    `ragged_rows`; None on ranks that write nothing), then rank 0 (`coordinator`) commits
    the rollout. Collective; the only traffic is two all-reduces of one number each.

    Args:
        writer: this rank's part name (unique per writing rank).
        rollout: the rollout's index; step: the optimizer steps of the policy that sampled it.
        rows: the rollout's rows over all ranks (checked against what was written).

    Returns:
        `time/store_s`: the longest any rank took to write its part (every rank gets it).

    Raises:
        KeyError, ValueError: a missing column or one of the wrong shape, naming it.
    """
    start = time.perf_counter()
    written = 0
    if part is not None:
        written = _append(Path(path), writer, step, part)
    seconds = time.perf_counter() - start
    total = torch.tensor([float(written)], dtype=torch.float64)
    slowest = torch.tensor([seconds], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = (torch.device("cuda", torch.cuda.current_device())
                  if dist.get_backend() == "nccl" else torch.device("cpu"))
        total, slowest = total.to(device), slowest.to(device)
        dist.all_reduce(total)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    if coordinator is not None:
        if int(total.item()) != rows:  # a row written twice or not at all
            raise AssertionError(f"rollout {rollout}: {int(total.item())} rows written, "
                                 f"expected {rows}")
        coordinator.commit(rollout, step, rows)
    return {"time/store_s": float(slowest.item())}


def _append(path: Path, writer: str, step: int, part: Mapping[str, np.ndarray]) -> int:
    """Append one writer's rows to its part (created on first use); returns the row count."""
    root = zarr.open_group(str(path), mode="r+")
    attrs: dict[str, Any] = dict(root.attrs)
    schema = _schema(attrs)
    missing = sorted(set(schema) - set(part))
    if missing:
        raise KeyError(f"experience columns missing: {missing}")
    rows = len(part["rollout"])
    positions = int(positions_of(part["prompt_len"], part["completion_len"]).sum())
    parts = _group(root, "parts")
    if writer not in parts:
        group = parts.create_group(writer)
        for name, (dtype, shape) in schema.items():
            chunks = ((POSITIONS_PER_CHUNK // max(int(np.prod(shape)), 1), *shape)
                      if name in PER_TOKEN or name == "routing" else (ROWS_PER_CHUNK,))
            group.create_array(name, shape=(0, *shape), chunks=chunks, dtype=dtype)
        group.create_array("step", shape=(0,), chunks=(ROWS_PER_CHUNK,), dtype="int32")
    store = _Part(_group(parts, writer))
    complete = len(store)
    # per-row arrays are appended before per-token ones and `step` last: all of them as long
    # as `step` means no append was cut short (the common case needs no read)
    if any(store.array(name).shape[0] != complete
           for name in schema if not (name in PER_TOKEN or name == "routing")):
        store.resize(complete)  # rows a crashed append left behind
    for name, (dtype, shape) in schema.items():
        value = np.asarray(part[name]).astype(dtype)
        per_token = name in PER_TOKEN or name == "routing"
        expected = ((positions if per_token else rows), *shape)
        if value.shape != expected:
            raise ValueError(f"experience column {name}: shape {value.shape}, expected "
                             f"{expected}")
        store.array(name).append(value)
    store.array("step").append(np.full(rows, step, dtype="int32"))
    return rows


def _commit_log(root: zarr.Group) -> dict[str, np.ndarray]:
    """Rollout index, sampling step and row count of every committed rollout, in commit
    order (`step` is written last: an entry is committed once it has one)."""
    log = _group(root, "rollouts")
    committed = int(_array(log, "step").shape[0])
    return {name: np.asarray(_array(log, name)[:committed]) for name in ("index", "step", "rows")}


def _schema(attrs: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape of one row or position after the first axis) of a part's columns
    (`step` aside)."""
    schema = {"row": ("int32", ())}
    schema.update({name: (dtype, ()) for name, dtype in PER_ROW.items()})
    schema.update({f"reward_{c}": ("float32", ()) for c in attrs["components"]})
    schema.update({name: (dtype, ()) for name, dtype in PER_TOKEN.items()})
    if attrs.get("routing_shape"):
        schema["routing"] = ("int16", tuple(attrs["routing_shape"]))
    return {name: (dtype, tuple(shape)) for name, (dtype, shape) in schema.items()}


def _read(root: zarr.Group, columns: list[str] | None, step: int | None
          ) -> dict[str, np.ndarray]:
    """The table of a format-2 store (see the module docstring)."""
    attrs: dict[str, Any] = dict(root.attrs)
    schema = _schema(attrs)
    names = columns or [*[n for n in schema if n != "row"], "step"]
    unknown = [n for n in names if n not in schema and n != "step"]
    if unknown:
        raise KeyError(f"{root.store}: no column(s) {unknown}")
    log = _commit_log(root)
    order = {int(r): i for i, r in enumerate(log["index"])}
    holder = _group(root, "parts")
    parts = [_Part(_group(holder, k)) for k in sorted(holder.group_keys())]
    # every part's committed rows, keyed (commit position, row) for the table's order
    keys, where = [], []
    for p, part in enumerate(parts):
        n = len(part)
        rollout, row = part.rollouts(), np.asarray(part.array("row")[:n])
        for i in range(n):
            if int(rollout[i]) in order:
                keys.append((order[int(rollout[i])], int(row[i])))
                where.append((p, i))
    ranked = sorted(range(len(keys)), key=keys.__getitem__)
    if step is not None:
        steps = log["step"]
        ranked = [j for j in ranked if steps[keys[j][0]] == step]
    out: dict[str, np.ndarray] = {}
    seq = int(attrs["seq_length"])
    # per part: its rows' positions and their offsets into its flat arrays
    lengths = [part.positions(len(part)) for part in parts]
    offsets = [np.concatenate([[0], np.cumsum(n)]) for n in lengths]
    widest: dict[int, int] = {}  # per rollout: its longest row (the former padding width)
    for j in range(len(keys)):
        p, i = where[j]
        widest[keys[j][0]] = max(widest.get(keys[j][0], 1), int(lengths[p][i]))
    for name in names:
        if name == "step":
            out[name] = np.asarray([log["step"][keys[j][0]] for j in ranked], dtype="int32")
            continue
        dtype, shape = schema[name]
        per_token = name in PER_TOKEN or name == "routing"
        data = [np.asarray(part.array(name)[:int(offsets[p][-1]) if per_token else len(part)])
                for p, part in enumerate(parts)]
        if not per_token:
            out[name] = np.asarray([data[where[j][0]][where[j][1]] for j in ranked],
                                   dtype=dtype).reshape(len(ranked))
            continue
        table = np.zeros((len(ranked), seq, *shape), dtype=dtype)
        fill = int(attrs["pad_id"]) if name in PAD_FILLED else 0
        for k, j in enumerate(ranked):
            p, i = where[j]
            start, n = int(offsets[p][i]), int(lengths[p][i])
            table[k, :n] = data[p][start:start + n]
            table[k, n:widest[keys[j][0]]] = fill
        out[name] = table
    return out


def read_experience(path: str | os.PathLike[str],
                    columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """Columns of every committed row of an experience store, opened read-only (a recorded
    store, e.g. carried to another machine, is never modified); per-token columns as
    [rows, S, ...]. Reads the former dense layout too.

    Raises:
        FileNotFoundError: naming the path when there is no store.
        KeyError: naming a column the store does not hold.
    """
    if not (Path(path) / "zarr.json").is_file():
        raise FileNotFoundError(f"{path}: no experience store (zarr.json missing)")
    group = zarr.open_group(str(path), mode="r")
    if "step" not in group:
        try:
            return _read(group, columns, None)
        except KeyError as err:
            raise KeyError(f"{path}: {err.args[0].split(': ', 1)[-1]}") from None
    rows = int(_array(group, "step").shape[0])
    names = columns or sorted(group.array_keys())
    missing = [n for n in names if n not in group]
    if missing:
        raise KeyError(f"{path}: no column(s) {missing}")
    return {name: np.asarray(_array(group, name)[:rows]) for name in names}
