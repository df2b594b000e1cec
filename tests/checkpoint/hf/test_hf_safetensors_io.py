"""The streaming safetensors reader and writer: round trips, the index, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_r1.checkpoint.hf.safetensors_io import (
    INDEX_FILE,
    SafetensorsCheckpoint,
    ShardedSafetensorsWriter,
    TensorSpec,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "c.weight": torch.randn(16, 16, generator=g).to(torch.float8_e4m3fn),
        "c.weight_scale_inv": torch.rand(1, 1, generator=g),
        "d.ids": torch.arange(11, dtype=torch.int64),
        "e.mask": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(3.5),
    }


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _write(directory: Path, tensors: dict[str, torch.Tensor], max_shard: int) -> None:
    writer = ShardedSafetensorsWriter(
        directory, [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], max_shard)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()


def test_hf_writer_shards_and_indexes_and_safetensors_reads_them(tmp_path: Path) -> None:
    tensors = _tensors()
    _write(tmp_path, tensors, max_shard=1024)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in tensors.values())
    for name, tensor in tensors.items():  # the reference implementation reads our files
        with safe_open(tmp_path / index["weight_map"][name], "pt") as f:
            got = f.get_tensor(name)
        assert got.dtype == tensor.dtype and torch.equal(_bytes(got), _bytes(tensor))


def test_hf_reader_streams_our_shards_and_safetensors_single_files(tmp_path: Path) -> None:
    tensors = _tensors()
    _write(tmp_path / "sharded", tensors, max_shard=1024)
    (tmp_path / "single").mkdir()
    save_file(tensors, tmp_path / "single" / "model.safetensors")
    for directory in ("sharded", "single"):
        ckpt = SafetensorsCheckpoint(tmp_path / directory)
        assert sorted(ckpt.names()) == sorted(tensors)
        for name, tensor in tensors.items():
            got = ckpt.read(name)
            assert got.dtype == tensor.dtype and got.shape == tensor.shape
            assert torch.equal(_bytes(got), _bytes(tensor))


def test_hf_reader_names_the_tensor_a_truncated_file_cuts(tmp_path: Path) -> None:
    tensors = {"first": torch.zeros(100), "second": torch.ones(100), "third": torch.ones(100)}
    save_file(tensors, tmp_path / "model.safetensors")
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-500])  # cuts into the last two tensors (400 bytes each)
    with pytest.raises(ValueError, match=r"model.safetensors is truncated: tensor '(second|third)' "
                                         r"needs bytes up to \d+ but the file has \d+"):
        SafetensorsCheckpoint(tmp_path)
    file.write_bytes(data[:20])
    with pytest.raises(ValueError, match=r"truncated or not a safetensors file \(header of"):
        SafetensorsCheckpoint(tmp_path)


def test_hf_reader_checks_the_index_against_the_shards(tmp_path: Path) -> None:
    _write(tmp_path, {"x": torch.zeros(3), "y": torch.zeros(4)}, max_shard=1 << 20)
    index_file = tmp_path / INDEX_FILE
    index = json.loads(index_file.read_text())
    index["weight_map"]["z"] = index["weight_map"]["x"]
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"maps tensor 'z' to model-00001-of-00001.safetensors, "
                                         "which does not hold it"):
        SafetensorsCheckpoint(tmp_path)
    index["weight_map"] = {"x": "model-00002-of-00002.safetensors"}
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"shard model-00002-of-00002.safetensors \(holding 'x' "
                                         r"and 0 more\) does not exist"):
        SafetensorsCheckpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors\.index\.json"):
        SafetensorsCheckpoint(tmp_path / "nothing_here")


def test_hf_writer_refuses_out_of_plan_tensors(tmp_path: Path) -> None:
    writer = ShardedSafetensorsWriter(tmp_path, [TensorSpec("a", torch.float32, (2,))], 1 << 20)
    with pytest.raises(AssertionError, match=r"expected .*'a'.* got 'b'"):
        writer.write("b", torch.zeros(2))
    with pytest.raises(AssertionError, match=r"got 'a' torch.float32 \(3,\)"):
        writer.write("a", torch.zeros(3))
    with pytest.raises(AssertionError, match="only 0 of 1 tensors written"):
        writer.close()
    writer.abort()
