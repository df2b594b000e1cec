"""Read and write Hugging Face safetensors checkpoints one tensor at a time.

Layer L1 (torch only). The reader parses every shard's header once (names, dtypes, shapes,
byte ranges), checks that each byte range lies inside its file, so a truncated download is
reported with the name of the first tensor it cut, and then reads single tensors with
positional reads (`os.preadv`) into fresh buffers. It never memory-maps a shard: the pages
of a mapped 5 GB shard count as this process's resident memory once touched, which would
defeat the conversion's memory budget.

The writer is given the complete list of (name, dtype, shape) first, so each shard's header
(with all its offsets) can be written before its data; tensors are then pushed in that order
and written straight to disk. `model.safetensors.index.json` is written last.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and its byte range in the file."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    """Absolute byte offset of the data in the file."""
    nbytes: int


def _read_header(file: Path) -> tuple[dict[str, dict], int]:
    """(header entries, absolute offset of the data buffer) of one safetensors file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{file}: truncated or not a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > _HEADER_LIMIT or 8 + header_len > size:
            raise ValueError(f"{file}: truncated or not a safetensors file (header of "
                             f"{header_len} bytes, file of {size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{file}: corrupt safetensors header: {err}") from err
    header.pop("__metadata__", None)
    return header, 8 + header_len


def _parse_file(file: Path) -> list[TensorInfo]:
    header, data_start = _read_header(file)
    size = file.stat().st_size
    infos = []
    for name, entry in header.items():
        dtype = DTYPES.get(str(entry.get("dtype")))
        if dtype is None:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise ValueError(f"{file}: tensor {name!r}: byte range {begin}..{end} does not hold "
                             f"shape {list(shape)} of {entry['dtype']}")
        if data_start + end > size:
            raise ValueError(f"{file} is truncated: tensor {name!r} needs bytes up to "
                             f"{data_start + end} but the file has {size}")
        infos.append(TensorInfo(name, file, dtype, shape, data_start + begin, nbytes))
    return infos


class SafetensorsCheckpoint:
    """Lazy view of a Hugging Face checkpoint directory (sharded with an index, or one file).

    Raises:
        FileNotFoundError: no safetensors weights in the directory.
        ValueError: a truncated or corrupt shard, or an index naming a tensor its shard
            lacks (each message names the file and the tensor).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{index}: not a safetensors index ({err})") from err
            files = sorted({self.directory / f for f in weight_map.values()})
        elif (self.directory / SINGLE_FILE).is_file():
            weight_map, files = {}, [self.directory / SINGLE_FILE]
        else:
            files, weight_map = sorted(self.directory.glob("*.safetensors")), {}
            if not files:
                raise FileNotFoundError(f"{self.directory}: no {INDEX_FILE}, {SINGLE_FILE} or "
                                        "*.safetensors files")
        self._infos: dict[str, TensorInfo] = {}
        for file in files:
            if not file.is_file():
                missing = sorted(n for n, f in weight_map.items() if self.directory / f == file)
                raise ValueError(f"{index}: shard {file.name} (holding {missing[0]!r} and "
                                 f"{len(missing) - 1} more) does not exist")
            for info in _parse_file(file):
                if info.name in self._infos:
                    raise ValueError(f"tensor {info.name!r} is stored twice: in "
                                     f"{self._infos[info.name].file.name} and {file.name}")
                self._infos[info.name] = info
        for name, file_name in weight_map.items():
            found = self._infos.get(name)
            if found is None or found.file.name != file_name:
                raise ValueError(f"{index} maps tensor {name!r} to {file_name}, which does not "
                                 "hold it")

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in {self.directory}") from None

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name`, freshly read from disk (a new, writable CPU tensor)."""
        info = self.info(name)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())  # type: ignore[arg-type]
        fd = os.open(info.file, os.O_RDONLY)
        try:
            done = 0
            while done < info.nbytes:
                n = os.preadv(fd, [view[done:]], info.start + done)
                if n <= 0:
                    raise ValueError(f"{info.file} is truncated: short read of tensor {name!r}")
                done += n
        finally:
            os.close(fd)
        if info.dtype == torch.bool:
            return buf.view(torch.bool).reshape(info.shape)
        return buf.view(info.dtype).reshape(info.shape)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A tensor the writer will receive: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _shard_plan(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split the tensors, in order, into shards of at most max_shard_bytes (a tensor larger
    than that gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header_bytes(specs: Sequence[TensorSpec]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


class ShardedSafetensorsWriter:
    """Write tensors pushed in a fixed order into `model-0000i-of-0000N.safetensors` shards
    plus `model.safetensors.index.json`, holding at most one tensor at a time.

    Usage: `w = ShardedSafetensorsWriter(dir, specs, max_shard_bytes)`, then `w.write(name,
    tensor)` once per spec in order, then `w.close()`.
    """

    def __init__(self, directory: str | os.PathLike[str], specs: Iterable[TensorSpec],
                 max_shard_bytes: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._specs = list(specs)
        names = [s.name for s in self._specs]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise AssertionError(f"tensor {dup!r} planned twice")
        self._shards = _shard_plan(self._specs, max_shard_bytes)
        n = len(self._shards)
        self._files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._weight_map = {s.name: self._files[i] for i, shard in enumerate(self._shards)
                            for s in shard}
        self._next = 0  # position in self._specs
        self._shard = -1
        self._stream: BinaryIO | None = None
        self._left_in_shard = 0

    def _open_next_shard(self) -> None:
        self._shard += 1
        shard = self._shards[self._shard]
        self._stream = open(self.directory / self._files[self._shard], "wb")  # noqa: SIM115
        self._stream.write(_header_bytes(shard))
        self._left_in_shard = len(shard)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; it must be the next planned one, with its dtype and shape."""
        if self._next >= len(self._specs):
            raise AssertionError(f"tensor {name!r} was not planned")
        spec = self._specs[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise AssertionError(f"expected {spec} next, got {name!r} {tensor.dtype} "
                                 f"{tuple(tensor.shape)}")
        if self._left_in_shard == 0:
            self._close_stream()
            self._open_next_shard()
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        assert self._stream is not None
        self._stream.write(memoryview(data.numpy()))  # type: ignore[arg-type]
        self._left_in_shard -= 1
        self._next += 1

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.flush()
            os.fsync(self._stream.fileno())
            self._stream.close()
            self._stream = None

    def close(self) -> None:
        """Finish the last shard and write the index (every planned tensor must be written)."""
        if self._next != len(self._specs):
            raise AssertionError(f"only {self._next} of {len(self._specs)} tensors written; "
                                 f"next expected: {self._specs[self._next].name!r}")
        if not self._specs:
            raise AssertionError("no tensors to write")
        self._close_stream()
        index = {"metadata": {"total_size": sum(s.nbytes for s in self._specs)},
                 "weight_map": dict(sorted(self._weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        """Close an open shard after a failure (the caller removes the directory)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
