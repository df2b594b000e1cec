"""Convert checkpoints between Hugging Face safetensors and megatron dist checkpoints.

Layer L3. `hf_to_mcore` and `mcore_to_hf` run in one process of their own (a world of one,
gloo) and stream: one parameter (HF -> mcore) or one budget-sized batch of parameters
(mcore -> HF) is in memory at a time. Everything is checked before the first byte is
written (architecture, config, tensor names, shapes, memory budget), and output is atomic:
it goes into a hidden temporary directory next to the target, renamed into place only when
the whole conversion succeeded; a failure leaves no output directory behind.

A converted checkpoint is a megatron-r1 checkpoint root (`latest` + `step_0000000/`, with
`megatron_r1.json` holding the derived model config and the source Hugging Face config) plus
`model.yaml` (the model section), so `megatron-r1 sft --config <out>/model.yaml --set
checkpoint.load_dir=<out> --set checkpoint.load_optimizer=false` starts from it, at any
TP/PP/EP layout. `hf_assets/` keeps the tokenizer and generation files for the way back.

The way back needs the model config, the Hugging Face config (or at least the family) and the
assets. A converted checkpoint has all three, and a training run carries them forward into
its own checkpoints (megatron_r1.session), so `mcore-to-hf --ckpt <run>/checkpoints --out DIR`
exports a trained policy as it is. --config, --hf-config and --family override what the
checkpoint records, and are needed only for checkpoints that record nothing (written by
training before it recorded its model and source).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from megatron_r1.checkpoint.assets import ASSETS_DIR
from megatron_r1.checkpoint.hf import FAMILIES, family_for
from megatron_r1.checkpoint.hf import hf_config as H
from megatron_r1.checkpoint.hf.budget import (
    MemoryBudget,
    current_rss_bytes,
    format_size,
    parse_size,
    peak_rss_bytes,
)
from megatron_r1.checkpoint.hf.fp8 import (
    DEFAULT_BLOCK,
    SCALE_SUFFIX,
    dequantize_blocks,
    quantize_blocks,
)
from megatron_r1.checkpoint.hf.plan import (
    FP8_DTYPES,
    HTensor,
    Unit,
    bind,
    check_hf_names,
    check_hf_shapes,
    export_specs,
    export_working_bytes,
    import_working_bytes,
)
from megatron_r1.checkpoint.hf.rules import Family, MapContext, expand_rules
from megatron_r1.checkpoint.hf.safetensors_io import (
    DTYPE_NAMES,
    DTYPES,
    SafetensorsCheckpoint,
    ShardedSafetensorsWriter,
    TensorSpec,
)
from megatron_r1.config.loader import (
    config_from_dict,
    load_config,
    parse_override,
    read_config_file,
)
from megatron_r1.config.schema import ModelConfig

log = logging.getLogger(__name__)

# The checkpoint layout of megatron_r1.checkpoint.dist_ckpt (not imported: it loads megatron,
# which input errors should not wait for).
STEP_DIR = "step_0000000"
LATEST_FILE = "latest"
METADATA_FILE = "megatron_r1.json"
MODEL_YAML = "model.yaml"
DEFAULT_BUDGET = 8 * 1024**3
DEFAULT_SHARD = 5 * 1000**3
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_PACKAGE_DIR = Path(__file__).resolve().parent
_DTYPE_ARG = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ConversionReport:
    """What a conversion did and what it cost."""

    direction: Literal["hf-to-mcore", "mcore-to-hf"]
    family: str
    output: str
    tensors_read: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    budget_bytes: int = 0
    accounted_peak_bytes: int = 0
    """Most tensor bytes the converter held at once (what the budget bounds)."""
    rss_start_bytes: int = 0
    """Resident memory of the process before the conversion (interpreter, torch, megatron)."""
    rss_peak_bytes: int = 0
    """Peak resident memory of the process (VmHWM) at the end."""
    skipped: list[str] = field(default_factory=list)

    @property
    def throughput_gbps(self) -> float:
        return max(self.bytes_read, self.bytes_written) / max(self.seconds, 1e-9) / 1e9

    def finish(self, start: float, budget: MemoryBudget) -> ConversionReport:
        """Record the wall time since `start` and the peaks, log the summary; returns self."""
        self.seconds = time.perf_counter() - start
        self.accounted_peak_bytes = budget.peak
        self.rss_peak_bytes = peak_rss_bytes()
        log.info("%s", self.summary())
        return self

    def summary(self) -> str:
        return (f"{self.direction} ({self.family}) -> {self.output}: {self.tensors_read} tensors, "
                f"read {format_size(self.bytes_read)}, wrote {format_size(self.bytes_written)} in "
                f"{self.seconds:.1f} s ({self.throughput_gbps:.3f} GB/s); tensors held at once: "
                f"{format_size(self.accounted_peak_bytes)} of a {format_size(self.budget_bytes)} "
                f"budget; process RSS {format_size(self.rss_start_bytes)} before, peak "
                f"{format_size(self.rss_peak_bytes)}")


# ------------------------------------------------------------------------------ atomic output


def _check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output directory {out} already exists and is not empty; refusing to "
                         "overwrite it")


def _temp_dir_for(out: Path) -> Path:
    """A fresh hidden directory next to `out` (same file system, so the final rename is
    atomic)."""
    _check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()  # empty (checked at the start)
    os.replace(tmp, out)


def _copy_assets(src: Path, dst: Path, *, skip_config: bool) -> list[str]:
    """Copy a model directory's tokenizer/generation files (not weights, index or config)."""
    copied = []
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        name = path.name
        if (not path.is_file() or name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json")
                or (skip_config and name == H.CONFIG_FILE) or name.startswith(".")):
            continue
        shutil.copy2(path, dst / name)
        copied.append(name)
    return copied


