"""The experience store: every rollout's sequences, log-probs, rewards and advantages, in zarr.

Layer L1. One zarr group per run (`<run_dir>/experience.zarr`), one row per sampled output,
appended after every rollout. Per-token arrays are [rows, S] in the trainer's label layout
(model input `tokens`, next ids `labels`; position t holds the log-prob of token t + 1; zeros
outside the completion), so a row can be fed back to the trainer as is
(`grpo.rollout_batch.stored_rollout`: the GPU benchmark trains on a recorded rollout),
rejection sampling reads the correct completions back from here, and analysis tools read any
column without loading the rest.

`step` is the number of optimizer steps of the policy that sampled the row. With MoE routing
replay from the engine (grpo.routing_replay=r3) a `routing` column holds, per row and model
input position, the experts the engine routed it to: int16 [rows, S, moe_layers, top_k].

Appends are ordered: the per-row arrays are written first and `step` last, so a crash
mid-append leaves rows that `read` ignores (it reads only up to the length of `step`), and
the next append overwrites them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import zarr

# name -> (dtype, per-token?)
COLUMNS: dict[str, tuple[str, bool]] = {
    "rollout": ("int32", False),
    "prompt_index": ("int32", False),
    "prompt_len": ("int32", False),
    "completion_len": ("int32", False),
    "tokens": ("int32", True),
    "labels": ("int32", True),
    "loss_mask": ("bool", True),
    "old_logp": ("float32", True),
    "ref_logp": ("float32", True),
    "sampler_logp": ("float32", True),
    "reward": ("float32", False),
    "advantage": ("float32", False),
}
ROWS_PER_CHUNK = 256


class ExperienceStore:
    """Append-only table of sampled outputs (rank 0 writes)."""

    def __init__(self, path: str | os.PathLike[str], seq_length: int,
                 reward_components: list[str],
                 routing_shape: tuple[int, int] | None = None) -> None:
        """Args:
            routing_shape: (moe_layers, top_k) of the `routing` column, None for none.
        """
        self.path = Path(path)
        self.seq_length = seq_length
        self.components = [f"reward_{name}" for name in reward_components]
        self.routing_shape = routing_shape
        self.group = zarr.open_group(str(self.path), mode="a")
        rows = int(self._array("step").shape[0]) if "step" in self.group else 0
        for name, (dtype, per_token) in self._schema().items():
            if name not in self.group and rows:
                raise ValueError(f"{self.path} holds {rows} rows without the column {name!r} "
                                 "(written by another version or reward set): use a new run "
                                 "directory")
            if name not in self.group:
                shape = self._row_shape(name)
                chunks = (ROWS_PER_CHUNK, *shape) if per_token else (ROWS_PER_CHUNK * 16,)
                self.group.create_array(name, shape=(0, *shape), chunks=chunks, dtype=dtype)
            elif per_token and self._array(name).shape[1:] != self._row_shape(name):
                moe = f", (MoE layers, top_k)={routing_shape}" if name == "routing" else ""
                raise ValueError(f"{self.path}/{name} holds rows of shape "
                                 f"{self._array(name).shape[1:]}, this run's are "
                                 f"{self._row_shape(name)} (data.seq_length={seq_length}{moe}): "
                                 "use a new run directory")
        if "step" not in self.group:
            self.group.create_array("step", shape=(0,), chunks=(ROWS_PER_CHUNK * 16,),
                                    dtype="int32")

    def _array(self, name: str) -> zarr.Array:
        array = self.group[name]
        assert isinstance(array, zarr.Array), f"{self.path}/{name} is not an array"
        return array

    def _schema(self) -> dict[str, tuple[str, bool]]:
        routing = {"routing": ("int16", True)} if self.routing_shape is not None else {}
        return {**COLUMNS, **{name: ("float32", False) for name in self.components}, **routing}

    def _row_shape(self, name: str) -> tuple[int, ...]:
        """One row's shape in column `name`."""
        if name == "routing" and self.routing_shape is not None:
            return (self.seq_length, *self.routing_shape)
        return (self.seq_length,) if self._schema()[name][1] else ()

    def __len__(self) -> int:
        return int(self._array("step").shape[0])

    def truncate(self, rows: int) -> None:
        """Drop rows beyond `rows` (a resumed run re-samples what came after its checkpoint)."""
        for name in (*self._schema(), "step"):
            array = self._array(name)
            if array.shape[0] > rows:
                array.resize((rows, *array.shape[1:]))

    def append(self, step: int, columns: dict[str, torch.Tensor]) -> None:
        """Append one rollout's rows; `columns` holds every schema column ([R], [R, S], or
        for routing [R, S, moe_layers, top_k])."""
        missing = set(self._schema()) - set(columns)
        if missing:
            raise KeyError(f"experience columns missing: {sorted(missing)}")
        rows = int(columns["reward"].shape[0])
        self.truncate(len(self))  # rows a crashed append left behind
        for name, (dtype, _) in self._schema().items():
            value = columns[name].detach().cpu().numpy().astype(dtype)
            expected = (rows, *self._row_shape(name))
            if value.shape != expected:
                raise ValueError(f"experience column {name}: shape {value.shape}, expected "
                                 f"{expected}")
            self._array(name).append(value)
        self._array("step").append(np.full(rows, step, dtype="int32"))

    def read(self, columns: list[str] | None = None,
             step: int | None = None) -> dict[str, np.ndarray]:
        """Columns of all complete rows (or of one optimizer step's rollout)."""
        rows = len(self)
        steps = np.asarray(self._array("step")[:rows])
        select = slice(None) if step is None else np.flatnonzero(steps == step)
        names = columns or [*self._schema(), "step"]
        return {name: np.asarray(self._array(name)[:rows])[select] for name in names}


def read_experience(path: str | os.PathLike[str],
                    columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """Columns of every complete row of an experience store, opened read-only (a recorded
    store, e.g. carried to another machine, is never modified).

    Raises:
        FileNotFoundError: naming the path when there is no store.
        KeyError: naming a column the store does not hold.
    """
    if not (Path(path) / "zarr.json").is_file():
        raise FileNotFoundError(f"{path}: no experience store (zarr.json missing)")
    group = zarr.open_group(str(path), mode="r")
    rows = int(group["step"].shape[0])  # type: ignore[union-attr]
    names = columns or sorted(group.array_keys())
    missing = [n for n in names if n not in group]
    if missing:
        raise KeyError(f"{path}: no column(s) {missing}")
    return {name: np.asarray(group[name][:rows]) for name in names}  # type: ignore[index]
