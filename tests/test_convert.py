"""`megatron-r1 convert`: the command line, input errors that name the tensor or key, and
atomic output (a failed conversion leaves no output directory).

Errors found before megatron is needed (config, names, truncated files, output directory) are
checked in this process; those that need the built model (shapes, memory budget, a checkpoint
of another model) run in one fresh interpreter. Parity, round trips, FP8 and streaming are
proven in tests/checkpoint/hf/test_hf_parity.py.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_r1.convert import add_convert_parser, run_convert

from procs import run_python


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("convert") / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2)).save_pretrained(path)
    return path


def _copy(src: Path, dst: Path, edit: dict[str, torch.Tensor | None] | None = None,
          config: dict | None = None) -> Path:
    """A copy of a model directory with some tensors replaced (None: removed)."""
    dst.mkdir(parents=True)
    tensors = load_file(src / "model.safetensors")
    for name, tensor in (edit or {}).items():
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    save_file(tensors, dst / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    return dst


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-r1")
    add_convert_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_convert_parser_reads_both_directions() -> None:
    args = _parse(["convert", "hf-to-mcore", "--hf", "in", "--out", "out", "--set",
                   "model.params_dtype=bf16", "--memory-budget", "2GiB"])
    assert (args.direction, args.hf, args.out, args.overrides, args.memory_budget) == (
        "hf-to-mcore", "in", "out", ["model.params_dtype=bf16"], "2GiB")
    assert args.handler is run_convert
    args = _parse(["convert", "mcore-to-hf", "--ckpt", "c", "--out", "o", "--fp8", "--dtype",
                   "bf16", "--family", "deepseek_v3", "--max-shard-size", "2GB"])
    assert (args.direction, args.fp8, args.dtype, args.family) == (
        "mcore-to-hf", True, "bf16", "deepseek_v3")


@pytest.mark.parametrize(("case", "message"), [
    ("truncated", r"model.safetensors is truncated: tensor 'model.norm.weight' needs bytes up "
                  r"to \d+ but the file has \d+"),
    ("missing", r"1 tensor\(s\) the llama config requires are missing from the checkpoint: "
                r"'model.layers.1.mlp.up_proj.weight'"),
    ("unexpected", r"1 unexpected tensor\(s\) in the checkpoint \(not in the llama mapping for "
                   r"this config\): 'model.layers.0.self_attn.q_proj.bias'"),
    ("architecture", r"unknown architecture \['GPT2LMHeadModel'\]: supported are "),
    ("contradiction", r"model.hidden_size=48 \(from --config/--set\) contradicts the Hugging "
                      r"Face config, which gives 32"),
    ("occupied", r"output directory .*out already exists and is not empty; refusing to "
                 r"overwrite it"),
    ("budget", r"'lots' is not a size"),
])
def test_convert_input_errors_name_the_problem_and_write_nothing(
        llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str,
        message: str) -> None:
    hf, out, extra = llama_dir, tmp_path / "out", []
    if case == "truncated":
        hf = _copy(llama_dir, tmp_path / "hf")
        file = hf / "model.safetensors"
        file.write_bytes(file.read_bytes()[:-64])  # the last tensor in the file: model.norm
    elif case == "missing":
        hf = _copy(llama_dir, tmp_path / "hf", {"model.layers.1.mlp.up_proj.weight": None})
    elif case == "unexpected":
        hf = _copy(llama_dir, tmp_path / "hf",
                   {"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)})
    elif case == "architecture":
        hf = _copy(llama_dir, tmp_path / "hf", config={"architectures": ["GPT2LMHeadModel"]})
    elif case == "contradiction":
        extra = ["--set", "model.hidden_size=48"]
    elif case == "occupied":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "budget":
        extra = ["--memory-budget", "lots"]
    code = run_convert(_parse(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(out),
                               *extra]))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("megatron-r1 convert hf-to-mcore: error: ") and err.count("\n") == 1
    assert re.search(message, err), err
    if case == "occupied":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_convert_command_line_end_to_end(llama_dir: Path, tmp_path: Path) -> None:
    """One fresh interpreter: a bf16 conversion and its export, then the errors that need the
    built model (a mis-shaped tensor, a too-small budget, a checkpoint of another model)."""
    bad = _copy(llama_dir, tmp_path / "bad", {"model.layers.1.self_attn.k_proj.weight":
                                              torch.zeros(8, 32)})
    code = f"""