# ------------------------------------------------------------------------------ HF -> mcore


def _fp8_block(hf: dict[str, Any]) -> tuple[int, int]:
    block = (hf.get("quantization_config") or {}).get("weight_block_size") or DEFAULT_BLOCK
    return int(block[0]), int(block[1])


def _hf_dtype_record(units: Sequence[Unit], source: dict[str, HTensor]) -> dict[str, str]:
    """{HF name pattern: stored dtype} (one dtype per rule pattern), for the way back."""
    seen: dict[str, set[str]] = {}
    for unit in units:
        for pattern, name in zip(unit.rule.hf_names, unit.hf):
            seen.setdefault(pattern, set()).add(DTYPE_NAMES[source[name].dtype])
    return {p: next(iter(d)) for p, d in seen.items() if len(d) == 1}


def hf_to_mcore(hf_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                model: ModelConfig | None = None, explicit: frozenset[str] = frozenset(),
                memory_budget: int = DEFAULT_BUDGET,
                file_bytes: int = 4 * 1024**3) -> ConversionReport:
    """Convert a Hugging Face checkpoint directory into a megatron-r1 checkpoint root.

    Args:
        model: base model config (defaults + the user's --config/--set); its architecture
            fields are replaced by those derived from the HF config.json.
        explicit: model fields the user set explicitly (a contradiction is an error).
        memory_budget: bytes of tensors the converter may hold at once.
        file_bytes: approximate size of each data file of the dist checkpoint.

    Raises:
        ValueError: unknown architecture, unsupported config, missing/unexpected/mis-shaped
            or truncated tensors, a parameter larger than the budget (each names the tensor
            or key); nothing is written then.
        FileNotFoundError: no config.json or no safetensors files.
    """
    start, rss_start = time.perf_counter(), current_rss_bytes()
    hf_dir, out = Path(hf_dir), Path(out_dir)
    hf = H.read_hf_config(hf_dir)
    family = family_for(hf)
    checkpoint = SafetensorsCheckpoint(hf_dir)
    model_cfg = H.derive_model_config(family.config_to_model(hf), hf, model or ModelConfig(),
                                      set(explicit))
    ctx = MapContext(model_cfg, hf)
    source = {n: HTensor(checkpoint.info(n).shape, checkpoint.info(n).dtype)
              for n in checkpoint.names()}
    _check_output(out)
    pairs = check_hf_names(family, ctx, source)
    block = _fp8_block(hf)
    budget = MemoryBudget(memory_budget)
    report = ConversionReport("hf-to-mcore", family.name, str(out), budget_bytes=memory_budget,
                              rss_start_bytes=rss_start)
    report.skipped = sorted(set(source) - {n for p in pairs for n in p.hf}
                            - {n + SCALE_SUFFIX for p in pairs for n in p.hf})

    from megatron_r1.checkpoint.hf import mcore_io  # L2: megatron.core, only once input is sane

    pctx = mcore_io.start_single_process(model_cfg)
    tmp: Path | None = None
    try:
        template = mcore_io.model_template(model_cfg, pctx)
        units = bind(family, pairs, ctx, mcore_io.parameter_table(template))
        check_hf_shapes(units, source, block)
        for unit in units:
            budget.check_fits(import_working_bytes(unit, source),
                              f"megatron parameter {unit.mcore} (from {unit.hf[0]!r})")
        by_name = {u.mcore: u for u in units}
        tmp = _temp_dir_for(out)
        step = tmp / STEP_DIR
        step.mkdir()

        def produce(name: str) -> torch.Tensor:
            unit = by_name[name]
            parts = []
            for hf_name in unit.hf:
                t = checkpoint.read(hf_name)
                report.bytes_read += t.numel() * t.element_size()
                report.tensors_read += 1
                if t.dtype in FP8_DTYPES:
                    scale = checkpoint.read(hf_name + SCALE_SUFFIX)
                    report.bytes_read += scale.numel() * scale.element_size()
                    t = dequantize_blocks(t, scale, unit.mtensor.dtype, block, hf_name)
                parts.append(t)
            tensor = unit.rule.transform.to_mcore(parts, ctx).to(unit.mtensor.dtype).contiguous()
            assert tuple(tensor.shape) == unit.mtensor.shape, (name, tensor.shape)
            report.bytes_written += tensor.numel() * tensor.element_size()
            return tensor

        def working_bytes(name: str) -> int:
            return import_working_bytes(by_name[name], source)

        mcore_io.save_streaming(template, step, produce, working_bytes, budget,
                                file_bytes=file_bytes, common={"trainer": {}})
        metadata = {
            "step": 0, "layout": dataclasses.asdict(pctx.layout), "saved_at": time.time(),
            "format": "megatron-core torch_dist",
            "model": dataclasses.asdict(model_cfg),
            "source": {"format": "huggingface", "family": family.name, "hf_config": hf,
                       "hf_dtypes": _hf_dtype_record(units, source),
                       "fp8_block": list(block) if any(
                           t.dtype in FP8_DTYPES for t in source.values()) else None,
                       "skipped": report.skipped, "path": str(hf_dir.resolve())},
        }
        (step / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
        (tmp / LATEST_FILE).write_text(STEP_DIR)
        # `--config <out>/model.yaml` gives a training run this architecture.
        (tmp / MODEL_YAML).write_text(yaml.safe_dump({"model": dataclasses.asdict(model_cfg)},
                                                     sort_keys=False))
        _copy_assets(hf_dir, tmp / ASSETS_DIR, skip_config=True)
        _publish(tmp, out)
        tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        mcore_io.stop_single_process()
    return report.finish(start, budget)


# ------------------------------------------------------------------------------ mcore -> HF


def _resolve_step(ckpt: Path) -> Path:
    marker = ckpt / LATEST_FILE
    if marker.is_file():
        step = ckpt / marker.read_text().strip()
        if not (step / METADATA_FILE).is_file():
            raise FileNotFoundError(f"{marker} points to {step}, which is not a complete "
                                    f"checkpoint (no {METADATA_FILE})")
        return step
    if (ckpt / METADATA_FILE).is_file():
        return ckpt
    raise FileNotFoundError(f"{ckpt}: not a megatron-r1 checkpoint (neither a `latest` marker "
                            f"nor {METADATA_FILE})")


def _export_hf_config(family: Family, model: ModelConfig, base: dict[str, Any] | None,
                      dtype: torch.dtype, fp8_block: tuple[int, int] | None) -> dict[str, Any]:
    if base is None:
        cfg: dict[str, Any] = {"architectures": [family.architectures[0]],
                               "model_type": family.model_type, **family.model_to_config(model)}
    else:
        cfg = dict(base)
        derived = family.config_to_model(cfg)
        wrong = [k for k in H.ARCH_FIELDS if not H._same(derived[k], getattr(model, k))]
        if wrong:
            k = wrong[0]
            raise ValueError(f"the checkpoint's model config (model.{k}={getattr(model, k)!r}) "
                             f"does not match its Hugging Face config ({derived[k]!r}); pass "
                             "the matching --hf-config")
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    cfg["dtype" if "dtype" in cfg else "torch_dtype"] = name
    cfg.pop("quantization_config", None)
    if fp8_block is not None:
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                      "quant_method": "fp8",
                                      "weight_block_size": list(fp8_block)}
    return cfg


