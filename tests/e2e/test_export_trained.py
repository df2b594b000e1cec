"""A trained policy exports to Hugging Face with `convert mcore-to-hf --ckpt <run>/checkpoints
--out DIR` alone: the run recorded its model config and source in every checkpoint and kept
the tokenizer and generation files in the checkpoint root.

Two origins: (a) a Hugging Face model (tiny Llama with a tokenizer) converted, trained a few
SFT steps, exported: the original config.json and tokenizer come back with the trained
weights; (b) the tiny MoE trained from scratch with the built-in tokenizer (the session's
60-step SFT run), continued by a second run from its checkpoint, exported: transformers builds the Qwen3-MoE model
and loads its tokenizer. Runs use the real CLI in fresh processes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from megatron_r1.data.tokenizer import build_arithmetic_tokenizer
from tests.checkpoint.hf.conftest import VOCAB, build_tiny

from procs import run_module, run_python

SFT = ["sft", "--set", "train.steps=2", "--set", "logging.progress_bar=false",
       "--set", "logging.tensorboard=false"]
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
CLEAN_LOAD = {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(),
              "error_msgs": []}
TEXT = "<think> (3 + 4) * 2 = 14 </think> <answer> 14 </answer>"


def _export(*argvs: list[str]) -> None:
    """`megatron-r1 convert` once per argv, in one fresh interpreter (exit code 0 each)."""
    code = ("import sys\nfrom megatron_r1.convert import main\n"
            f"sys.exit(max(main(argv) for argv in {[list(a) for a in argvs]!r}))\n")
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-6000:]


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _metadata(ckpt_root: Path) -> dict:
    step = ckpt_root / (ckpt_root / "latest").read_text()
    return json.loads((step / "megatron_r1.json").read_text())


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def _load(directory: Path) -> torch.nn.Module:
    model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                       output_loading_info=True)
    assert info == CLEAN_LOAD
    return model


def test_policy_trained_from_a_hugging_face_model_exports_with_no_flags(tmp_path: Path) -> None:
    # The released model: weights, config.json, generation_config.json and a tokenizer.
    hf = tmp_path / "hf"
    build_tiny("llama").save_pretrained(hf)
    tokenizer_dir = tmp_path / "tok"
    build_arithmetic_tokenizer(tokenizer_dir, VOCAB)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, hf)
    _export(["hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "mc")])
    run = tmp_path / "run"
    run_module([*SFT, "--config", str(tmp_path / "mc" / "model.yaml"),
                "--set", f"checkpoint.load_dir={tmp_path / 'mc'}",
                "--set", "checkpoint.load_optimizer=false", "--set", f"data.tokenizer={hf}",
                # 300 tokens leave few merges: the examples need longer sequences.
                "--set", "data.seq_length=256", "--set", f"logging.run_dir={run}"])
    ckpts, out, explicit = run / "checkpoints", tmp_path / "out", tmp_path / "explicit"
    _export(["mcore-to-hf", "--ckpt", str(ckpts), "--out", str(out)],
            ["mcore-to-hf", "--ckpt", str(ckpts), "--out", str(explicit),
             "--config", str(run / "config.yaml"), "--hf-config", str(hf)])

    # The run carried the converted checkpoint's model, source and assets forward.
    converted, trained = _metadata(tmp_path / "mc"), _metadata(ckpts)
    assert trained["step"] == 2
    assert trained["source"] == converted["source"]
    assert trained["source"]["family"] == "llama"
    assert trained["model"] == converted["model"]
    assert _files(ckpts / "hf_assets") == _files(tmp_path / "mc" / "hf_assets")

    # A complete Hugging Face directory: the source's config, its tokenizer and generation
    # config, every weight.
    assert json.loads((out / "config.json").read_text()) == \
        json.loads((hf / "config.json").read_text())
    assert TOKENIZER_FILES | {"generation_config.json"} <= {p.name for p in out.iterdir()}
    for name in TOKENIZER_FILES | {"generation_config.json"}:
        assert (out / name).read_bytes() == (hf / name).read_bytes(), name
    assert AutoTokenizer.from_pretrained(out)(TEXT)["input_ids"] == \
        AutoTokenizer.from_pretrained(hf)(TEXT)["input_ids"]
    model = _load(out)
    assert type(model).__name__ == "LlamaForCausalLM"

    # The trained weights: every tensor moved away from the source, and exactly what an
    # export told the model config and the HF config explicitly writes.
    source, got, told = _weights(hf), _weights(out), _weights(explicit)
    assert sorted(got) == sorted(source) == sorted(told)
    for name, tensor in got.items():
        assert tensor.dtype == source[name].dtype == torch.float32, name
        assert not torch.equal(tensor, source[name]), name
        assert torch.equal(tensor, told[name]), name
    assert (out / "config.json").read_bytes() == (explicit / "config.json").read_bytes()


def test_policy_trained_from_scratch_exports_with_its_own_tokenizer(
        tmp_path: Path, sft_checkpoint: Path) -> None:
    # the first stage: the session's SFT run of the demo model from scratch (tests/e2e/conftest)
    first, second = sft_checkpoint.parent, tmp_path / "second"
    # A second stage starts from the first one's weights (as GRPO from an SFT run).
    run_module([*SFT, "--config", "configs/demo_sft.yaml", "--set", f"logging.run_dir={second}",
                "--set", f"checkpoint.load_dir={first / 'checkpoints'}",
                "--set", "checkpoint.load_optimizer=false"])
    ckpts, out = second / "checkpoints", tmp_path / "out"
    _export(["mcore-to-hf", "--ckpt", str(ckpts), "--out", str(out)])

    # No Hugging Face origin: the family the config maps to, and the run's own tokenizer.
    assert _metadata(first / "checkpoints")["source"] == _metadata(ckpts)["source"] == {
        "format": "megatron-r1", "family": "qwen3_moe"}
    assert _files(ckpts / "hf_assets") == _files(first / "checkpoints" / "hf_assets")
    assert (ckpts / "hf_assets" / "tokenizer.json").read_bytes() == \
        (first / "tokenizer" / "tokenizer.json").read_bytes()
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"  # also readable by transformers 4.x

    model = _load(out)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert model.config.vocab_size == 512 and model.config.num_experts == 4
    tokenizer = AutoTokenizer.from_pretrained(out)
    built_in = AutoTokenizer.from_pretrained(first / "tokenizer")
    ids = tokenizer(TEXT)["input_ids"]
    assert ids == built_in(TEXT)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1:]) == TEXT
    generation = GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
