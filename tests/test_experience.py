"""The zarr experience store: append, read back, per-step selection, crash-safe appends."""

import numpy as np
import pytest
import torch

from megatron_r1.experience import ExperienceStore, read_experience


def rollout(rows: int, seq: int, value: float) -> dict:
    columns = {
        "rollout": torch.zeros(rows), "prompt_index": torch.arange(rows),
        "prompt_len": torch.full((rows,), 3), "completion_len": torch.full((rows,), 2),
        "tokens": torch.arange(rows * seq).view(rows, seq),
        "labels": torch.arange(rows * seq).view(rows, seq) + 1,
        "loss_mask": torch.ones(rows, seq, dtype=torch.bool),
        "old_logp": torch.full((rows, seq), value), "ref_logp": torch.full((rows, seq), value),
        "sampler_logp": torch.full((rows, seq), value), "reward": torch.full((rows,), value),
        "advantage": torch.zeros(rows), "reward_accuracy": torch.ones(rows),
    }
    return columns


def test_append_and_read_back(tmp_path):
    store = ExperienceStore(tmp_path / "x.zarr", 5, ["accuracy"])
    store.append(2, rollout(4, 5, -1.0))
    store.append(4, rollout(3, 5, -2.0))
    again = ExperienceStore(tmp_path / "x.zarr", 5, ["accuracy"])  # reopened, appendable
    assert len(again) == 7
    rows = again.read(step=4)
    assert rows["reward"].tolist() == [-2.0] * 3 and rows["tokens"].shape == (3, 5)
    assert again.read(["step"])["step"].tolist() == [2] * 4 + [4] * 3
    assert np.asarray(again.read(["reward_accuracy"])["reward_accuracy"]).sum() == 7


def test_truncate_drops_rows_after_a_checkpoint(tmp_path):
    store = ExperienceStore(tmp_path / "x.zarr", 5, ["accuracy"])
    store.append(2, rollout(4, 5, -1.0))
    store.append(4, rollout(4, 5, -2.0))
    store.truncate(4)
    assert len(store) == 4 and store.read()["reward"].tolist() == [-1.0] * 4


def test_bad_columns_are_named(tmp_path):
    store = ExperienceStore(tmp_path / "x.zarr", 5, ["accuracy"])
    bad = rollout(2, 5, 0.0)
    del bad["ref_logp"]
    with pytest.raises(KeyError, match="ref_logp"):
        store.append(0, bad)
    bad = rollout(2, 4, 0.0)
    with pytest.raises(ValueError, match=r"experience column tokens: shape \(2, 4\)"):
        store.append(0, bad)
    with pytest.raises(ValueError, match=r"data\.seq_length=6"):
        ExperienceStore(tmp_path / "x.zarr", 6, ["accuracy"])


def test_read_only_access_and_a_store_of_another_schema(tmp_path):
    store = ExperienceStore(tmp_path / "x.zarr", 5, ["accuracy"])
    store.append(2, rollout(4, 5, -1.0))
    rows = read_experience(tmp_path / "x.zarr", ["labels", "reward"])
    assert rows["labels"].shape == (4, 5) and rows["reward"].tolist() == [-1.0] * 4
    with pytest.raises(KeyError, match="no column"):
        read_experience(tmp_path / "x.zarr", ["values"])
    with pytest.raises(FileNotFoundError, match="no experience store"):
        read_experience(tmp_path / "missing.zarr")
    # a reward set with another component: the store cannot grow a column for old rows
    with pytest.raises(ValueError, match="without the column 'reward_format'"):
        ExperienceStore(tmp_path / "x.zarr", 5, ["accuracy", "format"])


def test_routing_column(tmp_path):
    """With routing replay from the engine, each row's experts per position and MoE layer are
    stored (int16 [rows, S, layers, top_k]); a store of another shape is refused by name."""
    store = ExperienceStore(tmp_path / "x.zarr", 5, ["accuracy"], routing_shape=(3, 2))
    ids = torch.randint(0, 8, (4, 5, 3, 2), dtype=torch.int16)
    store.append(1, {**rollout(4, 5, 0.0), "routing": ids})
    np.testing.assert_array_equal(read_experience(tmp_path / "x.zarr", ["routing"])["routing"],
                                  ids.numpy())
    with pytest.raises(KeyError, match="routing"):
        store.append(2, rollout(4, 5, 0.0))
    with pytest.raises(ValueError, match=r"routing holds rows of shape \(5, 3, 2\).*"
                                         r"\(MoE layers, top_k\)=\(4, 2\)"):
        ExperienceStore(tmp_path / "x.zarr", 5, ["accuracy"], routing_shape=(4, 2))
