"""Layout arithmetic: every divisibility rule, checked before any process group exists."""

import pytest
import torch

from megatron_r1.config import load_config
from megatron_r1.layout import padded_vocab_size, resolve_layout


def layout(world, *overrides, seq=128):
    cfg = load_config(None, list(overrides))
    return resolve_layout(cfg.parallel, cfg.model, cfg.train, world, seq)


@pytest.mark.parametrize(("world", "overrides", "expect"), [
    (1, [], dict(data=1, expert_data=1, num_microbatches=4, sequence_parallel=False)),
    (2, ["parallel.tensor=2"], dict(data=1, expert_data=1, expert_tensor=2, sequence_parallel=True)),
    (2, ["parallel.expert=2"], dict(data=2, expert_data=1, num_microbatches=2)),
    (4, ["parallel.expert=2"], dict(data=4, expert_data=2, num_microbatches=1)),
    (4, ["parallel.tensor=2", "parallel.expert=2", "parallel.expert_tensor=1"],
     dict(data=2, expert_data=2, expert_tensor=1)),
    (2, ["parallel.pipeline=2"], dict(data=1, num_microbatches=4)),
    (8, ["parallel.tensor=2", "parallel.pipeline=2", "train.global_batch_size=32"],
     dict(data=2, num_microbatches=4)),
])
def test_valid_layouts(world, overrides, expect):
    got = layout(world, *overrides)
    for key, value in expect.items():
        assert getattr(got, key) == value, key


@pytest.mark.parametrize(("world", "overrides", "message"), [
    (3, ["parallel.tensor=2"], r"parallel.tensor=2 x parallel.pipeline=1 x parallel.context=1 = 2 does not divide the world size 3"),
    (6, ["parallel.expert=4", "model.num_experts=8"],
     r"parallel.expert_tensor=1 x parallel.expert=4 x parallel.pipeline=1 = 4 does not divide the world size 6"),
    (2, ["parallel.tensor=2", "model.moe_ffn_hidden_size=63"],
     r"parallel.expert_tensor=2 does not divide model.moe_ffn_hidden_size=63"),
    (2, ["parallel.tensor=2", "data.seq_length=128"], None),
    (4, ["parallel.expert=4", "model.num_experts=6"], r"parallel.expert=4 does not divide model.num_experts=6"),
    (2, ["parallel.expert=2", "model.num_experts=0"], r"parallel.expert=2: the model has no experts"),
    (2, ["parallel.expert=3"], r"parallel.expert_tensor=1 x parallel.expert=3 x parallel.pipeline=1 = 3 does not divide the world size 2"),
    (4, ["parallel.pipeline=4", "train.global_batch_size=16"], r"model.num_layers=2 is not divisible by parallel.pipeline=4"),
    (2, ["parallel.pipeline=2", "parallel.virtual_pipeline=2"], r"model.num_layers=2 is not divisible by parallel.pipeline=2 x parallel.virtual_pipeline=2"),
    (1, ["parallel.virtual_pipeline=2"], r"parallel.virtual_pipeline=2 needs parallel.pipeline > 1"),
    (8, ["parallel.tensor=8"], r"parallel.tensor=8 does not divide model.num_attention_heads=4"),
    (2, ["parallel.tensor=2", "parallel.sequence_parallel=false"], r"megatron-core requires sequence parallelism for MoE"),
    (2, ["parallel.tensor=2", "model.num_attention_heads=2", "model.hidden_size=64"], None),
    (2, ["parallel.context=2"], r"parallel.context=2: context parallelism is not supported yet"),
    (4, ["train.global_batch_size=8", "train.micro_batch_size=4"], r"train.global_batch_size=8 is not divisible by train.micro_batch_size=4 x data-parallel size 4"),
    # allgather gathers equal token blocks over EP ranks: no per-micro-batch shapes
    (2, ["parallel.expert=2", "parallel.moe_token_dispatcher=allgather", "train.pack_sequences=true"],
     r"train.pack_sequences gives micro-batches of different shapes, which parallel.moe_token_dispatcher=allgather cannot take"),
    (2, ["parallel.pipeline=2", "parallel.moe_token_dispatcher=allgather", "train.max_tokens_per_microbatch=256"],
     r"train.max_tokens_per_microbatch gives micro-batches of different shapes"),
    (2, ["parallel.pipeline=2", "parallel.moe_token_dispatcher=alltoall", "train.pack_sequences=true"], None),
])
def test_invalid_layouts_name_keys_and_values(world, overrides, message):
    if message is None:  # a control: the same shape of layout that is valid
        layout(world, *overrides)
        return
    with pytest.raises(ValueError, match=message):
        layout(world, *overrides)


