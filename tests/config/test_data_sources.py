"""`data.sources` (the SFT mix) in YAML and --set, its errors, and the stage-3 example config."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_r1.cli import main
from megatron_r1.config import load_config, write_resolved_config
from megatron_r1.config.schema import DataConfig, DataSourceConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "configs" / "r1_stage3_sft_mix.yaml"
TWO = "data.sources=[{path: a/reasoning.jsonl, weight: 3}, {path: b.jsonl, weight: 1}]"


def test_yaml_lists_become_typed_sources(tmp_path: Path) -> None:
    f = tmp_path / "mix.yaml"
    f.write_text("data:\n  source: jsonl\n  sources:\n"
                 "    - {path: runs/x/rejection_sampled.jsonl, weight: 3}\n"
                 "    - path: qa.jsonl\n      weight: 1.5\n      name: general\n"
                 "      eval_path: qa_eval.jsonl\n")
    cfg = load_config(f)
    assert cfg.data.sources == (
        DataSourceConfig(path="runs/x/rejection_sampled.jsonl", weight=3.0,
                         name="rejection_sampled"),  # the default name: the file's stem
        DataSourceConfig(path="qa.jsonl", weight=1.5, name="general",
                         eval_path="qa_eval.jsonl"))
    # The resolved config of the run dir loads back to the same config.
    assert load_config(write_resolved_config(cfg, tmp_path / "run")) == cfg


def test_set_replaces_the_list_or_one_field_of_an_item() -> None:
    cfg = load_config(None, ["data.source=jsonl", TWO, "data.sources[1].weight=2",
                             "data.sources[0].name=reasoning"])
    assert [(s.name, s.weight) for s in cfg.data.sources] == [("reasoning", 3.0), ("b", 2.0)]
    with pytest.raises(ValueError, match=r"--set data.sources\[2\].weight: data.sources has 2 "
                                         r"entries"):
        load_config(None, ["data.source=jsonl", TWO, "data.sources[2].weight=2"])


@pytest.mark.parametrize(("override", "error", "message"), [
    ("data.sources[1].weight=0", ValueError,
     r"data.sources\[1\].weight=0.0: must be a finite number > 0"),
    ("data.sources[0].weight=-1", ValueError, r"data.sources\[0\].weight=-1.0: must be"),
    ("data.sources[1].weight=.inf", ValueError, r"data.sources\[1\].weight=inf: must be"),
    ("data.sources[1].weight=heavy", TypeError,
     r"data.sources\[1\].weight: expected float, got str 'heavy'"),
    ("data.sources[1].path=c/reasoning.jsonl", ValueError,
     r"data.sources\[1\].name='reasoning': is taken by an earlier source"),
    ("data.sources[0].name=my data", ValueError,
     r"data.sources\[0\].name='my data': must be letters, digits"),
    ("data.sources[1].path=", ValueError, r"data.sources\[1\].path='': must name a JSONL file"),
    ("data.sources[0].wieght=1", ValueError,
     r"unknown key data.sources\[0\].wieght \(did you mean 'weight'\?\)"),
    ("data.sources=[{path: a.jsonl}]", ValueError, r"data.sources\[0\].weight: required"),
    ("data.sources={path: a.jsonl, weight: 1}", TypeError,
     r"data.sources: expected a list \(each item: a mapping of DataSourceConfig fields\)"),
    ("data.path=x.jsonl", ValueError,
     r"data.path='x.jsonl': must be unset when data.sources is set"),
    ("data.eval_path=x.jsonl", ValueError, r"use data.sources\[i\].eval_path"),
    ("data.source=arithmetic", ValueError,
     r"data.source='arithmetic': must be jsonl when data.sources is set"),
])
def test_bad_sources_are_named(override: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        load_config(None, ["data.source=jsonl", TWO, override])


def test_a_jsonl_source_needs_a_path_or_sources() -> None:
    with pytest.raises(ValueError, match=r"data.path=None: is required for source=jsonl \(or "
                                         r"list data.sources\)"):
        DataConfig(source="jsonl")


def _example_overrides(tmp_path: Path) -> list[str]:
    for name in ("reasoning.jsonl", "general.jsonl"):
        (tmp_path / name).write_text('{"prompt": "p", "completion": "c"}\n')
    return ["--set", f"data.sources[0].path={tmp_path / 'reasoning.jsonl'}",
            "--set", f"data.sources[1].path={tmp_path / 'general.jsonl'}"]


def test_the_stage3_example_loads_and_its_layout_checks(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(EXAMPLE)
    assert [(s.name, s.weight) for s in cfg.data.sources] == [("reasoning", 3.0),
                                                              ("general", 1.0)]
    assert cfg.data.path is None and cfg.data.source == "jsonl"
    args = ["sft", "--config", str(EXAMPLE), *_example_overrides(tmp_path)]
    assert main([*args, "--check-world-size", "512"]) == 0  # the 671B layout
    assert "megatron-r1 sft: config and layout valid for 512 process(es)" in \
        capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "eval", "sample", "rm"])
def test_other_stages_refuse_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     command: str) -> None:
    args = [command, "--config", str(EXAMPLE), *_example_overrides(tmp_path),
            "--check-world-size", "512"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (
        f"megatron-r1 {command}: error: data.sources: only `sft` mixes sources; `{command}` "
        "reads one data file, data.path")
