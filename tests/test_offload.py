"""Offloading a storage to host memory and back keeps every tensor, view and reference
valid, frees the device storage meanwhile, and restores the bytes exactly; storages the
model shares (a distributed optimizer's fp32 shards are views of the weights) stay."""

from __future__ import annotations

import torch

from megatron_r1.offload import ModelOffload, StorageOffload


def test_storage_round_trip_keeps_views_and_frees_memory():
    torch.manual_seed(0)
    state = torch.randn(1000)
    view = state[10:20]  # e.g. an optimizer param that is a view of a flat buffer
    moment = torch.randn(7, 3)
    weights = torch.randn(50)
    shard = weights[5:15]  # shares the weights' storage: must stay
    offload = StorageOffload([state, view, moment, shard], torch.device("cpu"), keep=[weights])
    expected = [t.clone() for t in (state, view, moment, shard)]
    assert offload.nbytes == (1000 + 21) * 4  # the view's storage counted once
    offload.offload()
    assert state.untyped_storage().nbytes() == 0 and moment.untyped_storage().nbytes() == 0
    assert weights.untyped_storage().nbytes() == 50 * 4  # kept
    weights.add_(1.0)  # the model keeps training its own weights meanwhile
    offload.restore()
    for got, want in zip((state, view, moment), expected):
        assert torch.equal(got, want)
    assert torch.equal(shard, expected[3] + 1.0)
    view.mul_(2.0)  # the view still aliases the restored storage
    assert torch.equal(state[10:20], expected[1] * 2.0)


def test_model_offload_brings_weights_back_only_inside_its_block():
    model = torch.nn.Linear(4, 3)
    expected = model.weight.detach().clone()
    offload = ModelOffload([model], torch.device("cpu"))
    offload.offload()
    assert model.weight.untyped_storage().nbytes() == 0
    with offload.on_device():
        assert torch.equal(model.weight, expected)
        out = model(torch.ones(1, 4))
    assert model.weight.untyped_storage().nbytes() == 0
    assert out.shape == (1, 3) and offload.nbytes == (12 + 3) * 4