def mcore_to_hf(ckpt: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                model: ModelConfig | None = None, hf_config_dir: str | os.PathLike[str] | None = None,
                family_name: str | None = None, dtype: torch.dtype | None = None,
                fp8: bool = False, memory_budget: int = DEFAULT_BUDGET,
                max_shard_bytes: int = DEFAULT_SHARD) -> ConversionReport:
    """Export a megatron-r1 checkpoint (converted or trained, any layout) to Hugging Face.

    The model config, the source Hugging Face config (or family) and the tokenizer and
    generation files come from the checkpoint (megatron_r1.json, `<root>/hf_assets/`); the
    arguments below override them, and are needed only where the checkpoint lacks them.

    Args:
        ckpt: a checkpoint root (with `latest`) or a step directory.
        model: the model config (default: the one megatron_r1.json records; older training
            checkpoints record none: pass the run's config.yaml).
        hf_config_dir: a Hugging Face directory whose config.json and tokenizer files to use
            instead of the recorded source config and the root's hf_assets.
        family_name: the family, when neither hf_config_dir nor the checkpoint's source
            config names it.
        dtype: dtype of the exported tensors (default: as the source checkpoint stored them,
            else the megatron dtype).
        fp8: write the family's linear weights as FP8 128x128 blocks with `weight_scale_inv`.
        max_shard_bytes: size limit of each safetensors shard.

    Raises:
        ValueError / FileNotFoundError: bad input (names the file, key or tensor); nothing is
            written then.
    """
    start, rss_start = time.perf_counter(), current_rss_bytes()
    out = Path(out_dir)
    step = _resolve_step(Path(ckpt))
    meta = json.loads((step / METADATA_FILE).read_text())
    if "reward_model" in meta:  # a scalar head, no LM head: no causal-LM family holds it
        raise ValueError(f"{step} is a reward model (`megatron-r1 rm`: a scalar head instead of "
                         "the LM head); exporting reward models to Hugging Face is not supported")
    src = meta.get("source") or {}
    if model is None:
        if "model" not in meta:
            raise ValueError(f"{step / METADATA_FILE} does not record the model config (a "
                             "checkpoint written by training before megatron-r1 recorded it): "
                             "pass --config <run_dir>/config.yaml")
        model = config_from_dict({"model": meta["model"]}).model  # validated, keys named
    hf_base = src.get("hf_config")
    assets = step.parent / ASSETS_DIR
    if hf_config_dir is not None:
        hf_base, assets = H.read_hf_config(hf_config_dir), Path(hf_config_dir)
    if hf_base is not None:
        family = family_for(hf_base)
    elif family_name or src.get("family"):
        name = family_name or src["family"]
        if name not in FAMILIES:
            raise ValueError(f"unknown family {name!r}: known are {', '.join(FAMILIES)}")
        family = FAMILIES[name]
    else:
        raise ValueError("cannot tell the model family: pass --hf-config <HF dir> or --family")
    recorded = src.get("hf_dtypes") or {}
    block = (src.get("fp8_block") or DEFAULT_BLOCK)[0], (src.get("fp8_block") or DEFAULT_BLOCK)[1]
    _check_output(out)
    ctx = MapContext(model, hf_base or family.model_to_config(model))
    budget = MemoryBudget(memory_budget)
    report = ConversionReport("mcore-to-hf", family.name, str(out), budget_bytes=memory_budget,
                              rss_start_bytes=rss_start)

    from megatron_r1.checkpoint.hf import mcore_io

    pctx = mcore_io.start_single_process(model)
    tmp: Path | None = None
    writer: ShardedSafetensorsWriter | None = None
    try:
        template = mcore_io.model_template(model, pctx)
        units = bind(family, expand_rules(family, ctx), ctx, mcore_io.parameter_table(template))
        reader = mcore_io.CheckpointReader(step)
        reader.check(template)
        config_dtype = dtype or _config_dtype(hf_base) or units[0].mtensor.dtype
        dtype_of = _export_dtypes(units, recorded, dtype, config_dtype)
        specs = export_specs(units, dtype_of, fp8, block)
        work = {u.mcore: export_working_bytes(u, max(dtype_of[n].itemsize for n in u.hf), fp8)
                for u in units}
        # torch.load of one stored chunk, held while it is copied into its destination.
        reserve = reader.max_chunk_bytes
        for unit in units:
            budget.check_fits(reserve + unit.mcore_bytes + work[unit.mcore],
                              f"megatron parameter {unit.mcore} (with a stored chunk of "
                              f"{format_size(reserve)} being read)")
        tmp = _temp_dir_for(out)
        writer = ShardedSafetensorsWriter(tmp, [TensorSpec(n, t.dtype, t.shape) for n, t in specs],
                                          max_shard_bytes)
        for batch in _batches(units, work, budget.limit - reserve):
            need = sum(u.mcore_bytes for u in batch)
            with budget.hold(need + reserve, f"batch of {len(batch)} parameters from "
                                             f"{batch[0].mcore}"):
                loaded = reader.load(template, [u.mcore for u in batch])
                report.tensors_read += len(batch)
                report.bytes_read += need
                for unit in batch:
                    tensor = loaded.pop(unit.mcore)
                    with budget.hold(work[unit.mcore], unit.hf[0]):
                        for name, part in zip(unit.hf, unit.rule.transform.to_hf(tensor, ctx)):
                            report.bytes_written += _write_hf(writer, name, part, dtype_of[name],
                                                              fp8 and unit.rule.fp8, block)
                    del tensor
        writer.close()
        hf_out = _export_hf_config(family, model, hf_base, config_dtype, block if fp8 else None)
        (tmp / H.CONFIG_FILE).write_text(json.dumps(hf_out, indent=2) + "\n")
        if assets.is_dir():
            _copy_assets(assets, tmp, skip_config=True)
        _publish(tmp, out)
        tmp = None
    finally:
        if writer is not None and tmp is not None:
            writer.abort()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        mcore_io.stop_single_process()
    return report.finish(start, budget)


