"""Pre-write checks of a conversion: missing, unexpected, skipped and mis-shaped tensors, FP8
scales, and megatron parameters no rule produces. Each error names the tensor."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_r1.checkpoint.hf import family_for
from megatron_r1.checkpoint.hf import hf_config as H
from megatron_r1.checkpoint.hf.plan import (
    HTensor,
    MTensor,
    bind,
    check_hf_names,
    check_hf_shapes,
)
from megatron_r1.checkpoint.hf.rules import MapContext
from megatron_r1.checkpoint.hf.safetensors_io import SafetensorsCheckpoint
from megatron_r1.config.schema import ModelConfig


def _setup(directory: Path) -> tuple[Any, MapContext, dict[str, HTensor]]:
    hf = H.read_hf_config(directory)
    family = family_for(hf)
    model = H.derive_model_config(family.config_to_model(hf), hf, ModelConfig(), set())
    ckpt = SafetensorsCheckpoint(directory)
    source = {n: HTensor(ckpt.info(n).shape, ckpt.info(n).dtype) for n in ckpt.names()}
    return family, MapContext(model, hf), source


def _megatron_table(family: Any, ctx: MapContext, source: dict[str, HTensor]
                    ) -> dict[str, MTensor]:
    """What megatron's model would hold: each rule's transform applied to meta tensors."""
    table = {}
    for pair in check_hf_names(family, ctx, source):
        parts = [torch.empty(source[n].shape, device="meta") for n in pair.hf]
        table[pair.mcore[0]] = MTensor(tuple(pair.rule.transform.to_mcore(parts, ctx).shape),
                                       torch.float32)
    return table


def test_hf_plan_accepts_a_complete_checkpoint(tiny_hf_dirs: dict[str, Path]) -> None:
    family, ctx, source = _setup(tiny_hf_dirs["deepseek_v3"])
    pairs = check_hf_names(family, ctx, source)
    units = bind(family, pairs, ctx, _megatron_table(family, ctx, source))
    check_hf_shapes(units, source, (128, 128))
    assert {n for u in units for n in u.hf} == set(source)


def test_hf_plan_names_missing_and_unexpected_tensors(tiny_hf_dirs: dict[str, Path]) -> None:
    family, ctx, source = _setup(tiny_hf_dirs["qwen3_moe"])
    gone = "model.layers.1.mlp.experts.3.down_proj.weight"
    with pytest.raises(ValueError, match=rf"1 tensor\(s\) the qwen3_moe config requires are "
                                         rf"missing from the checkpoint: '{gone}'"):
        check_hf_names(family, ctx, {n: t for n, t in source.items() if n != gone})
    extra = {**source, "model.layers.0.mlp.experts.4.up_proj.weight": HTensor((32, 64),
                                                                              torch.float32)}
    with pytest.raises(ValueError, match=r"1 unexpected tensor\(s\) in the checkpoint \(not in "
                                         r"the qwen3_moe mapping for this config\): "
                                         r"'model.layers.0.mlp.experts.4.up_proj.weight'"):
        check_hf_names(family, ctx, extra)


def test_hf_plan_skips_mtp_layers_with_a_log_line(tiny_hf_dirs: dict[str, Path],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    family, ctx, source = _setup(tiny_hf_dirs["deepseek_v3"])
    mtp = {"model.layers.3.eh_proj.weight": HTensor((64, 128), torch.float32),
           "model.layers.3.enorm.weight": HTensor((64,), torch.float32)}
    with caplog.at_level(logging.INFO):
        check_hf_names(family, ctx, {**source, **mtp})
    assert ("skipping 2 tensor(s) (multi-token-prediction (MTP) layer: megatron-r1 trains "
            "without MTP (model.mtp_num_layers=0)): 'model.layers.3.eh_proj.weight', "
            "'model.layers.3.enorm.weight'") in caplog.text


def test_hf_plan_checks_fp8_scales(tiny_hf_dirs: dict[str, Path]) -> None:
    family, ctx, source = _setup(tiny_hf_dirs["deepseek_v3"])
    name = "model.layers.0.self_attn.o_proj.weight"
    fp8 = {**source, name: HTensor(source[name].shape, torch.float8_e4m3fn)}
    with pytest.raises(ValueError, match=rf"tensor '{name}' is FP8 but its block scale "
                                         rf"'{name}_scale_inv' is missing"):
        check_hf_names(family, ctx, fp8)
    fp8[name + "_scale_inv"] = HTensor((2, 2), torch.float32)
    units = bind(family, check_hf_names(family, ctx, fp8), ctx,
                 _megatron_table(family, ctx, source))
    with pytest.raises(ValueError, match=rf"'{name}_scale_inv' has shape \[2, 2\], expected "
                                         r"\[1, 1\] for 128x128 blocks"):
        check_hf_shapes(units, fp8, (128, 128))
    norm = "model.layers.0.input_layernorm.weight"
    with pytest.raises(ValueError, match=rf"'{norm}' is torch.float8_e4m3fn, but the deepseek_v3 "
                                         "mapping expects no FP8 weight there"):
        check_hf_names(family, ctx, {**source, norm: HTensor((64,), torch.float8_e4m3fn)})


def test_hf_plan_names_a_tensor_whose_shape_contradicts_the_config(
        tiny_hf_dirs: dict[str, Path]) -> None:
    family, ctx, source = _setup(tiny_hf_dirs["llama"])
    table = _megatron_table(family, ctx, source)
    name = "model.layers.1.self_attn.k_proj.weight"
    bad = {**source, name: HTensor((16, 64), torch.float32)}  # one KV head instead of two
    units = bind(family, check_hf_names(family, ctx, bad), ctx, table)
    with pytest.raises(ValueError, match=rf"tensor '{name}' has shape \[16, 64\], but the model "
                                         r"config implies \[32, 64\] \(megatron decoder.layers.1."
                                         r"self_attention.linear_qkv.weight \[128, 64\]\)"):
        check_hf_shapes(units, bad, (128, 128))


def test_hf_plan_refuses_megatron_parameters_no_rule_produces(
        tiny_hf_dirs: dict[str, Path]) -> None:
    family, ctx, source = _setup(tiny_hf_dirs["llama"])
    pairs = check_hf_names(family, ctx, source)
    table = _megatron_table(family, ctx, source)
    extra = {**table, "decoder.layers.0.mlp.router.weight": MTensor((4, 64), torch.float32)}
    with pytest.raises(ValueError, match=r"1 megatron parameter\(s\) are not produced by the "
                                         r"llama mapping: 'decoder.layers.0.mlp.router.weight'"):
        bind(family, pairs, ctx, extra)
    del table["decoder.final_layernorm.weight"]
    with pytest.raises(ValueError, match=r"the megatron model has no parameter "
                                         r"decoder.final_layernorm.weight \(needed for "
                                         r"'model.norm.weight'\)"):
        bind(family, pairs, ctx, table)
