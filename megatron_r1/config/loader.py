"""Build a Config from defaults, a sparse YAML file and `--set section.key=value` overrides.

A YAML file may start from other files: a top-level `base: other.yaml` (or a list of them,
applied in order; paths relative to the file) is read first, and the file's own keys override
it key by key within each section, so a family of runs shares one model section instead of
repeating it.

Layer L0. Values are checked against the dataclass annotations here (type errors name the
key); a `tuple[X, ...]` field takes a YAML list and a dataclass item a mapping, named by index
(`data.sources[1].weight`), and `--set section.key[i].field=value` changes one field of an
item. Range and cross-field rules live in each section's __post_init__ (schema.py). The
resolved config is written into the run directory atomically (temp file, then rename).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from megatron_r1.config.schema import Config

# PyYAML follows YAML 1.1, which reads `1e-3` (no dot) as a string; accept it for floats.
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _known(names: typing.Iterable[str], bad: str) -> str:
    names = sorted(names)
    close = difflib.get_close_matches(bad, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; known: {', '.join(names)}"


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(_describe(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is tuple:
        return f"a list (each item: {_describe(typing.get_args(annotation)[0])})"
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return f"a mapping of {annotation.__name__} fields"
    return getattr(annotation, "__name__", str(annotation))


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Return `value` as the annotated type, or raise TypeError naming `where`."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, where)
            except TypeError:
                continue
    elif origin is Literal:
        options = typing.get_args(annotation)
        if isinstance(value, bool) and {"on", "off"} <= set(options):
            # YAML 1.1 reads a bare `on`/`off` as a boolean; these fields mean the words.
            value = "on" if value else "off"
        if value in options and type(value) in {
                type(a) for a in typing.get_args(annotation)}:
            return value
    elif annotation is type(None):
        if value is None:
            return None
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif origin is tuple and typing.get_args(annotation)[1:] == (Ellipsis,):
        # A YAML list becomes a tuple (the sections stay hashable), each item checked and
        # named by its index: `data.sources[1].weight`.
        if isinstance(value, list | tuple):
            item = typing.get_args(annotation)[0]
            return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    elif dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        if isinstance(value, dict):
            return _build_section(annotation, value, where)
    else:  # pragma: no cover - a schema field of a type this loader does not know
        raise AssertionError(f"unsupported annotation {annotation!r} for {where}")
    raise TypeError(f"{where}: expected {_describe(annotation)}, got {type(value).__name__} "
                    f"{value!r}")


def _build_section(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"unknown key {section}.{key}{_known(fields, key)}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    for f in dataclasses.fields(cls):  # sections have defaults; list items may not
        if (f.name not in kwargs and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING):
            raise ValueError(f"{section}.{f.name}: required, missing")
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a {section: {key: value}} mapping (sparse)."""
    if not isinstance(data, dict):
        raise TypeError(f"config must be a mapping of sections, got {type(data).__name__}")
    section_types = typing.get_type_hints(Config)
    sections = {}
    for section, values in data.items():
        if section not in section_types:
            raise ValueError(f"unknown config section {section!r}{_known(section_types, section)}")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise TypeError(f"config section {section!r} must be a mapping of keys, got "
                            f"{type(values).__name__} {values!r}")
        sections[section] = _build_section(section_types[section], values, section)
    return Config(**sections)


