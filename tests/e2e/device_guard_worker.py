"""Test support: the trainer's forward steps with the model on another device than the host
that builds the batches (`meta` standing in for CUDA, megatron_compat.use_meta_as_cuda), so
a tensor left on the host fails as on a GPU. Runs the real micro-batches of SFT (forward and
backward), GRPO scoring and GRPO training through the one door
(megatron_r1.schedule.forward_backward), then proves the guard bites: the same batch handed
to the model without the door must fail. Packed micro-batches cannot run on `meta` (megatron
reads the sequence boundaries back to the host); their every tensor, `packed_seq_params`
included, is checked to leave the door on the device. Dense model: MoE routing has no meta
kernels."""

import dataclasses
import functools
import json
import sys

import torch

from megatron_r1 import megatron_compat
from megatron_r1.batching import MicroBatching, plan_microbatches
from megatron_r1.config import load_config
from megatron_r1.data.preference import arithmetic_pairs
from megatron_r1.data.reward_batches import RewardBatchSource, tokenize_rewards
from megatron_r1.data.sft import SFTBatchSource, sft_datasets
from megatron_r1.data.tokenizer import resolve_tokenizer
from megatron_r1.grpo import forward
from megatron_r1.grpo.rollout_batch import (
    pack_rollout,
    score_microbatch,
    train_inputs,
    train_microbatch,
)
from megatron_r1.layout import resolve_layout
from megatron_r1.model.build import build_model
from megatron_r1.model.reward_head import build_reward_model
from megatron_r1.optim import wrap_for_training
from megatron_r1.parallel.init import destroy_parallel, init_parallel
from megatron_r1.parallel.launch_env import discover
from megatron_r1.reward_serving import score_step
from megatron_r1.reward_training import reward_forward_step
from megatron_r1.rollout.types import Completion
from megatron_r1.schedule import forward_backward, to_device
from megatron_r1.sft import sft_forward_step

