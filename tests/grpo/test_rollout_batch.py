"""Packing a rollout: positions of completions, masks and sampler log-probs; mini-batches."""

import pytest
import torch

from megatron_r1.grpo.rollout_batch import microbatch, minibatch_order, pack_rollout
from megatron_r1.rollout.types import Completion


def completion(ids, logps):
    return Completion(token_ids=tuple(ids), logprobs=tuple(logps), text="", finish_reason="stop")


def test_layout_is_megatrons_shifted_labels():
    prompts = [[1, 5, 6]]
    groups = [[completion([7, 8, 2], [-0.1, -0.2, -0.3]), completion([9], [-0.5])]]
    r = pack_rollout(prompts, groups, seq_length=6, pad_id=0)
    assert r.tokens_RS[0].tolist() == [1, 5, 6, 7, 8, 0]
    assert r.labels_RS[0].tolist() == [5, 6, 7, 8, 2, 0]
    # label positions of the completion: the prediction of 7 is made at position 2
    assert r.loss_mask_RS[0].tolist() == [0, 0, 1, 1, 1, 0]
    torch.testing.assert_close(r.sampler_logp_RS[0], torch.tensor([0, 0, -0.1, -0.2, -0.3, 0.0]))
    assert r.loss_mask_RS[1].tolist() == [0, 0, 1, 0, 0, 0]
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
    zeros = torch.zeros(2, 5)
    b = microbatch(r, torch.tensor([1, 0]), advantages_R=adv, old_logp_RS=zeros,
                   ref_logp_RS=zeros, aggregation="seq_mean_token_mean", max_new_tokens=4)
    assert b["advantages"][0].tolist() == [-0.5] * 5 and b["advantages"][1].tolist() == [0.5] * 5
    assert int(b["count"]) == 2
    torch.testing.assert_close(b["weights"].sum(1), torch.ones(2))