_OVERRIDE_RE = re.compile(r"^(\w+)\.(\w+(?:\[\d+\]\.\w+)?)$")
_ITEM_KEY_RE = re.compile(r"^(\w+)\[(\d+)\]\.(\w+)$")


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split `section.key=value` into its parts; the value is parsed as YAML (`true`, `3`,
    `0.5`, `null`, `[1, 2]`, `[{path: a.jsonl, weight: 3}]` become typed values; anything else
    stays a string). The key may name one field of a list item, `data.sources[1].weight=2`
    (key `sources[1].weight`)."""
    path, sep, raw = text.partition("=")
    match = _OVERRIDE_RE.match(path.strip())
    if not sep or match is None:
        raise ValueError(f"--set {text!r}: expected section.key=value, e.g. grpo.kl_coef=0.001 "
                         "(or section.key[i].field=value for an item of a list)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return match.group(1), match.group(2), value


def _apply_override(section: str, values: dict[str, Any], key: str, value: Any) -> None:
    """Set `key` of a section's sparse values; `name[i].field` sets one field of item i of
    the list the file (or an earlier --set) gave `name`."""
    item = _ITEM_KEY_RE.match(key)
    if item is None:
        values[key] = value
        return
    name, index, field = item.group(1), int(item.group(2)), item.group(3)
    items = values.get(name)
    if not isinstance(items, list) or not index < len(items) or not isinstance(items[index],
                                                                              dict):
        count = len(items) if isinstance(items, list) else 0
        raise ValueError(f"--set {section}.{key}: {section}.{name} has {count} entries (from "
                         f"the config file and earlier --set); set the whole list with "
                         f"--set {section}.{name}=[...]")
    items = list(items)  # the file's list is not changed in place
    items[index] = {**items[index], field: value}
    values[name] = items


BASE_KEY = "base"


def read_config_file(path: str | os.PathLike[str],
                     _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The sparse {section: {key: value}} mapping of a YAML config file, its `base` files
    merged in (theirs first, then this file's keys). Not validated against the schema.

    Raises:
        FileNotFoundError / ValueError / TypeError: naming the file (and the chain of bases
            that led to it) for a missing file, bad YAML, a non-mapping, a bad `base` entry or
            a cycle of bases.
    """
    file = Path(path)
    via = "".join(f" (base of {p})" for p in reversed(_chain))
    if not file.is_file():
        raise FileNotFoundError(f"config file not found: {file}{via}")
    resolved = file.resolve()
    if resolved in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, resolved))
        raise ValueError(f"config files name each other as base: {cycle}")
    try:
        loaded = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{file}: not valid YAML: {err}") from err
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise TypeError(f"{file}: expected a mapping of sections, got {type(loaded).__name__}")
    bases = loaded.pop(BASE_KEY, None)
    if bases is None:
        return loaded
    if isinstance(bases, str):
        bases = [bases]
    if not (isinstance(bases, list) and bases and all(isinstance(b, str) for b in bases)):
        raise TypeError(f"{file}: `{BASE_KEY}` must be a file path or a list of them, got "
                        f"{bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        _merge(merged, read_config_file(file.parent / base, (*_chain, resolved)))
    _merge(merged, loaded)
    return merged


def _merge(into: dict[str, Any], data: dict[str, Any]) -> None:
    """Section by section, key by key: `data` wins; a section that is not a mapping is left
    for config_from_dict to reject with its own message."""
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(into.get(section), dict):
            into[section] = {**into[section], **values}
        else:
            into[section] = values


def load_config(path: str | os.PathLike[str] | None = None,
                overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at `path` (if any, its bases first), then each
    `section.key=value`."""
    data: dict[str, Any] = read_config_file(path) if path is not None else {}
    for text in overrides:
        section, key, value = parse_override(text)
        section_values = data.setdefault(section, {})
        if not isinstance(section_values, dict):
            raise TypeError(f"config section {section!r} must be a mapping of keys")
        _apply_override(section, section_values, key, value)
    try:
        return config_from_dict(data)
    except (TypeError, ValueError) as err:
        origin = f" (config file {path})" if path is not None else ""
        raise type(err)(f"{err}{origin}") from err


def config_to_dict(config: Config) -> dict[str, Any]:
    """The fully resolved config as plain data (every field, defaults included)."""
    return dataclasses.asdict(config)


def write_resolved_config(config: Config, run_dir: str | os.PathLike[str]) -> Path:
    """Write <run_dir>/config.yaml atomically and return its path."""
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "config.yaml"
    fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".yaml", dir=out)
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(config_to_dict(config), f, sort_keys=False)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
