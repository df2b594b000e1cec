"""Test support: the trainer's MoE routing against the engine's, and what R3 does about a gap.

One GRPO stage (grpo.routing_replay=r3: the vLLM engine captures its routing) samples one
rollout twice: first with the policy's exact weights, then with noise on the engine's router
weights only (small enough that the engine's log-probs of the sync probes stay close to the
trainer's: the kind of gap kernels and precision leave). Each time, on every completion token
and MoE layer, the trainer's own top-k (recorded) is compared with the engine's, and the mean
absolute gap between the trainer's and the engine's log-probs of the sampled tokens is taken
with the trainer routing by itself and replaying the engine's routing (R3). Prints a RESULT
line (JSON, rank 0). Usage: routing_consistency_worker.py CONFIG.yaml [section.key=value ...]
Environment: ROUTER_NOISE (default 0.05): the noise's std relative to each router weight's."""

import json
import os
import sys

import torch

from megatron_r1.batching import plan_microbatches
from megatron_r1.config import load_config
from megatron_r1.grpo_trainer import _sample, close_stage, open_stage, sync_weights
from megatron_r1.logprobs import score_rows
from megatron_r1.rollout import dispatch
from megatron_r1.weight_sync import check_engines, push_weights


def measure(stage):
    """Agreement of the trainer's routing with the engine's, and the log-prob gap to the
    sampler with natural routing and with R3, on one rollout (world size 1)."""
    generated = _sample(stage, 0)
    rows = list(range(len(generated.length_R)))
    local = dispatch.receive_rows(generated, [rows], width=int(generated.length_R.max()),
                                  group_size=stage.cfg.grpo.group_size,
                                  pad_id=stage.export.pad_id)
    rollout, session = local.rollout, stage.session
    plans = plan_microbatches(rows, generated.length_R.tolist(), 1, stage.how)[0]
    temperature = stage.cfg.rollout.temperature
    with stage.routing.recording():
        natural = score_rows(session.model, rollout, plans, session, temperature,
                             routing=stage.routing)
    trainer_RSLK = stage.routing.recorded_table(*rollout.tokens_RS.shape)
    with stage.routing.replaying():
        replayed = score_rows(session.model, rollout, plans, session, temperature,
                              routing=stage.routing,
                              routing_RSLK=local.routing_RSLK)
    # every model input of every row (prompt and completion), every MoE layer
    width = rollout.tokens_RS.shape[1]
    valid = torch.arange(width).unsqueeze(0) < rollout.length_R.unsqueeze(1)
    same = (trainer_RSLK.sort(-1).values == local.routing_RSLK.sort(-1).values).all(-1)
    agree = same[valid].float().mean().item()
    token_agree = same.all(-1)[valid].float().mean().item()
    mask = rollout.loss_mask_RS > 0

    def gap(scores):
        diffs = [(scores[r] - rollout.sampler_logp_RS[r, :len(scores[r])]).abs()
                 [mask[r, :len(scores[r])]] for r in rows]
        return torch.cat(diffs).mean().item()

    return {"layer_agreement": agree, "token_agreement": token_agree,
            "gap_natural": gap(natural), "gap_r3": gap(replayed),
            "positions": int(valid.sum()), "completion_tokens": int(mask.sum())}


if __name__ == "__main__":
    stage = open_stage(load_config(sys.argv[1], sys.argv[2:]))
    try:
        report = {"exact": {"probe_gap": sync_weights(stage)["sync/max_logp_diff"],
                            **measure(stage)}}
        relative = float(os.environ.get("ROUTER_NOISE", "0.05"))
        original = stage.export.hf_buckets
        g = torch.Generator().manual_seed(0)

        def noisy_routers(model, ctx, **where):
            for bucket in original(model, ctx, **where):
                yield [(name, t + relative * t.float().std() * torch.randn(
                    t.shape, generator=g).to(t.dtype) if name.endswith("mlp.gate.weight") else t)
                       for name, t in bucket]

        stage.export.hf_buckets = noisy_routers  # type: ignore[method-assign]
        push_weights(stage.session, stage.export, stage.engine, stage.placement)
        stage.export.hf_buckets = original  # type: ignore[method-assign]
        probes = check_engines(stage.session, stage.engine, stage.placement, stage.probes,
                               stage.how, atol=float("inf"))
        report["perturbed"] = {"probe_gap": probes["sync/max_logp_diff"], **measure(stage)}
        if stage.session.ctx.rank == 0:
            print("RESULT " + json.dumps(report))
    finally:
        close_stage(stage)
