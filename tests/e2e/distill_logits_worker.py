"""Worker of tests/e2e/test_distill.py: logits of a trained megatron checkpoint and of its
Hugging Face export on the same tokens (megatron patches a process globally, so it never runs
inside pytest's own process).

    python distill_logits_worker.py CKPT_ROOT HF_DIR TOKENS...

Prints `RESULT {"max_abs_diff": ..., "logits_std": ..., "hf_class": ...}`: megatron's logits at
TP=1 (build_model + load_checkpoint, the path checkpoint.load_dir takes) against transformers'
on the exported directory, both fp32.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_r1.checkpoint.dist_ckpt import latest_checkpoint, load_checkpoint, read_metadata
from megatron_r1.config.schema import ModelConfig, ParallelConfig, TrainConfig
from megatron_r1.layout import resolve_layout
from megatron_r1.parallel.launch_env import LaunchEnv, free_port


class _Wrapped(torch.nn.Module):
    """load_checkpoint expects DDP-wrapped chunks (`.module`)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def megatron_logits(root: Path, tokens_BS: torch.Tensor) -> torch.Tensor:
    from megatron_r1.model.build import build_model
    from megatron_r1.parallel.init import destroy_parallel, init_parallel

    step = latest_checkpoint(root)
    model = ModelConfig(**read_metadata(step)["model"])
    parallel = ParallelConfig(backend="gloo")
    layout = resolve_layout(parallel, model, TrainConfig(global_batch_size=1, micro_batch_size=1),
                            1, tokens_BS.shape[1])
    ctx = init_parallel(layout, parallel, LaunchEnv("single", 0, 1, 0, "127.0.0.1", free_port()),
                        seed=0)
    try:
        chunks = build_model(model, parallel, ctx, perform_initialization=False)
        load_checkpoint(step, [_Wrapped(c) for c in chunks], None, None, ctx)
        with torch.no_grad():
            positions = torch.arange(tokens_BS.shape[1]).expand_as(tokens_BS)
            logits = chunks[0].eval()(tokens_BS, positions, None)
        return logits[..., : model.vocab_size]
    finally:
        destroy_parallel()


def main() -> None:
    from transformers import AutoModelForCausalLM

    root, hf_dir = Path(sys.argv[1]), Path(sys.argv[2])
    tokens_BS = torch.tensor([[int(t) for t in sys.argv[3:]]])
    ours = megatron_logits(root, tokens_BS)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(tokens_BS).logits
    print("RESULT " + json.dumps({"max_abs_diff": (ours - theirs).abs().max().item(),
                                  "logits_std": theirs.std().item(),
                                  "hf_class": type(hf).__name__}))


if __name__ == "__main__":
    main()
