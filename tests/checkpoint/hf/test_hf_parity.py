"""End to end, per family: Hugging Face -> megatron -> logits equal to Hugging Face's at TP=1
and at TP=2 (with EP=2 for MoE), megatron -> Hugging Face bitwise equal to the source and
loaded by transformers without missing or unexpected keys; an FP8 block-quantised DeepSeek-V3
converts to its dequantised weights; conversions stay within their memory budget and leave no
output when they fail.

Tolerance: fp32 logits (std ~1) may differ by at most 1e-4. Both sides compute the same
function in fp32 with different but equivalent operation orders (fused QKV and gate/up GEMMs,
megatron's attention vs SDPA, RMSNorm formulas, expert summation order under EP), which
leaves round-off of ~1e-6; any mapping error (a swapped head, expert or norm, a missing bias,
the wrong rotary layout) moves logits by O(0.1..1), four orders of magnitude above.

The megatron side runs in worker processes (parity_worker.py): one for all conversions and
the TP=1 forwards, one pair of gloo processes for TP=2/EP=2.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from megatron_r1.checkpoint.hf.safetensors_io import SafetensorsCheckpoint

WORKER = Path(__file__).with_name("parity_worker.py")
REPO = Path(__file__).resolve().parents[3]
FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3")
TOL = 1e-4
FP8_BLOCK = 16  # small blocks, so the tiny weights span several blocks and ragged edges
FP8_WEIGHTS = re.compile(r".*\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|"
                         r"up_proj|down_proj)\.weight")


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(WORKER), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{WORKER.name} {args[0]} failed:\n{proc.stderr[-8000:]}")
    return proc


def _state(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _quantize_loop(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Test-side FP8 block quantisation, block by block (independent of the package)."""
    rows, cols = -(-w.shape[0] // FP8_BLOCK), -(-w.shape[1] // FP8_BLOCK)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            r = slice(i * FP8_BLOCK, (i + 1) * FP8_BLOCK)
            c = slice(j * FP8_BLOCK, (j + 1) * FP8_BLOCK)
            scale[i, j] = w[r, c].abs().max() / 448.0
            q[r, c] = (w[r, c] / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def _dequantize_loop(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            r = slice(i * FP8_BLOCK, (i + 1) * FP8_BLOCK)
            c = slice(j * FP8_BLOCK, (j + 1) * FP8_BLOCK)
            out[r, c] = q[r, c].float() * scale[i, j]
    return out


def _make_fp8(root: Path, source: Path) -> None:
    """ROOT/fp8: DeepSeek-V3 with FP8 block weights (+ two MTP tensors, to be skipped);
    ROOT/fp8_ref: the same model with those weights dequantised, in fp32."""
    state = _state(source)
    fp8, ref = {}, {}
    for name, tensor in state.items():
        if FP8_WEIGHTS.fullmatch(name):
            q, scale = _quantize_loop(tensor)
            fp8[name], fp8[name + "_scale_inv"] = q, scale
            ref[name] = _dequantize_loop(q, scale)
        else:
            fp8[name] = ref[name] = tensor
    config = json.loads((source / "config.json").read_text())
    (root / "fp8_ref").mkdir()
    (root / "fp8_ref" / "config.json").write_text(json.dumps(config))
    save_file(ref, root / "fp8_ref" / "model.safetensors")
    fp8["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    fp8["model.layers.3.enorm.weight"] = torch.ones(64)
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                     "quant_method": "fp8",
                                     "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    (root / "fp8").mkdir()
    (root / "fp8" / "config.json").write_text(json.dumps(config))
    save_file(fp8, root / "fp8" / "model.safetensors")


def _make_big(root: Path) -> int:
    """ROOT/big: a ~90 MB Llama whose largest unit is far below its total size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1536,
                                         num_hidden_layers=6, num_attention_heads=8,
                                         num_key_value_heads=8))
    model.save_pretrained(root / "big")
    return sum(p.numel() * 4 for p in model.parameters())


def _hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_hf_dirs: dict[str, Path],
        tokens: torch.Tensor) -> dict[str, Any]:
    """Convert and run everything once; the tests below check the pieces."""
    root = tmp_path_factory.mktemp("parity")
    torch.save(tokens, root / "tokens.pt")
    reference = {}
    for family in FAMILIES:
        (root / family).symlink_to(tiny_hf_dirs[family], target_is_directory=True)
        reference[family] = _hf_logits(root / family, tokens)
    _make_fp8(root, root / "deepseek_v3")
    reference["fp8"] = _hf_logits(root / "fp8_ref", tokens)
    big_bytes = _make_big(root)
    cases = [*FAMILIES, "fp8"]
    convert = _run(["convert", str(root), *cases])
    _run(["parallel", str(root), *cases])
    return {"root": root, "tokens": tokens, "reference": reference, "big_bytes": big_bytes,
            "tp1": torch.load(root / "logits_tp1.pt"), "par": torch.load(root / "logits_par.pt"),
            "results": json.loads((root / "results.json").read_text()), "log": convert.stderr}


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_megatron_logits_match_at_tp1(run: dict[str, Any], family: str) -> None:
    ref = run["reference"][family]
    assert ref.std() > 0.5  # logits large enough for TOL to be a tight relative bound
    assert (run["tp1"][family] - ref).abs().max() < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_megatron_logits_match_at_tp2_ep2(run: dict[str, Any], family: str) -> None:
    assert (run["par"][family] - run["reference"][family]).abs().max() < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_round_trip_is_bitwise(run: dict[str, Any], family: str) -> None:
    root = run["root"]
    source, back = _state(root / family), _state(root / f"back_{family}")
    assert sorted(back) == sorted(source)
    for name, tensor in source.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert len(list((root / f"back_{family}").glob("model-*.safetensors"))) > 1  # sharded
    assert (root / f"back_{family}" / "generation_config.json").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_export_of_a_tp2_ep2_saved_checkpoint_is_bitwise(run: dict[str, Any],
                                                            family: str) -> None:
    """A checkpoint saved by megatron from TP=2 (and EP=2: each rank holds half the experts)
    exports every tensor, bit for bit, as a trained checkpoint is exported."""
    root = run["root"]
    meta = json.loads((root / f"ep_{family}" / "step_0000005" / "megatron_r1.json").read_text())
    assert meta["layout"]["tensor"] == 2 and "model" not in meta
    if family in ("qwen3_moe", "deepseek_v3"):
        assert meta["layout"]["expert"] == 2
    source, back = _state(root / family), _state(root / f"back_ep_{family}")
    assert sorted(back) == sorted(source)
    for name, tensor in source.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_export_loads_in_transformers_without_key_warnings(run: dict[str, Any],
                                                              family: str) -> None:
    model, info = AutoModelForCausalLM.from_pretrained(
        run["root"] / f"back_{family}", dtype=torch.float32, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(),
                    "error_msgs": []}
    with torch.no_grad():
        assert torch.equal(model.eval()(run["tokens"]).logits, run["reference"][family])


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_export_with_a_derived_config_loads_the_same_model(run: dict[str, Any],
                                                              family: str) -> None:
    """Without any Hugging Face config.json (--family only), the exported config is derived
    from the model config: transformers builds the same model from it."""
    model, info = AutoModelForCausalLM.from_pretrained(
        run["root"] / f"back_derived_{family}", dtype=torch.float32, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(),
                    "error_msgs": []}
    with torch.no_grad():
        logits = model.eval()(run["tokens"]).logits
    assert (logits - run["reference"][family]).abs().max() < TOL


def test_hf_converted_checkpoint_records_its_source(run: dict[str, Any]) -> None:
    root = run["root"] / "mc_deepseek_v3"
    assert (root / "latest").read_text() == "step_0000000"
    meta = json.loads((root / "step_0000000" / "megatron_r1.json").read_text())
    assert meta["step"] == 0 and meta["layout"]["world_size"] == 1
    assert meta["model"]["num_experts"] == 8 and meta["model"]["multi_latent_attention"]
    assert meta["source"]["family"] == "deepseek_v3"
    assert meta["source"]["hf_config"]["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (root / "hf_assets" / "generation_config.json").is_file()


def test_hf_fp8_blocks_convert_to_the_dequantised_weights(run: dict[str, Any]) -> None:
    root = run["root"]
    # Per tensor: the plain export equals the test's own dequantisation, bit for bit.
    ref, plain = _state(root / "fp8_ref"), _state(root / "back_fp8")
    assert sorted(plain) == sorted(ref)
    for name, tensor in ref.items():
        assert torch.equal(plain[name], tensor), name
    # And the model: megatron on the FP8 checkpoint = Hugging Face on the dequantised weights.
    assert (run["tp1"]["fp8"] - run["reference"]["fp8"]).abs().max() < TOL
    assert (run["par"]["fp8"] - run["reference"]["fp8"]).abs().max() < TOL
    exported = json.loads((root / "back_fp8" / "config.json").read_text())
    assert "quantization_config" not in exported
    # The MTP layer was skipped, with a log line.
    assert ("skipping 2 tensor(s) (multi-token-prediction (MTP) layer: megatron-r1 trains "
            "without MTP (model.mtp_num_layers=0))") in run["log"]
    assert run["results"]["reports"]["fp8"]["skipped"] == [
        "model.layers.3.eh_proj.weight", "model.layers.3.enorm.weight"]


def test_hf_fp8_export_writes_blocks_with_scales(run: dict[str, Any]) -> None:
    root = run["root"]
    blocks, ref = SafetensorsCheckpoint(root / "back_fp8_blocks"), _state(root / "fp8_ref")
    config = json.loads((root / "back_fp8_blocks" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [FP8_BLOCK, FP8_BLOCK]
    quantised = [n for n in ref if FP8_WEIGHTS.fullmatch(n)]
    assert len(quantised) > 30
    for name in quantised:
        assert blocks.info(name).dtype == torch.float8_e4m3fn
        again = _dequantize_loop(blocks.read(name), blocks.read(name + "_scale_inv"))
        # Re-quantising FP8-representable weights reproduces them (up to the rounding of
        # scale = amax / 448 in fp32).
        assert torch.allclose(again, ref[name], rtol=2**-7, atol=0), name
    assert blocks.info("model.layers.1.mlp.gate.weight").dtype == torch.float32


def test_hf_conversion_streams_within_the_memory_budget(run: dict[str, Any]) -> None:
    memory = run["results"]["memory"]
    budget, model_bytes = memory["budget"], run["big_bytes"]
    assert budget < model_bytes / 2
    for direction in ("hf-to-mcore", "mcore-to-hf"):
        got = memory[direction]
        assert got["bytes_read"] >= model_bytes  # the whole model went through
        assert got["accounted_peak"] <= budget
        # Measured: the process grew by about the accounted peak, never by the model's size
        # (slack for the allocator and Python objects).
        assert got["rss_growth"] < budget + 16 * 1024**2, got


def test_hf_failed_conversion_leaves_no_output(run: dict[str, Any]) -> None:
    failure = run["results"]["failure"]
    assert failure["error"].startswith("simulated I/O error reading ")
    assert failure["reads"] > 5 and failure["left"] == []