def _export_dtypes(units: Sequence[Unit], recorded: dict[str, str], forced: torch.dtype | None,
                   config_dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Dtype of each exported HF tensor: --dtype if given, else what the source stored
    (FP8 sources: the config's dtype), else the megatron parameter's dtype."""
    dtype_of = {}
    for unit in units:
        for pattern, name in zip(unit.rule.hf_names, unit.hf):
            stored = DTYPES.get(recorded.get(pattern, ""))
            if forced is not None:
                dtype_of[name] = forced
            elif stored is not None:
                dtype_of[name] = config_dtype if stored in FP8_DTYPES else stored
            else:
                dtype_of[name] = unit.mtensor.dtype
    return dtype_of


def _config_dtype(hf: dict[str, Any] | None) -> torch.dtype | None:
    name = H.hf_dtype(hf or {})
    return {"float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}.get(name or "")


def _batches(units: Sequence[Unit], work: dict[str, int], limit: int) -> list[list[Unit]]:
    """Consecutive units grouped so that a group's megatron tensors plus the largest working
    set of converting one of them to HF stay within `limit` (one read per group)."""
    batches: list[list[Unit]] = [[]]
    size = widest = 0
    for unit in units:
        w = work[unit.mcore]
        if batches[-1] and size + unit.mcore_bytes + max(widest, w) > limit:
            batches.append([])
            size = widest = 0
        batches[-1].append(unit)
        size += unit.mcore_bytes
        widest = max(widest, w)
    return batches


def _write_hf(writer: ShardedSafetensorsWriter, name: str, tensor: torch.Tensor,
              dtype: torch.dtype, fp8: bool, block: tuple[int, int]) -> int:
    if fp8 and tensor.dim() == 2:
        q, scale = quantize_blocks(tensor, block)
        writer.write(name, q)
        writer.write(name + SCALE_SUFFIX, scale)
        return q.numel() + scale.numel() * 4
    tensor = tensor.to(dtype).contiguous()
    writer.write(name, tensor)
    return tensor.numel() * tensor.element_size()


# ------------------------------------------------------------------------------ command line


def _explicit_model_keys(config: str | None, overrides: Sequence[str]) -> frozenset[str]:
    """Model fields the user set in --config or --set (their values must agree with HF)."""
    keys: set[str] = set()
    if config is not None and Path(config).is_file():
        data = read_config_file(config)
        if isinstance(data.get("model"), dict):
            keys |= set(data["model"])
    for text in overrides:
        section, key, _ = parse_override(text)
        if section == "model":
            keys.add(key)
    return frozenset(keys)


def _model_section(config: str) -> ModelConfig:
    """The model section of a run's config.yaml (other sections are not needed, and may come
    from another version of the schema)."""
    path = Path(config)
    data = read_config_file(path)
    if not isinstance(data.get("model"), dict):
        raise ValueError(f"{path}: no `model` section")
    return config_from_dict({"model": data["model"]}).model


def add_convert_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `convert hf-to-mcore | mcore-to-hf` to the megatron-r1 command line; the parsed
    namespace carries `handler` (run_convert)."""
    convert = subparsers.add_parser(
        "convert", help="convert checkpoints between Hugging Face and megatron",
        description="Convert Hugging Face checkpoints to megatron dist checkpoints and back, "
                    "streaming within a memory budget.")
    sub = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    budget_help = "tensor bytes held at once, e.g. 8GiB (default 8GiB)"
    h2m = sub.add_parser("hf-to-mcore", help="Hugging Face safetensors -> megatron-r1 checkpoint")
    h2m.add_argument("--hf", required=True, metavar="DIR", help="Hugging Face model directory")
    h2m.add_argument("--out", required=True, metavar="DIR", help="checkpoint root to create")
    h2m.add_argument("--config", metavar="YAML",
                     help="sparse YAML override (e.g. model.params_dtype); the architecture "
                          "comes from the Hugging Face config.json")
    h2m.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="SECTION.KEY=VALUE", help="override one config value; repeatable")
    h2m.add_argument("--memory-budget", default="8GiB", metavar="SIZE", help=budget_help)
    m2h = sub.add_parser("mcore-to-hf", help="megatron-r1 checkpoint -> Hugging Face safetensors")
    m2h.add_argument("--ckpt", required=True, metavar="DIR",
                     help="checkpoint root (with `latest`) or step directory")
    m2h.add_argument("--out", required=True, metavar="DIR", help="Hugging Face directory to create")
    m2h.add_argument("--config", metavar="YAML",
                     help="a run's config.yaml, whose model section overrides the one the "
                          "checkpoint records (needed only for training checkpoints that "
                          "record none)")
    m2h.add_argument("--hf-config", metavar="DIR",
                     help="Hugging Face directory to take config.json and tokenizer files "
                          "from (default: those the checkpoint carries)")
    m2h.add_argument("--family", choices=sorted(FAMILIES),
                     help="model family, when neither the checkpoint nor --hf-config tells")
    m2h.add_argument("--dtype", choices=sorted(_DTYPE_ARG),
                     help="dtype of the exported tensors (default: the source's)")
    m2h.add_argument("--fp8", action="store_true",
                     help="write linear weights as FP8 128x128 blocks (DeepSeek-V3 release format)")
    m2h.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                     help="size limit of each safetensors shard (default 5GB)")
    m2h.add_argument("--memory-budget", default="8GiB", metavar="SIZE", help=budget_help)
    convert.set_defaults(handler=run_convert)
    return convert


