"""The zarr experience store: ragged parts written by their own ranks read back as the former
one-writer table; commits, crash-safe appends, truncation, schema checks; world size 4."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron_r1.experience import ExperienceStore, read_experience, write_rollout

from experience_worker import PAD, SEQ, part, rollout
from procs import REPO, run_script


def store(tmp_path: Path, **kwargs) -> ExperienceStore:
    return ExperienceStore(tmp_path / "x.zarr", SEQ, ["accuracy"], pad_id=PAD, **kwargs)


def write(s: ExperienceStore, r: dict, index: int, step: int, split: list[list[int]],
          routing: bool = False) -> None:
    for w, rows in enumerate(split):
        write_rollout(s.path, None, writer=f"rank{w}", part=part(r, rows, index, routing),
                      rollout=index, step=step, rows=r["rows"])
    s.commit(index, step, r["rows"])


def assert_table(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Equal columns; `want` holds the values before the store's dtype cast (as the former
    writer received them)."""
    for name, value in want.items():
        assert got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value.astype(got[name].dtype), err_msg=name)


def test_parts_of_several_writers_read_as_the_former_table(tmp_path: Path) -> None:
    s = store(tmp_path)
    first, second = rollout(0, [3, 1, 6, 2]), rollout(1, [4, 2])
    write(s, first, 0, 2, [[3, 0], [2, 1]])  # writers hold rows in any order
    write(s, second, 1, 4, [[1, 0]])
    again = store(tmp_path)  # reopened, appendable
    assert len(again) == 6
    table = again.read()
    want = {k: np.concatenate([first["table"][k], second["table"][k]]) for k in first["table"]}
    assert_table(table, want)
    assert table["step"].tolist() == [2] * 4 + [4] * 2 and table["tokens"].shape == (6, SEQ)
    # tokens hold the pad id up to the rollout's longest row (8 positions in rollout 0)
    assert table["tokens"][1].tolist() == [1, 9, 9] + [PAD] * 5 + [0] * 4
    assert_table(again.read(step=4), second["table"])
    assert_table(read_experience(tmp_path / "x.zarr", ["labels", "reward"]),
                 {k: want[k] for k in ("labels", "reward")})
    # ragged on disk: a part holds its rows' positions only, nothing padded to SEQ
    stored = sum(int(np.prod(a.shape)) for a in (s.group["parts"]["rank0"]["tokens"],
                                                  s.group["parts"]["rank1"]["tokens"]))
    assert stored == int(first["packed"].length_R.sum() + second["packed"].length_R.sum())


def test_routing_ids_are_stored_ragged(tmp_path: Path) -> None:
    s = store(tmp_path, routing_shape=(2, 2))
    r = rollout(0, [3, 5, 1], routing=True)
    write(s, r, 0, 0, [[0, 2], [1]], routing=True)
    got = read_experience(tmp_path / "x.zarr", ["routing"])["routing"]
    assert got.shape == (3, SEQ, 2, 2) and got.dtype == np.int16
    np.testing.assert_array_equal(got, r["table"]["routing"])
    with pytest.raises(KeyError, match="routing"):
        write_rollout(s.path, None, writer="rank0", part=part(r, [0], 1), rollout=1, step=1,
                      rows=1)
    with pytest.raises(ValueError, match=r"routing_shape=\[2, 2\], this run's are \[4, 2\]"):
        store(tmp_path, routing_shape=(4, 2))


