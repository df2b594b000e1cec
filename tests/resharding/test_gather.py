"""Gathering the sharded policy reproduces the unsharded parameters exactly, under TP, PP, EP
and TP x EP (gloo, world sizes 2 and 4): same names, same values, bitwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from procs import REPO, run_script

WORKER = REPO / "tests/resharding/gather_worker.py"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("gather")
    run_script(REPO / "tests/e2e/save_initial_checkpoint.py", [f"logging.run_dir={root}/init"])
    common = [f"checkpoint.load_dir={root}/init/checkpoints", "checkpoint.load_optimizer=false"]
    run_script(WORKER, [str(root / "ref.pt"), f"logging.run_dir={root}/ref", *common])
    return root, common, torch.load(root / "ref.pt")


@pytest.mark.parametrize(("nproc", "layout"), [
    (2, ["parallel.tensor=2"]),
    (2, ["parallel.pipeline=2"]),
    (2, ["parallel.expert=2"]),
    (4, ["parallel.tensor=2", "parallel.expert=2", "parallel.expert_tensor=1"]),
], ids=["tp2", "pp2", "ep2", "tp2-ep2"])
def test_gather_equals_the_unsharded_model(reference, nproc, layout):
    root, common, ref = reference
    out = root / f"{'-'.join(layout)}.pt"
    run_script(WORKER, [str(out), f"logging.run_dir={out}.run", *common, *layout], nproc=nproc)
    got = torch.load(out)
    assert sorted(got["tensors"]) == sorted(ref["tensors"])
    for name, tensor in ref["tensors"].items():
        assert torch.equal(got["tensors"][name], tensor), name
    assert got["buckets"] > 1  # the 64 KiB bucket bound was honoured
    # the unsharded parameter names are the model's own (experts by global index)
    assert "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight" in got["tensors"]


def test_gather_to_two_engine_groups_takes_from_their_own_ranks_first(reference):
    """TP2 x DP2 with engine groups {0, 1} and {2, 3}: both leaders assemble the whole model,
    each from its own group (a full replica), never from the other group."""
    root, common, ref = reference
    out = root / "two-groups.pt"
    run_script(WORKER, [str(out), f"logging.run_dir={out}.run", *common, "parallel.tensor=2"],
               nproc=4, env={"GATHER_DESTINATIONS": "0,2", "GATHER_GROUP": "2"})
    for path in (out, f"{out}.rank2"):
        got = torch.load(path)["tensors"]
        assert sorted(got) == sorted(ref["tensors"])
        for name, tensor in ref["tensors"].items():
            assert torch.equal(got[name], tensor), (path, name)
    stats = [json.loads(Path(f"{out}.stats{r}").read_text()) for r in range(4)]
    needed = sum(t.numel() * t.element_size() for t in ref["tensors"].values())
    for leader, peer in ((0, 1), (2, 3)):
        assert stats[leader]["local"] + stats[leader]["received"] == needed
        assert stats[leader]["received"] > 0
        assert stats[peer]["sent"] == stats[leader]["received"]  # all from its own group
        assert stats[peer]["received"] == stats[peer]["local"] == 0


def test_gather_with_uneven_pipeline_stages(tmp_path):
    """Three layers on two stages (1 + 2): global layer numbers come out right."""
    model = ["model.num_layers=3", "model.moe_first_dense_layers=1"]
    run_script(REPO / "tests/e2e/save_initial_checkpoint.py",
               [f"logging.run_dir={tmp_path}/init", *model])
    common = [f"checkpoint.load_dir={tmp_path}/init/checkpoints",
              "checkpoint.load_optimizer=false", *model]
    run_script(WORKER, [str(tmp_path / "ref.pt"), f"logging.run_dir={tmp_path}/ref", *common])
    run_script(WORKER, [str(tmp_path / "pp.pt"), f"logging.run_dir={tmp_path}/pp", *common,
                        "parallel.pipeline=2", "parallel.first_stage_layers=1"], nproc=2)
    ref, got = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "pp.pt")
    assert sorted(got["tensors"]) == sorted(ref["tensors"])
    for name, tensor in ref["tensors"].items():
        assert torch.equal(got["tensors"][name], tensor), name
    assert "decoder.layers.2.mlp.experts.local_experts.3.linear_fc1.weight" in got["tensors"]
    assert "decoder.layers.0.mlp.linear_fc1.weight" in got["tensors"]  # the dense layer


def test_the_plan_is_kept_across_syncs_and_rebuilt_when_the_layout_changes(tmp_path):
    """World size 2: the second sync reuses the plan yet reads the weights' new storages
    (offloading swaps them); a parameter added on one rank only makes both ranks plan again,
    and the gathered tensors are right every time."""
    out = tmp_path / "report"
    run_script(REPO / "tests/resharding/plan_cache_worker.py", [str(out)], nproc=2)
    for rank in range(2):
        report = json.loads(Path(f"{out}.{rank}").read_text())
        assert report["builds"] == [1, 1, 2], rank
        assert report["ok"] == [True, True, True], rank