def run_convert(args: argparse.Namespace) -> int:
    """Run a parsed `convert` command; input errors print one line and return 2."""
    try:
        budget = parse_size(args.memory_budget)
        if args.direction == "hf-to-mcore":
            cfg = load_config(args.config, args.overrides)
            hf_to_mcore(args.hf, args.out, model=cfg.model, memory_budget=budget,
                        explicit=_explicit_model_keys(args.config, args.overrides))
        else:
            model = _model_section(args.config) if args.config else None
            mcore_to_hf(args.ckpt, args.out, model=model, hf_config_dir=args.hf_config,
                        family_name=args.family,
                        dtype=_DTYPE_ARG[args.dtype] if args.dtype else None, fp8=args.fp8,
                        memory_budget=budget, max_shard_bytes=parse_size(args.max_shard_size))
    except (ValueError, TypeError, FileNotFoundError) as err:
        if not _raised_by_us(err):
            raise
        print(f"megatron-r1 convert {args.direction}: error: {err}", file=sys.stderr)
        return 2
    return 0


def _raised_by_us(err: BaseException) -> bool:
    """Our own checks speak to users; an error from inside torch or megatron is a bug to
    trace (the rule of megatron_r1.cli, by file, so it holds under `python -m` too)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    origin = Path(tb.tb_frame.f_code.co_filename).resolve() if tb is not None else None
    return origin is not None and _PACKAGE_DIR in origin.parents


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m megatron_r1.convert hf-to-mcore ...` (the same as `megatron-r1 convert`)."""
    parser = argparse.ArgumentParser(prog="megatron-r1")
    add_convert_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    return run_convert(args)


if __name__ == "__main__":
    sys.exit(main())