def test_only_committed_rollouts_are_read_and_a_crashed_append_is_overwritten(
        tmp_path: Path) -> None:
    s = store(tmp_path)
    first, second = rollout(0, [3, 1]), rollout(1, [2, 2])
    write(s, first, 0, 0, [[0], [1]])
    # rollout 1: one writer appended, the run died before the other and the commit
    write_rollout(s.path, None, writer="rank0", part=part(second, [0], 1), rollout=1, step=2,
                  rows=2)
    assert len(s) == 2
    assert_table(read_experience(s.path), first["table"])
    # a part whose columns were written but not its step: ignored, then overwritten
    s.group["parts"]["rank1"]["reward"].append(np.ones(1, dtype="float32"))
    s.truncate(2)  # the resumed run drops what came after its checkpoint
    write(s, second, 1, 2, [[1], [0]])
    assert_table(s.read(), {k: np.concatenate([first["table"][k], second["table"][k]])
                            for k in first["table"]})
    with pytest.raises(ValueError, match=r"3 rows is not a rollout boundary"):
        s.truncate(3)
    s.truncate(2)
    assert len(s) == 2 and s.read()["rollout"].tolist() == [0, 0]
    assert all(s.group["parts"][w][name].shape[0] == 1 for w in ("rank0", "rank1")
               for name in ("step", "reward"))  # the later rollout's rows are gone


def test_bad_columns_and_other_schemas_are_named(tmp_path: Path) -> None:
    s = store(tmp_path)
    r = rollout(0, [2, 3])
    bad = part(r, [0, 1], 0)
    del bad["ref_logp"]
    with pytest.raises(KeyError, match="ref_logp"):
        write_rollout(s.path, None, writer="w", part=bad, rollout=0, step=0, rows=2)
    bad = part(r, [0, 1], 0)
    bad["tokens"] = bad["tokens"][:-1]
    with pytest.raises(ValueError, match=r"experience column tokens: shape \(8,\), expected "
                                         r"\(9,\)"):
        write_rollout(s.path, None, writer="w", part=bad, rollout=0, step=0, rows=2)
    with pytest.raises(AssertionError, match="rollout 0: 2 rows written, expected 3"):
        write_rollout(s.path, s, writer="w", part=part(r, [0, 1], 0), rollout=0, step=0,
                      rows=3)
    with pytest.raises(ValueError, match=r"seq_length=12, this run's are 13 \(data.seq_length"):
        ExperienceStore(tmp_path / "x.zarr", 13, ["accuracy"], pad_id=PAD)
    with pytest.raises(ValueError, match=r"components=\['accuracy'\], this run's are "
                                         r"\['accuracy', 'format'\]"):
        ExperienceStore(tmp_path / "x.zarr", SEQ, ["accuracy", "format"], pad_id=PAD)
    with pytest.raises(KeyError, match="no column"):
        read_experience(tmp_path / "x.zarr", ["values"])
    with pytest.raises(FileNotFoundError, match="no experience store"):
        read_experience(tmp_path / "missing.zarr")


def test_a_store_of_the_former_layout_is_read_not_appended(tmp_path: Path) -> None:
    """The recorded rollout of tests/gpu/data (format 1: rank 0 wrote dense [rows, S])."""
    recorded = REPO / "tests/gpu/data/demo_rollout.zarr"
    table = read_experience(recorded, ["tokens", "prompt_len", "completion_len", "step"])
    assert table["tokens"].shape == (256, 128) and table["step"].shape == (256,)
    assert (table["prompt_len"] + table["completion_len"] <= 129).all()
    former = tmp_path / "former.zarr"
    shutil.copytree(recorded, former)
    with pytest.raises(ValueError, match="former layout"):
        ExperienceStore(former, 128, ["accuracy", "format"], pad_id=0)


def test_every_rank_writes_its_own_rows_at_world_size_4(tmp_path: Path) -> None:
    """TP2 x DP2 on gloo: each data-parallel rank's writer (TP rank 0) stores the rows its
    rank trained, which it already holds; during the store no rank receives anything but two
    one-number all-reduces, and the table equals the former single writer's."""
    out = tmp_path / "report"
    run_script(REPO / "tests/experience_worker.py", [str(tmp_path / "x.zarr"), str(out)],
               nproc=4)
    reports = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(4)]
    for rank, report in enumerate(reports):
        # every collective of the store phase, with its element count: no row data
        assert report["collectives"] == [["all_reduce", 1], ["all_reduce", 1]], rank
        assert report["rows_written"] == [16, 0, 16, 0][rank]  # TP rank 0 of each DP rank
    assert reports[0]["table_equal"] is True and reports[0]["rows"] == 32
