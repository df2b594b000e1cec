"""Test support: after a weight sync the engine decodes and scores like the trainer; a
corrupted tensor in the sync trips the check. Prints a RESULT line (rank 0).

Usage: sync_gate_worker.py CONFIG.yaml [section.key=value ...]
Environment: SYNC_GATE_CORRUPT_RANKS (comma list): corrupt only those engine leaders' tensors."""

import json
import os
import sys

import torch

from megatron_r1.config import load_config
from megatron_r1.grpo_trainer import (
    SyncCheckError,
    check_sync,
    close_stage,
    open_stage,
    sync_weights,
)
from megatron_r1.rollout.types import SamplingConfig


def trainer_greedy(model, prompt, steps):
    """Greedy decoding with the megatron policy itself (full forward per token)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            tokens = torch.tensor([ids])
            logits = model(tokens, torch.arange(len(ids))[None], None)
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


if __name__ == "__main__":
    stage = open_stage(load_config(sys.argv[1], sys.argv[2:]), training=False)
    try:
        report = {"first_sync": sync_weights(stage)["sync/max_logp_diff"]}
        if stage.engine is not None:
            prompt = list(stage.eval_prompts[0].prompt_ids)
            engine = stage.engine.generate([prompt], SamplingConfig(
                n=1, temperature=0.0, top_p=1.0, max_new_tokens=12))[0][0]
            module = stage.session.model[0].module
            report["greedy_equal"] = list(engine.token_ids) == trainer_greedy(module, prompt,
                                                                               len(engine.token_ids))
        original = stage.export.hf_buckets

        # SYNC_GATE_CORRUPT_RANKS: only these ranks' engines get the corrupted tensor
        only = os.environ.get("SYNC_GATE_CORRUPT_RANKS")
        corrupt_here = only is None or str(stage.session.ctx.rank) in only.split(",")

        def corrupting(transform):
            """The export with the first tensor of the stream passed through `transform`."""
            def buckets(model, ctx, **where):
                for i, bucket in enumerate(original(model, ctx, **where)):
                    if i == 0 and bucket and corrupt_here:
                        name, tensor = bucket[0]
                        bucket = [(name, transform(tensor)), *bucket[1:]]
                    yield bucket
            return buckets

        stage.export.hf_buckets = corrupting(lambda t: t * 1.5)
        try:
            sync_weights(stage)
            report["tripped"] = False
        except SyncCheckError as err:
            report["tripped"] = True
            report["message"] = str(err)
        # a NaN tensor: the engine scores NaN, which must fail the gate too
        stage.export.hf_buckets = corrupting(lambda t: torch.full_like(t, float("nan")))
        try:
            sync_weights(stage)
            report["tripped_nan"] = False
        except SyncCheckError as err:
            report["tripped_nan"] = "up to inf nats" in str(err)
        stage.export.hf_buckets = original
        sync_weights(stage)
        report["restored"] = check_sync(stage)["sync/max_logp_diff"]
        if stage.session.ctx.rank == 0:
            print("RESULT " + json.dumps(report))
    finally:
        close_stage(stage)
