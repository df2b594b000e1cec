"""Config loading: defaults, sparse YAML, --set overrides, type errors naming the key."""

from pathlib import Path

import pytest
import yaml

from megatron_r1.config import (
    Config,
    config_to_dict,
    load_config,
    parse_override,
    write_resolved_config,
)

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_tiny_job():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.num_experts == 4 and cfg.model.num_layers == 2


def test_yaml_is_a_sparse_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  num_layers: 4\ngrpo:\n  kl_coef: 0.0\n")
    cfg = load_config(f)
    assert cfg.model.num_layers == 4
    assert cfg.grpo.kl_coef == 0.0
    assert cfg.model.hidden_size == Config().model.hidden_size


def test_set_overrides_win_over_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.1\n")
    cfg = load_config(f, ["optim.lr=1e-5", "parallel.sequence_parallel=true",
                          "model.moe_router_num_groups=null", "data.path=/x/y.jsonl"])
    assert cfg.optim.lr == pytest.approx(1e-5)
    assert cfg.parallel.sequence_parallel is True
    assert cfg.model.moe_router_num_groups is None
    assert cfg.data.path == "/x/y.jsonl"


def test_on_off_words_survive_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("grpo:\n  fused_loss: off\n")
    assert load_config(f).grpo.fused_loss == "off"
    assert load_config(None, ["grpo.fused_loss=on"]).grpo.fused_loss == "on"


@pytest.mark.parametrize("text", ["model.num_layers", "num_layers=3", "a.b.c=1", ".x=1"])
def test_malformed_set_is_rejected(text):
    with pytest.raises(ValueError, match=r"expected section\.key=value"):
        parse_override(text)


@pytest.mark.parametrize(("override", "message"), [
    ("model.num_layer=3", r"unknown key model.num_layer \(did you mean 'num_layers'\?\)"),
    ("modle.num_layers=3", r"unknown config section 'modle' \(did you mean 'model'\?\)"),
    ("model.num_layers=two", r"model.num_layers: expected int, got str 'two'"),
    ("model.num_layers=2.5", r"model.num_layers: expected int, got float 2.5"),
    ("model.num_layers=true", r"model.num_layers: expected int, got bool True"),
    ("parallel.distributed_optimizer=1", r"parallel.distributed_optimizer: expected bool"),
    ("grpo.kl_estimator=k4", r"grpo.kl_estimator: expected 'k1' \| 'k2' \| 'k3', got str 'k4'"),
    ("model.normalization=rmsnorm", r"model.normalization: expected 'RMSNorm' \| 'LayerNorm'"),
    ("rollout.sleep_level=3", r"rollout.sleep_level: expected 1 \| 2, got int 3"),
    ("optim.lr=fast", r"optim.lr: expected float, got str 'fast'"),
])
def test_wrong_types_and_unknown_keys_name_the_key(override, message):
    with pytest.raises((TypeError, ValueError), match=message):
        load_config(None, [override])


def test_error_names_the_config_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  num_layers: -1\n")
    with pytest.raises(ValueError, match=r"model.num_layers=-1: must be > 0 \(config file .*bad.yaml\)"):
        load_config(f)


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(TypeError, match="expected a mapping of sections"):
        load_config(f)
    f.write_text("model: 3\n")
    with pytest.raises(TypeError, match="config section 'model' must be a mapping"):
        load_config(f)
    f.write_text("model: {num_layers: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(f)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    load_config(REPO / "configs" / name)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.num_layers=3", "optim.lr=0.25"])
    path = write_resolved_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    assert load_config(path) == cfg
    data = yaml.safe_load(path.read_text())
    assert set(data) == set(config_to_dict(cfg))
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temp file left"


def test_base_files_are_merged_key_by_key(tmp_path):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "model.yaml").write_text(
        "model: {num_layers: 4, hidden_size: 96}\noptim: {lr: 0.5}\n")
    (tmp_path / "common" / "wide.yaml").write_text("base: model.yaml\nmodel: {hidden_size: 128}\n")
    run = tmp_path / "run.yaml"
    run.write_text("base: [common/wide.yaml]\nmodel: {num_layers: 6}\ntrain: {steps: 7}\n")
    cfg = load_config(run, ["optim.lr=0.25"])
    # the file wins over its base, the base over its own base, --set over everything
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.optim.lr, cfg.train.steps) == (
        6, 128, 0.25, 7)
    assert load_config(run).optim.lr == 0.5


@pytest.mark.parametrize(("files", "error", "message"), [
    ({"a.yaml": "base: missing.yaml\n"}, FileNotFoundError,
     r"config file not found: .*missing.yaml \(base of .*a.yaml\)"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, ValueError,
     r"config files name each other as base: .*a.yaml -> .*b.yaml -> .*a.yaml"),
    ({"a.yaml": "base: {model: 1}\n"}, TypeError, r"a.yaml: `base` must be a file path or a list"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "model: {num_layerz: 2}\n"}, ValueError,
     r"unknown key model.num_layerz \(did you mean 'num_layers'\?\)"),
])
def test_bad_base_files_are_named(tmp_path, files, error, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(error, match=message):
        load_config(tmp_path / "a.yaml")
