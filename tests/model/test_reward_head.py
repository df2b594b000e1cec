"""The reward model: GPTModel chunks whose output layer is a scalar head; its checkpoint.

Runs in a fresh interpreter (megatron's process groups are process-global): scores [B, S]
float32 at causal positions, the head's own replicated checkpoint key, a round trip through
dist checkpointing into chunks built without initialisation (the serving path), a policy
checkpoint initialising the backbone with the head left fresh, and tied embeddings.
"""

from __future__ import annotations

import json

from procs import run_python

SCRIPT = """
import dataclasses, json, tempfile, torch
from megatron_r1.checkpoint.dist_ckpt import load_checkpoint, save_checkpoint
from megatron_r1.config import load_config
from megatron_r1.layout import resolve_layout
from megatron_r1.model.build import build_model
from megatron_r1.model.reward_head import (HEAD_CHECKPOINT_KEY, HEAD_KEYS, ScalarHead,
                                           build_reward_model, last_token_scores)
from megatron_r1.optim import build_optimizer, wrap_for_training
from megatron_r1.parallel.init import init_parallel
from megatron_r1.parallel.launch_env import discover

cfg = load_config(None, ["model.num_layers=1"])
layout = resolve_layout(cfg.parallel, cfg.model, cfg.train, 1, cfg.data.seq_length)
ctx = init_parallel(layout, cfg.parallel, discover({}), cfg.train.seed)
out = {}

def saved(chunks, root):
    wrapped = wrap_for_training(chunks, cfg.model, cfg.parallel, ctx)
    opt, sched = build_optimizer(wrapped, cfg.optim, cfg.model, cfg.parallel, 10, ctx)
    return save_checkpoint(root, 1, wrapped, opt, sched, {}, ctx)

rm = build_reward_model(cfg.model, cfg.parallel, ctx)
head = rm[0].output_layer
out["head_type"] = type(head).__name__
want = torch.zeros(1, cfg.model.hidden_size).normal_(
    0, cfg.model.init_method_std, generator=torch.Generator().manual_seed(cfg.train.seed))
out["head_is_seeded"] = torch.equal(head.weight.detach(), want)
tokens = torch.randint(0, 500, (2, 8))
pos = torch.arange(8).repeat(2, 1)
with torch.no_grad():
    scores = rm[0](tokens, pos, None)
    later = tokens.clone(); later[:, 5:] = 7
    changed = rm[0](later, pos, None)
out["shape"], out["dtype"] = list(scores.shape), str(scores.dtype)
out["causal"] = torch.equal(scores[:, :5], changed[:, :5]) and not torch.equal(scores, changed)
out["last"] = torch.equal(last_token_scores(scores, torch.tensor([3, 8])),
                          torch.stack([scores[0, 2], scores[1, 7]]))
sd = rm[0].sharded_state_dict()
entry = sd["output_layer.weight"]
out["head_entry"] = [entry.key, list(entry.global_shape), list(entry.replica_id)]

root = tempfile.mkdtemp()
path = saved(rm, root + "/rm")
served = build_reward_model(cfg.model, cfg.parallel, ctx, perform_initialization=False)
load_checkpoint(path, served, None, None, ctx)
with torch.no_grad():
    out["round_trip"] = torch.equal(served[0](tokens, pos, None), scores)

policy = build_model(cfg.model, cfg.parallel, ctx)
with torch.no_grad():
    for p in policy[0].parameters():
        p.add_(0.5)  # weights no fresh build has
ppath = saved(policy, root + "/policy")
fresh = build_reward_model(cfg.model, cfg.parallel, ctx)
before = fresh[0].output_layer.weight.detach().clone()
load_checkpoint(ppath, fresh, None, None, ctx, fresh=HEAD_KEYS)
out["backbone_loaded"] = torch.equal(fresh[0].embedding.word_embeddings.weight,
                                     policy[0].embedding.word_embeddings.weight)
out["head_kept"] = torch.equal(fresh[0].output_layer.weight.detach(), before)
try:
    load_checkpoint(ppath, build_reward_model(cfg.model, cfg.parallel, ctx), None, None, ctx)
    out["strict"] = "loaded"
except BaseException as err:  # torch's CheckpointException is a BaseException
    out["strict"] = type(err).__name__ + ": " + str(err)[-300:]

tied = build_reward_model(dataclasses.replace(cfg.model, tie_embeddings=True), cfg.parallel, ctx)
out["tied"] = [type(tied[0].output_layer).__name__,
               tied[0].share_embeddings_and_output_weights]
print(json.dumps(out))
"""


def test_reward_head_scores_checkpoints_and_initialisation():
    proc = run_python(SCRIPT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["head_type"] == "ScalarHead" and got["head_is_seeded"]
    assert got["shape"] == [2, 8] and got["dtype"] == "torch.float32"
    assert got["causal"] and got["last"]
    # one tensor [1, H] replicated over TP and DP, under a key no policy checkpoint uses
    assert got["head_entry"] == ["output_layer.score_weight", [1, 64], [0, 0, 0]]
    assert got["round_trip"]
    assert got["backbone_loaded"] and got["head_kept"]
    assert "output_layer.score_weight" in got["strict"], got["strict"]  # no silent fresh head
    assert got["tied"] == ["ScalarHead", False]
