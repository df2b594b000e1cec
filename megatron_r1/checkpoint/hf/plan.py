"""Bind a family's rules to both sides of one conversion and check them, before any write.

Layer L1 (torch, no megatron: the megatron side arrives as a plain {name: (shape, dtype)}
table taken from the built model). Checks, each an error naming the tensor:
- every Hugging Face tensor a rule needs exists, and every tensor in the source is claimed by a
  rule, is the FP8 scale of a claimed weight, or is skipped on purpose (logged);
- every megatron parameter is produced by exactly one rule (a parameter nobody produces would
  load as garbage: the "experts dropped on export" failure);
- every Hugging Face tensor has the shape the model config implies, computed by running the
  rule's inverse transform on meta tensors of the megatron shape.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from megatron_r1.checkpoint.hf.fp8 import FP8_DTYPE, SCALE_SUFFIX, scale_shape
from megatron_r1.checkpoint.hf.rules import (
    COMMON_SKIPS,
    Family,
    MapContext,
    Pair,
    Rule,
    expand_rules,
)

log = logging.getLogger(__name__)

_MAX_LISTED = 5
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True, slots=True)
class MTensor:
    """A megatron parameter as the built model has it (TP=PP=EP=1)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True, slots=True)
class HTensor:
    """A Hugging Face tensor: shape and dtype (as stored, or as it will be written)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True, slots=True)
class Unit:
    """One megatron parameter, the Hugging Face tensors it is made of, and their shapes."""

    mcore: str
    hf: tuple[str, ...]
    rule: Rule
    mtensor: MTensor
    hf_shapes: tuple[tuple[int, ...], ...]

    @property
    def mcore_bytes(self) -> int:
        return math.prod(self.mtensor.shape) * self.mtensor.dtype.itemsize

    @property
    def numel_hf(self) -> int:
        return sum(math.prod(s) for s in self.hf_shapes)


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def check_hf_names(family: Family, ctx: MapContext, source: Mapping[str, HTensor]) -> list[Pair]:
    """The model's pairs, after checking the source's tensor names (no shapes yet).

    Raises:
        ValueError: missing tensors, unexpected tensors, or an FP8 weight without its scale
            (or a scale without an FP8 weight), naming the tensors.
    """
    pairs = expand_rules(family, ctx)
    claimed: set[str] = set()
    missing: list[str] = []
    for pair in pairs:
        for name in pair.hf:
            if name not in source:
                missing.append(name)
                continue
            claimed.add(name)
            if source[name].dtype in FP8_DTYPES:
                if not pair.rule.fp8:
                    raise ValueError(f"tensor {name!r} is {source[name].dtype}, but the "
                                     f"{family.name} mapping expects no FP8 weight there")
                scale = name + SCALE_SUFFIX
                if scale not in source:
                    raise ValueError(f"tensor {name!r} is FP8 but its block scale {scale!r} is "
                                     "missing")
                claimed.add(scale)
    if missing:
        raise ValueError(f"{len(missing)} tensor(s) the {family.name} config requires are missing "
                         f"from the checkpoint: {_listed(missing)}")
    skips = (*family.skips, *COMMON_SKIPS)
    unexpected: list[str] = []
    skipped: dict[str, list[str]] = {}
    for name in source:
        if name in claimed:
            continue
        reason = next((s.reason for s in skips if s.matches(name, ctx)), None)
        if reason is None:
            unexpected.append(name)
        else:
            skipped.setdefault(reason, []).append(name)
    if unexpected:
        raise ValueError(f"{len(unexpected)} unexpected tensor(s) in the checkpoint (not in the "
                         f"{family.name} mapping for this config): {_listed(unexpected)}")
    for reason, names in skipped.items():
        log.info("skipping %d tensor(s) (%s): %s", len(names), reason, _listed(names))
    return pairs


def bind(family: Family, pairs: Sequence[Pair], ctx: MapContext,
         megatron: Mapping[str, MTensor]) -> list[Unit]:
    """Choose each pair's megatron spelling from the built model and compute HF shapes.

    Raises:
        ValueError: a megatron parameter no rule produces, or a rule whose parameter the
            model lacks (the mapping and megatron-core disagree; names the parameter).
    """
    units, used = [], set()
    for pair in pairs:
        name = next((n for n in pair.mcore if n in megatron), None)
        if name is None:
            raise ValueError(f"the megatron model has no parameter {' or '.join(pair.mcore)} "
                             f"(needed for {_listed(list(pair.hf))}); the {family.name} mapping "
                             "does not match this megatron-core version or model config")
        if name in used:
            raise AssertionError(f"{name} is produced by two rules")
        used.add(name)
        mt = megatron[name]
        shapes = tuple(tuple(t.shape) for t in pair.rule.transform.to_hf(
            torch.empty(mt.shape, dtype=mt.dtype, device="meta"), ctx))
        units.append(Unit(name, pair.hf, pair.rule, mt, shapes))
    orphans = sorted(set(megatron) - used)
    if orphans:
        raise ValueError(f"{len(orphans)} megatron parameter(s) are not produced by the "
                         f"{family.name} mapping: {_listed(orphans)}")
    return units


def check_hf_shapes(units: Sequence[Unit], source: Mapping[str, HTensor],
                    fp8_block: tuple[int, int]) -> None:
    """Every source tensor (and FP8 scale) has the shape the config implies.

    Raises:
        ValueError: naming the tensor, its shape and the expected one.
    """
    for unit in units:
        for name, expected in zip(unit.hf, unit.hf_shapes):
            actual = source[name].shape
            if actual != expected:
                raise ValueError(f"tensor {name!r} has shape {list(actual)}, but the model config "
                                 f"implies {list(expected)} (megatron {unit.mcore} "
                                 f"{list(unit.mtensor.shape)})")
            scale = source.get(name + SCALE_SUFFIX)
            if source[name].dtype in FP8_DTYPES and scale is not None:
                want = scale_shape(expected, fp8_block)
                if scale.shape != want:
                    raise ValueError(f"tensor {name + SCALE_SUFFIX!r} has shape "
                                     f"{list(scale.shape)}, expected {list(want)} for "
                                     f"{fp8_block[0]}x{fp8_block[1]} blocks")


def import_working_bytes(unit: Unit, source: Mapping[str, HTensor]) -> int:
    """Bytes held while one unit is converted HF -> megatron: the source tensors as stored
    (plus a float32 copy of each FP8 weight being dequantised), the assembled tensor and its
    cast to the megatron dtype."""
    held = 0
    for name in unit.hf:
        t = source[name]
        held += math.prod(t.shape) * t.dtype.itemsize
        if t.dtype in FP8_DTYPES:
            held += math.prod(t.shape) * 4
    return held + 2 * unit.mcore_bytes


def export_working_bytes(unit: Unit, out_itemsize: int, fp8: bool = False) -> int:
    """Bytes held while one loaded megatron tensor becomes its HF tensors, beyond the loaded
    tensor itself: the parts made contiguous (at most the megatron bytes again), cast to the
    output dtype, and for an FP8 export a float32 copy, its scaled copy and the result
    (13 bytes per element)."""
    extra = 13 * unit.numel_hf if fp8 and unit.rule.fp8 else 0
    return unit.mcore_bytes + unit.numel_hf * out_itemsize + extra


def export_specs(units: Sequence[Unit], dtype_of: Mapping[str, torch.dtype], fp8: bool,
                 fp8_block: tuple[int, int]) -> list[tuple[str, HTensor]]:
    """(name, tensor) of every HF tensor an export writes, in order (FP8 weights followed by
    their scales)."""
    out = []
    for unit in units:
        for name, shape in zip(unit.hf, unit.hf_shapes):
            if fp8 and unit.rule.fp8 and len(shape) == 2:
                out.append((name, HTensor(shape, FP8_DTYPE)))
                out.append((name + SCALE_SUFFIX, HTensor(scale_shape(shape, fp8_block),
                                                         torch.float32)))
            else:
                out.append((name, HTensor(shape, dtype_of[name])))
    return out
