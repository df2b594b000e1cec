"""Parameters held by one rank, measured on the real model definition (meta device).

Layer L2 (builds megatron-core modules through megatron_r1.model.build). The planner never
counts parameters with a formula of its own: for each (TP, EP, ETP) it builds a reduced copy
of the policy (one layer of each kind the model has, plus embedding and output head) on the
meta device, with megatron's process groups created for a world of the right size on torch's
`fake` backend (no other process, no network, no memory), and records what each part of the
built model holds on one rank. A rank's count for any pipeline split, even or uneven, is then
the sum of the parts its stage holds: every layer of one kind has the same modules (megatron
builds them from the same spec), so the sum equals a build of that rank, which
tests/test_plan.py checks against ranks built on gloo and on the fake backend at 512 ranks.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from math import lcm

import torch
import torch.distributed as dist

from megatron_r1.config.schema import ModelConfig, ParallelConfig, TrainConfig
from megatron_r1.layout import resolve_layout
from megatron_r1.model.build import build_model
from megatron_r1.model.transformer_config import moe_layer_pattern
from megatron_r1.parallel.init import destroy_parallel, init_parallel
from megatron_r1.parallel.launch_env import LaunchEnv
from megatron_r1.plan.counts import LayerKind, PartCount, ShardCounts

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")
# 2-D weights an FP8 inference engine stores in one byte: linear layers of attention and
# FFN/experts. Embedding, output head, router and norms stay in 16 bits (DeepSeek-V3's FP8
# checkpoint does the same).
_HIGH_PRECISION_RE = re.compile(r"(embedding|output_layer|router|norm)")


def _reduced_model(model: ModelConfig) -> ModelConfig:
    """One layer of each kind (the first `moe_first_dense_layers` shrink to one), and short
    RoPE tables: positions hold no parameters, and YaRN's cos/sin cache for 160k positions
    is the slowest part of a build."""
    kinds = set(moe_layer_pattern(model))
    dense = 1 if kinds == {0, 1} else 0
    positions = min(model.max_position_embeddings, 128)
    return dataclasses.replace(
        model, num_layers=len(kinds), moe_first_dense_layers=dense,
        max_position_embeddings=positions,
        original_max_position_embeddings=min(model.original_max_position_embeddings, positions))


def _kind(flag: int) -> LayerKind:
    return "moe" if flag else "dense"


def _count(params: list[tuple[str, torch.nn.Parameter]]) -> PartCount:
    dense = expert = low = 0
    for name, param in params:
        n = param.numel()
        if ".mlp.experts." in name:
            expert += n
        else:
            dense += n
        if param.dim() == 2 and not _HIGH_PRECISION_RE.search(name):
            low += n
    return PartCount(dense, expert, low)


def _build_rank_on_fake_backend(model: ModelConfig, parallel: ParallelConfig, world: int,
                                rank: int) -> list[torch.nn.Module]:
    """Build `rank`'s chunks on meta with process groups of a `world`-rank job (fake backend).

    The caller tears the groups down with destroy_parallel()."""
    # Importing fake_pg registers the "fake" backend: collectives return at once, group
    # creation needs no peer. It lives under torch.testing._internal (stable since torch 2.1,
    # used by torch's own FSDP/TP tests for exactly this).
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the planner builds on its own fake process group: call it in a "
                           "process that has not started torch.distributed")
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        dp = world // (parallel.tensor * parallel.pipeline * parallel.context)
        train = TrainConfig(global_batch_size=dp, micro_batch_size=1)
        seq = 2 * parallel.tensor * parallel.context  # any length the layout accepts
        layout = resolve_layout(parallel, model, train, world, seq)
        launch = LaunchEnv("single", rank, world, 0, "127.0.0.1", 0)
        logging.getLogger("megatron_r1.parallel.init").setLevel(logging.WARNING)
        ctx = init_parallel(layout, parallel, launch, seed=0)
        return build_model(model, parallel, ctx, perform_initialization=False,
                           device=torch.device("meta"))
    except BaseException:
        destroy_parallel()
        raise


def build_rank_counts(model: ModelConfig, parallel: ParallelConfig, world: int,
                      rank: int) -> PartCount:
    """Parameters of `rank` in a `world`-rank job, from a meta build of that rank (used by
    tests to check the composed counts; slow for whole large models)."""
    chunks = _build_rank_on_fake_backend(model, parallel, world, rank)
    try:
        seen: set[int] = set()
        params = []
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append((name, p))
        return _count(params)
    finally:
        destroy_parallel()


_CACHE: dict[tuple[str, int, int, int], ShardCounts | ValueError] = {}


def shard_counts(model: ModelConfig, tensor: int, expert: int,
                 expert_tensor: int) -> ShardCounts:
    """Measure every part of the policy at this (TP, EP, ETP) (cached; ~0.1-0.6 s each)."""
    key = (repr(model), tensor, expert, expert_tensor)
    if key not in _CACHE:
        try:
            _CACHE[key] = _measure(model, tensor, expert, expert_tensor)
        except AssertionError as err:  # megatron's divisibility asserts (utils.divide)
            _CACHE[key] = ValueError(f"megatron-core cannot shard the model at TP={tensor} "
                                     f"EP={expert} ETP={expert_tensor}: {_last_line(err)}")
    found = _CACHE[key]
    if isinstance(found, ValueError):
        raise found
    return found


def _last_line(err: BaseException) -> str:
    text = str(err).strip().splitlines() or [type(err).__name__]
    return text[-1].replace("[rank0]: ", "")


def _measure(model: ModelConfig, tensor: int, expert: int, expert_tensor: int) -> ShardCounts:
    reduced = _reduced_model(model)
    parallel = ParallelConfig(tensor=tensor, expert=expert, expert_tensor=expert_tensor)
    world = lcm(tensor, expert * expert_tensor)
    chunks = _build_rank_on_fake_backend(reduced, parallel, world, rank=0)
    try:
        (chunk,) = chunks
        parts: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
        for name, param in chunk.named_parameters():
            match = _LAYER_RE.match(name)
            if match:
                key = f"layer{match.group(1)}"
            elif name.startswith("embedding."):
                key = "embedding"
            elif name.startswith("decoder.final_layernorm"):
                key = "final_norm"
            elif name.startswith("output_layer."):
                key = "output_layer"
            else:
                raise RuntimeError(f"parameter {name!r} belongs to no part the planner knows")
            parts.setdefault(key, []).append((name, param))
    finally:
        destroy_parallel()
    reduced_kinds = [_kind(f) for f in moe_layer_pattern(reduced)]
    layers = {kind: _count(parts[f"layer{i}"]) for i, kind in enumerate(reduced_kinds)}
    embedding = _count(parts["embedding"])
    output = _count(parts.get("output_layer", []))
    if model.tie_embeddings:
        # A one-stage model reuses the embedding; a later stage allocates a copy of the same
        # shape (megatron: output_layer skips its weight only where pre_process is true).
        output = embedding
    return ShardCounts(
        tensor=tensor, expert=expert, expert_tensor=expert_tensor, embedding=embedding,
        layers=layers, final_norm=_count(parts.get("final_norm", [])), output_layer=output,
        tied_single_stage=model.tie_embeddings,
        layer_kinds=tuple(_kind(f) for f in moe_layer_pattern(model)))