def test_uniform_shapes_only_where_the_allgather_dispatcher_meets_other_ranks():
    assert layout(2, "parallel.expert=2", "parallel.moe_token_dispatcher=allgather") \
        .uniform_microbatch_shapes
    assert not layout(2, "parallel.tensor=2", "parallel.moe_token_dispatcher=allgather") \
        .uniform_microbatch_shapes  # TP ranks share their batch
    assert not layout(2, "parallel.pipeline=2", "model.num_experts=0",
                      "parallel.moe_token_dispatcher=allgather").uniform_microbatch_shapes
    assert layout(2, "parallel.tensor=2").sequence_multiple == 2


def test_vocab_padding_matches_megatron():
    assert padded_vocab_size(512, 128, 1) == 512
    assert padded_vocab_size(513, 128, 2) == 768
    assert padded_vocab_size(151936, 128, 8) == 152576
    assert padded_vocab_size(129280, 128, 1) == 129280


@pytest.mark.parametrize(("overrides", "message"), [
    (["parallel.first_stage_layers=1"], r"parallel.first_stage_layers=1 needs parallel.pipeline > 1"),
    (["parallel.pipeline=2", "model.num_layers=3"],
     r"model.num_layers=3 is not divisible by parallel.pipeline=2 \(for an uneven split set "
     r"parallel.first_stage_layers"),
    (["parallel.pipeline=2", "model.num_layers=3", "parallel.first_stage_layers=3"],
     r"parallel.first_stage_layers=3 leaves 0 of model.num_layers=3 for 1 middle stages"),
    (["parallel.pipeline=2", "model.num_layers=3", "parallel.first_stage_layers=1",
      "parallel.last_stage_layers=1"],
     r"parallel.first_stage_layers=1, parallel.last_stage_layers=1 leaves 1 of "
     r"model.num_layers=3 for 0 middle stages"),
    (["parallel.pipeline=2", "model.num_layers=6", "parallel.virtual_pipeline=2",
      "parallel.first_stage_layers=3"],
     r"parallel.first_stage_layers=3 is not divisible by parallel.virtual_pipeline=2"),
    (["parallel.pipeline=2", "model.num_layers=3", "parallel.first_stage_layers=1"], None),
])
def test_uneven_pipeline_stages_are_checked_with_the_keys(overrides, message):
    world = 2 if any(o.startswith("parallel.pipeline") for o in overrides) else 1
    if message is None:
        got = layout(world, *overrides)
        assert (got.first_stage_layers, got.last_stage_layers) == (1, None)
        return
    with pytest.raises(ValueError, match=message):
        layout(world, *overrides)


# (num_layers, pipeline, virtual_pipeline, first, last): DeepSeek-V3's 61 layers and small ones.
_SPLITS = [(61, 16, None, 3, 2), (61, 2, None, 31, 30), (61, 4, None, 16, None),
           (61, 4, None, None, 13), (8, 4, 2, 2, 2), (10, 4, 2, 2, None), (8, 4, None, None, None),
           (3, 2, None, 1, None), (12, 3, 2, 2, 2), (61, 8, None, 5, None), (9, 4, None, 2, 2),
           (8, 4, 2, 1, None), (7, 3, None, 2, 2)]


@pytest.mark.parametrize(("num_layers", "pp", "vp", "first", "last"), _SPLITS)
def test_stage_split_is_megatrons(num_layers, pp, vp, first, last):
    """Our pure split (planner and layout check) against megatron-core's own: the same layers
    per stage where its TransformerConfig accepts the split, an error where it refuses."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_r1.layout import pipeline_stage_layers

    def megatron_config():
        return TransformerConfig(num_layers=num_layers, hidden_size=8, num_attention_heads=1,
                                 pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vp,
                                 num_layers_in_first_pipeline_stage=first,
                                 num_layers_in_last_pipeline_stage=last,
                                 pipeline_dtype=torch.float32)

    try:
        cfg = megatron_config()
    except ValueError:
        with pytest.raises(ValueError):
            pipeline_stage_layers(num_layers, pp, vp, first, last)
        return
    theirs = [sum(get_num_layers_to_build(cfg, vp_stage=v if vp else None, pp_rank=r)
                  for v in range(vp or 1)) for r in range(pp)]
    assert pipeline_stage_layers(num_layers, pp, vp, first, last) == theirs
    assert sum(theirs) == num_layers
