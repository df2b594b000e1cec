"""Packing a rollout: positions of completions, masks and sampler log-probs; mini-batches;
training micro-batches, padded and packed."""

import pytest
import torch

from megatron_r1.batching import MicroBatchPlan
from megatron_r1.grpo.rollout_batch import (
    minibatch_order,
    pack_rollout,
    stored_rollout,
    train_inputs,
    train_microbatch,
)
from megatron_r1.rollout.types import Completion


def completion(ids, logps):
    return Completion(token_ids=tuple(ids), logprobs=tuple(logps), text="", finish_reason="stop")


def test_layout_is_megatrons_shifted_labels():
    prompts = [[1, 5, 6]]
    groups = [[completion([7, 8, 2], [-0.1, -0.2, -0.3]), completion([9], [-0.5])]]
    r = pack_rollout(prompts, groups, seq_length=8, pad_id=0)
    # rows are padded to the rollout's longest row (5 positions), not to seq_length
    assert r.tokens_RS[0].tolist() == [1, 5, 6, 7, 8]
    assert r.labels_RS[0].tolist() == [5, 6, 7, 8, 2]
    # label positions of the completion: the prediction of 7 is made at position 2
    assert r.loss_mask_RS[0].tolist() == [0, 0, 1, 1, 1]
    torch.testing.assert_close(r.sampler_logp_RS[0], torch.tensor([0, 0, -0.1, -0.2, -0.3]))
    assert r.loss_mask_RS[1].tolist() == [0, 0, 1, 0, 0]
    assert r.length_R.tolist() == [5, 3]
    assert r.prompt_index_R.tolist() == [0, 0] and r.completion_len_R.tolist() == [3, 1]


def test_too_long_is_an_error():
    with pytest.raises(ValueError, match=r"exceed data.seq_length \+ 1 = 4"):
        pack_rollout([[1, 2, 3]], [[completion([4, 5], [0, 0])]], seq_length=3, pad_id=0)


def test_minibatches_partition_the_rollout_reproducibly():
    order = minibatch_order(16, 4, seed=1, rollout_index=3)
    assert sorted(torch.cat(order).tolist()) == list(range(16))
    assert all(len(m) == 4 for m in order)
    again = minibatch_order(16, 4, seed=1, rollout_index=3)
    assert all(torch.equal(a, b) for a, b in zip(order, again))
    other = minibatch_order(16, 4, seed=1, rollout_index=4)
    assert not all(torch.equal(a, b) for a, b in zip(order, other))
    with pytest.raises(ValueError, match=r"not a multiple of train\.global_batch_size=5"):
        minibatch_order(16, 5, seed=1, rollout_index=0)


def test_training_microbatch_broadcasts_advantages_over_tokens():
    r = pack_rollout([[1, 2]], [[completion([3, 4], [-1, -1]), completion([5], [-1])]], 5, 0)
    adv = torch.tensor([0.5, -0.5])
    zeros = torch.zeros(r.tokens_RS.shape)
    inputs = train_inputs(r, adv, zeros, zeros, "seq_mean_token_mean", max_new_tokens=4)
    b = train_microbatch(r, MicroBatchPlan((1, 0), length=3), inputs)
    assert b["advantages"][0].tolist() == [-0.5] * 3 and b["advantages"][1].tolist() == [0.5] * 3
    assert int(b["count"]) == 2
    torch.testing.assert_close(b["weights"].sum(1), torch.ones(2))


def test_packed_training_microbatch_holds_the_padded_one_back_to_back():
    r = pack_rollout([[1, 2], [1, 9, 9]], [[completion([3, 4], [-1, -2])],
                                            [completion([5], [-3])]], 8, 0)
    adv = torch.tensor([0.5, -0.5])
    old = torch.randn(r.tokens_RS.shape)
    inputs = train_inputs(r, adv, old, old, "token_mean", max_new_tokens=4)
    padded = train_microbatch(r, MicroBatchPlan((0, 1), length=3), inputs)
    packed = train_microbatch(r, MicroBatchPlan((0, 1), length=8, packed=True), inputs)
    valid = torch.arange(3) < padded["lengths"].unsqueeze(1)
    for key in ("tokens", "labels", "loss_mask", "old_logp", "weights", "advantages"):
        assert torch.equal(packed[key][0, :6], padded[key][valid]), key
        assert not packed[key][0, 6:].any(), key  # the padding sequence
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 1]]
    assert packed["cu_seqlens"].tolist() == [0, 3, 6, 8] and int(packed["max_seqlen"]) == 3
    assert int(packed["count"]) == int(padded["count"]) == 3  # token_mean: completion tokens


def test_a_rollout_read_back_from_the_experience_store_trains_the_same(tmp_path):
    from megatron_r1.experience import ExperienceStore, ragged_rows, write_rollout

    r = pack_rollout([[1, 2], [1, 9, 9]], [[completion([3, 4], [-1, -2])],
                                            [completion([5], [-3])]], 8, 0)
    old = torch.randn(r.tokens_RS.shape)
    store = ExperienceStore(tmp_path / "x.zarr", 8, [])
    part = ragged_rows(r.length_R, {
        "tokens": r.tokens_RS, "labels": r.labels_RS, "loss_mask": r.loss_mask_RS.bool(),
        "old_logp": old, "ref_logp": old, "sampler_logp": r.sampler_logp_RS}, {
        "row": [0, 1], "rollout": 0, "prompt_index": r.prompt_index_R,
        "prompt_len": r.prompt_len_R, "completion_len": r.completion_len_R,
        "reward": torch.ones(2), "advantage": torch.tensor([0.5, -0.5])})
    write_rollout(store.path, store, writer="rank0", part=part, rollout=0, step=0, rows=2)
    back, adv, old_back, _ = stored_rollout(store.read())
    assert back.length_R.tolist() == r.length_R.tolist() and adv.tolist() == [0.5, -0.5]
    plan = MicroBatchPlan((0, 1), length=3)
    want = train_microbatch(r, plan, train_inputs(r, adv, old, old, "token_mean", 4))
    got = train_microbatch(back, plan, train_inputs(back, adv, old_back, old_back, "token_mean", 4))
    for key in want:
        assert torch.equal(got[key].to(want[key].dtype), want[key]), key
