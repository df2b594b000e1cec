"""Test support: after a weight sync the engine decodes and scores like the trainer; a
corrupted tensor in the sync trips the check. Prints a RESULT line (rank 0).

Usage: sync_gate_worker.py CONFIG.yaml [section.key=value ...]
Environment: SYNC_GATE_CORRUPT_RANKS (comma list): corrupt only those engine leaders' tensors;
SYNC_GATE_TRAINING=1: open the stage for training (reference model, offloads)."""

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


def device_state(stage):
    """What of the training state still holds storage (read right after open_stage, i.e.
    after the engine started and before any sync): gradient buffers, optimizer tensors
    beside the weights, the reference model."""
    from megatron_r1.logprobs import REF_MODEL
    from megatron_r1.offload import optimizer_tensors

    model = stage.session.model
    weights = {p.untyped_storage().data_ptr() for c in model for p in c.parameters()}
    ref = stage.session.extra_models.get(REF_MODEL, [])
    return {
        "grad_bytes": sum(b.grad_data.untyped_storage().nbytes() for c in model
                          for b in [*c.buffers, *c.expert_parallel_buffers]),
        "optimizer_bytes": sum(t.untyped_storage().nbytes()
                               for t in optimizer_tensors(stage.session.optimizer)
                               if t.untyped_storage().data_ptr() not in weights),
        "reference_bytes": sum(p.untyped_storage().nbytes() for c in ref for p in c.parameters()),
        "reference_params": sum(p.numel() for c in ref for p in c.parameters()),
    }


if __name__ == "__main__":
    # SYNC_GATE_TRAINING=1: the GRPO stage as training opens it (reference model, offloads)
    training = os.environ.get("SYNC_GATE_TRAINING") == "1"
    stage = open_stage(load_config(sys.argv[1], sys.argv[2:]), training=training)
    try:
        report = {"at_engine_start": device_state(stage)}
        report["first_sync"] = sync_weights(stage)["sync/max_logp_diff"]
        if stage.engine is not None:
            report["workers"] = stage.engine.workers  # where each engine worker runs
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