import json, sys
from megatron_r1.convert import main
runs = [
    ["hf-to-mcore", "--hf", "{llama_dir}", "--out", "{tmp_path}/mc", "--set",
     "model.params_dtype=bf16"],
    ["mcore-to-hf", "--ckpt", "{tmp_path}/mc", "--out", "{tmp_path}/back", "--dtype", "bf16"],
    ["hf-to-mcore", "--hf", "{bad}", "--out", "{tmp_path}/bad_out"],
    ["hf-to-mcore", "--hf", "{llama_dir}", "--out", "{tmp_path}/small", "--memory-budget", "4KiB"],
    ["mcore-to-hf", "--ckpt", "{tmp_path}/mc/step_0000000", "--out", "{tmp_path}/other",
     "--config", "{tmp_path}/other.yaml"],
]
codes = []
for argv in runs:
    if argv[-1].endswith("other.yaml"):  # the converted model, with a third layer
        import yaml
        cfg = yaml.safe_load(open("{tmp_path}/mc/model.yaml"))
        cfg["model"]["num_layers"] = 3
        yaml.safe_dump(cfg, open("{tmp_path}/other.yaml", "w"))
    codes.append(main(argv))
    print("END", file=sys.stderr)
print(json.dumps(codes))
"""
    proc = run_python(code, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    logs = proc.stderr.split("END\n")
    assert codes == [0, 0, 2, 2, 2], proc.stderr[-4000:]
    # bf16 megatron weights, exported as bf16: the source rounded to bf16, nothing else.
    meta = json.loads((tmp_path / "mc" / "step_0000000" / "megatron_r1.json").read_text())
    assert meta["model"]["params_dtype"] == "bf16"
    source = load_file(llama_dir / "model.safetensors")
    back = {}
    for file in (tmp_path / "back").glob("*.safetensors"):
        back.update(load_file(file))
    assert sorted(back) == sorted(source)
    for name, tensor in source.items():
        assert back[name].dtype == torch.bfloat16
        assert torch.equal(back[name], tensor.to(torch.bfloat16)), name
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"
    assert ("megatron-r1 convert hf-to-mcore: error: tensor "
            "'model.layers.1.self_attn.k_proj.weight' has shape [8, 32], but the model config "
            "implies [16, 32] (megatron decoder.layers.1.self_attention.linear_qkv.weight "
            "[64, 32])") in logs[2]
    assert ("megatron-r1 convert hf-to-mcore: error: megatron parameter "
            "embedding.word_embeddings.weight (from 'model.embed_tokens.weight') needs "
            "89.00 KiB at once, more than the memory budget of 4.00 KiB") in logs[3]
    # Dense layers are stored stacked ([layers, ...]): a third layer shows as a shape error.
    assert ("megatron-r1 convert mcore-to-hf: error: checkpoint tensor "
            "'decoder.layers.self_attention.linear_qkv.layer_norm_weight' has shape [2, 32], "
            "but the model config implies [3, 32]") in logs[4]
    for failed in ("bad_out", "small", "other"):
        assert not (tmp_path / failed).exists()
    assert not list(tmp_path.glob(".*.partial-*"))
    assert "Traceback" not in proc.stderr


def test_export_of_a_checkpoint_that_records_no_model_names_the_flags_it_needs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Training checkpoints of older versions record only step and layout (newer ones export
    with --ckpt/--out alone: tests/e2e/test_export_trained.py)."""
    root, out = tmp_path / "old", tmp_path / "out"
    (root / "step_0000004").mkdir(parents=True)
    (root / "step_0000004" / "megatron_r1.json").write_text(json.dumps(
        {"step": 4, "layout": {"world_size": 1}, "format": "megatron-core torch_dist"}))
    (root / "latest").write_text("step_0000004")
    (tmp_path / "config.yaml").write_text("model:\n  num_layers: 2\n")
    errors = []
    for extra in ([], ["--config", str(tmp_path / "config.yaml")]):
        code = run_convert(_parse(["convert", "mcore-to-hf", "--ckpt", str(root), "--out",
                                   str(out), *extra]))
        assert code == 2
        errors.append(capsys.readouterr().err)
    assert errors == [
        f"megatron-r1 convert mcore-to-hf: error: {root}/step_0000004/megatron_r1.json does not "
        "record the model config (a checkpoint written by training before megatron-r1 recorded "
        "it): pass --config <run_dir>/config.yaml\n",
        "megatron-r1 convert mcore-to-hf: error: cannot tell the model family: pass --hf-config "
        "<HF dir> or --family\n"]
    assert not out.exists()