if __name__ == "__main__":
    cfg = load_config(None, ["model.num_experts=0", *sys.argv[1:]])
    layout = resolve_layout(cfg.parallel, cfg.model, cfg.train, 1, cfg.data.seq_length)
    ctx = init_parallel(layout, cfg.parallel, discover(), cfg.train.seed)
    megatron_compat.use_meta_as_cuda()
    ctx = dataclasses.replace(ctx, device=torch.device("meta"))
    model = wrap_for_training(build_model(cfg.model, cfg.parallel, ctx), cfg.model, cfg.parallel,
                              ctx)
    for chunk in model:  # collectives have no meta kernels; no batch tensor reaches them
        chunk.config.finalize_model_grads_func = None

    def inputs_on_the_model_device(module, args, kwargs):
        # an embedding lookup on `meta` accepts host indices, where CUDA would not: check
        # every tensor the model is called with, as the GPU would
        found = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
        params = kwargs.get("packed_seq_params")
        if params is not None:
            found += [params.cu_seqlens_q, params.cu_seqlens_kv]
        for tensor in found:
            if tensor.device.type != "meta":
                raise RuntimeError(f"a {tuple(tensor.shape)} input reached the model on "
                                   f"{tensor.device}, the model is on meta")

    model[0].register_forward_pre_hook(inputs_on_the_model_device, with_kwargs=True)
    report: dict[str, object] = {
        "model_device": str(next(model[0].parameters()).device)}

    tokenizer = resolve_tokenizer(cfg.data, vocab_size=cfg.model.vocab_size,
                                  cache_dir=sys.argv[1].split("=", 1)[1])
    train_set, _ = sft_datasets(cfg.data, tokenizer, seed=cfg.data.seed)
    how = MicroBatching(cfg.train.micro_batch_size)
    source = SFTBatchSource(train_set, global_batch_size=cfg.train.global_batch_size,
                            micro_batching=how, dp_rank=0, dp_size=1, seed=0)
    out = forward_backward(model, source.next_step().micro_batches, sft_forward_step, ctx)
    report["sft"] = out[0]["loss"].device.type

    g = torch.Generator().manual_seed(0)
    groups = [[Completion(tuple(torch.randint(3, 500, (n,), generator=g).tolist()), (0.0,) * n,
                          "", "stop")] for n in (5, 17, 9, 30)]
    rollout = pack_rollout([[1, 7, 8]] * 4, groups, cfg.data.seq_length, pad_id=0)
    zeros = torch.zeros(rollout.tokens_RS.shape)
    inputs = train_inputs(rollout, torch.randn(4, generator=g), zeros, zeros,
                          cfg.grpo.loss_aggregation, 32)
    plans = plan_microbatches(range(4), rollout.length_R.tolist(), 1, MicroBatching(2))[0]
    scored = forward_backward(model, [score_microbatch(rollout, p) for p in plans],
                              forward.score_step(1.0, "auto", ctx.tp_group), ctx,
                              forward_only=True)
    trained = forward_backward(model, [train_microbatch(rollout, p, inputs) for p in plans],
                               forward.loss_step(cfg.grpo, 1.0, ctx.tp_group), ctx)
    report["grpo"] = [scored[0]["logp"].device.type, trained[0]["loss"].device.type]
    packed = plan_microbatches(range(4), rollout.length_R.tolist(), 1,
                               MicroBatching(4, pack=True))[0][0]
    moved = to_device(train_microbatch(rollout, packed, inputs), ctx.device)
    params = moved.pop("packed_seq_params")
    report["packed"] = sorted({t.device.type for t in moved.values()} |
                              {params.cu_seqlens_q.device.type, params.cu_seqlens_kv.device.type})

    # reward models: a pairwise training step (forward and backward), then serving's scoring
    rm = wrap_for_training(build_reward_model(cfg.model, cfg.parallel, ctx), cfg.model,
                           cfg.parallel, ctx)
    for chunk in rm:
        chunk.config.finalize_model_grads_func = None
    rm[0].register_forward_pre_hook(inputs_on_the_model_device, with_kwargs=True)
    pairs, _ = arithmetic_pairs(cfg.data, seed=0)
    prefs = RewardBatchSource(tokenize_rewards(pairs[:16], tokenizer, cfg.data.seq_length),
                              global_batch_size=4, micro_batching=MicroBatching(2), dp_rank=0,
                              dp_size=1, seed=0)
    rm_trained = forward_backward(rm, prefs.next_step().micro_batches,
                                  functools.partial(reward_forward_step, "pairwise"), ctx)
    ids = torch.randint(3, 500, (2, 12), generator=g)
    rm_scored = forward_backward(rm, [{"tokens": ids, "position_ids": torch.arange(12).repeat(2, 1),
                                       "lengths": torch.tensor([12, 7]),
                                       "rows": torch.tensor([0, 1])}],
                                 score_step, ctx, forward_only=True)
    report["reward_model"] = [rm_trained[0]["loss"].device.type,
                              rm_scored[0]["scores"].device.type]

    host_batch = score_microbatch(rollout, plans[0])  # what the door would have moved
    try:
        forward.score_step(1.0, "auto", ctx.tp_group)(host_batch, model[0])
        report["host_batch"] = "accepted"
    except (RuntimeError, NotImplementedError) as err:
        report["host_batch"] = f"refused: {str(err)[:120]}"
    for key in ("labels", "loss_mask"):  # and a loss input left behind fails in the loss
        moved = to_device(host_batch, ctx.device)
        moved[key] = host_batch[key]
        logits, loss_fn = forward.score_step(1.0, "auto", ctx.tp_group)(moved, model[0])
        try:
            loss_fn(logits)
            report[f"host_{key}"] = "accepted"
        except (RuntimeError, NotImplementedError, ValueError) as err:
            report[f"host_{key}"] = f"refused: {str(err)[:80]}"
    print("RESULT " + json.dumps(report))
    destroy_parallel()
