"""Range and cross-field validation of each config section, with the message asserted."""

from pathlib import Path

import pytest

from megatron_r1.config import load_config


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.seq_length=-5"], r"data.seq_length=-5: must be > 0"),
    (["data.seq_length=0"], r"data.seq_length=0: must be > 0"),
    (["rollout.max_new_tokens=-1"], r"rollout.max_new_tokens=-1: must be > 0"),
    (["model.num_query_groups=3"], r"model.num_query_groups=3: must divide num_attention_heads=4"),
    (["model.moe_router_topk=5"], r"model.moe_router_topk=5: cannot exceed model.num_experts=4"),
    (["model.moe_first_dense_layers=2"], r"model.moe_first_dense_layers=2: must be < model.num_layers=2"),
    (["model.moe_router_num_groups=2"], r"must be set together, got 2 and None"),
    (["model.moe_router_num_groups=3", "model.moe_router_group_topk=1"],
     r"model.moe_router_num_groups=3: must divide model.num_experts=4"),
    (["model.position_embedding=yarn"], r"model.position_embedding='yarn': YaRN is supported with"),
    (["model.fp8=e4m3", "model.transformer_impl=local"], r"model.fp8='e4m3': FP8 needs"),
    (["model.hidden_size=66"], r"model.hidden_size=66: must be divisible by num_attention_heads=4"),
    (["optim.min_lr=1.0"], r"optim.min_lr=1.0: cannot exceed optim.lr"),
    (["optim.adam_beta2=1.0"], r"optim.adam_beta2=1.0: must be in \[0, 1\)"),
    (["train.global_batch_size=10"], r"train.global_batch_size=10: must be a multiple of train.micro_batch_size=4"),
    (["grpo.group_size=1"], r"grpo.group_size=1: must be >= 2"),
    (["grpo.clip_low=-0.5"], r"grpo.clip_low=-0.5: must be >= 0"),
    (["train.global_batch_size=48"], r"train.global_batch_size=48 must divide the GRPO rollout grpo.prompts_per_rollout x grpo.group_size = 128"),
    (["rollout.top_p=0"], r"rollout.top_p=0.0: must be in \(0, 1\]"),
    (["data.source=jsonl"], r"data.path=None: is required for source=jsonl"),
    (["data.arithmetic_min_ops=4"], r"data.arithmetic_min_ops=4: cannot exceed data.arithmetic_max_ops=3"),
    (["parallel.overlap_param_gather=true", "parallel.distributed_optimizer=false"],
     r"parallel.overlap_param_gather=True: needs parallel.distributed_optimizer=true"),
    (["parallel.tensor=0"], r"parallel.tensor=0: must be > 0"),
    (["checkpoint.keep_last=-1"], r"checkpoint.keep_last=-1: must be >= 0"),
    (["data.seq_length=8192"], r"data.seq_length=8192: exceeds model.max_position_embeddings=4096"),
    (["rollout.temperature=0"], r"rollout.temperature=0.0: must be > 0: the GRPO loss"),
    (["model.mtp_num_layers=1"], r"model.mtp_num_layers=1: multi-token prediction is not built yet"),
    (["train.max_tokens_per_microbatch=64"], r"train.max_tokens_per_microbatch=64: must be >= data.seq_length=128"),
    (["data.eval_fraction=0.1"], r"data.eval_fraction=0.1: applies to data.source=jsonl only"),
    (["data.source=jsonl", "data.path=x.jsonl", "data.eval_fraction=1.0"], r"data.eval_fraction=1.0: must be in \[0, 1\)"),
    (["data.source=jsonl", "data.path=x.jsonl", "data.eval_path=y.jsonl", "data.eval_fraction=0.1"],
     r"data.eval_fraction=0.1: cannot be combined with data.eval_path"),
    (["rollout.engine=vllm"], r"rollout.engine"),
    (["optim.initial_loss_scale=0"], r"optim.initial_loss_scale=0.0: must be > 0"),
    (["data.cache_dir="], r"data.cache_dir='': must name a directory"),
])
def test_invalid_values_fail_with_the_key_and_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_mla_refuses_grouped_query_heads_even_from_a_merged_base(tmp_path):
    """A GQA base config merged into an MLA one used to crash deep in megatron's attention
    with a shape error; the config names the field instead (and how to unset it)."""
    with pytest.raises(ValueError, match=r"model.num_query_groups=2: must be unset \(null\) "
                                         r"with model.multi_latent_attention=true"):
        load_config("configs/tiny_dsv3_cpu.yaml", ["model.num_query_groups=2"])
    (tmp_path / "gqa.yaml").write_text("model:\n  num_query_groups: 2\n")
    (tmp_path / "mla.yaml").write_text(
        f"base: [gqa.yaml, {Path('configs/tiny_dsv3_cpu.yaml').resolve()}]\n")
    with pytest.raises(ValueError, match=r"model.num_query_groups=2: must be unset"):
        load_config(tmp_path / "mla.yaml")
    (tmp_path / "fixed.yaml").write_text("base: mla.yaml\nmodel:\n  num_query_groups: null\n")
    assert load_config(tmp_path / "fixed.yaml").model.num_query_groups is None
