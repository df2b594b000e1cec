"""The trainer's live weights as a Hugging Face model, for the rollout engine.

Layer L2 (composes the gather with the per-family Hugging Face maps of checkpoint/hf). Rollout
engines load Hugging Face models, so the engine directory holds the family's config.json and
the tokenizer; its weights arrive from the trainer: every sync gathers the sharded parameters
(resharding/gather.py), and each full parameter passes through the same family rule that
`megatron-r1 convert mcore-to-hf` applies (fused QKV split per head group, gate/up halves,
experts by index, vocabulary padding removed), one bucket at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_r1.checkpoint.hf import FAMILIES
from megatron_r1.checkpoint.hf.plan import MTensor, bind
from megatron_r1.checkpoint.hf.rules import Family, MapContext, expand_rules
from megatron_r1.config.schema import ModelConfig
from megatron_r1.parallel.init import ParallelContext
from megatron_r1.resharding.gather import gather_buckets
from megatron_r1.resharding.plan import GatherPlan, GatherPlanCache


def family_of(model: ModelConfig) -> Family:
    """The Hugging Face family whose architecture this model config describes."""
    if model.multi_latent_attention:
        return FAMILIES["deepseek_v3"]
    if model.is_moe:
        if model.qk_layernorm and not model.moe_shared_expert_size and \
                model.moe_router_score_function == "softmax":
            return FAMILIES["qwen3_moe"]
        raise ValueError("no Hugging Face family for this MoE config: Qwen3-MoE needs "
                         "model.qk_layernorm=true, no shared expert and softmax routing; "
                         "DeepSeek-V3 needs model.multi_latent_attention=true")
    if model.qk_layernorm:
        return FAMILIES["qwen3"]
    # Qwen2/2.5 (e.g. a distillation student): Llama plus q/k/v biases, which Llama's map
    # has no rule for.
    return FAMILIES["qwen2"] if model.add_qkv_bias else FAMILIES["llama"]


class EngineExport:
    """Maps this run's megatron parameters to Hugging Face tensors (built once per run)."""

    def __init__(self, model: ModelConfig, tokenizer: Any, *, bucket_bytes: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.bucket_bytes = bucket_bytes
        self.family = family_of(model)
        self.hf_config: dict[str, Any] = {
            "architectures": [self.family.architectures[0]],
            "model_type": self.family.model_type,
            **self.family.model_to_config(model),
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        self.map_ctx = MapContext(model, self.hf_config)
        self.plans = GatherPlanCache()
        """The weight sync's gather plan, built once per layout."""
        self._units: dict[str, Any] | None = None
        self._bound: GatherPlan | None = None  # the plan _units were bound from

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def write_engine_dir(self, path: str | os.PathLike[str]) -> Path:
        """config.json and the tokenizer (no weights: the engine starts from dummy weights
        and takes the trainer's at the first sync). Written atomically; returns the path."""
        out = Path(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists()
                                    else _mkdir(out.parent)))
        try:
            (tmp / "config.json").write_text(json.dumps(self.hf_config, indent=2) + "\n")
            self.tokenizer.save_pretrained(tmp)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    def _bind(self, plan: GatherPlan) -> dict[str, Any]:
        table = {f.name: MTensor(f.shape, f.dtype) for f in plan.fragments}
        units = bind(self.family, expand_rules(self.family, self.map_ctx), self.map_ctx, table)
        return {unit.mcore: unit for unit in units}

    def hf_buckets(self, model: list[torch.nn.Module], ctx: ParallelContext,
                   **where: Any) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Buckets of (HF name, tensor) on the destination ranks (rank 0 unless `where` says
        otherwise: resharding.gather.gather_buckets's keywords), empty elsewhere; every rank
        must consume the iterator (each bucket is collective). The gather plan is kept from
        sync to sync while the layout holds (resharding.gather.GatherPlanCache)."""
        buckets = gather_buckets(model, ctx, self.bucket_bytes, cache=self.plans, **where)
        if self._units is None or self._bound is not self.plans.plan:
            assert self.plans.plan is not None
            self._units, self._bound = self._bind(self.plans.plan), self.plans.plan
        for bucket in buckets:
            out: list[tuple[str, torch.Tensor]] = []
            for name, tensor in bucket:
                unit = self._units[name]
                out += list(zip(unit.hf, unit.rule.transform.to_hf(tensor, self.map_ctx)))
            yield out


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
