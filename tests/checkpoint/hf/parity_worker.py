"""Worker processes of the conversion tests (megatron patches a process globally, so it never
runs inside pytest's own process).

    python parity_worker.py convert ROOT CASE...
        For each case: convert ROOT/<case> (a Hugging Face directory) to ROOT/mc_<case>, export
        it back to ROOT/back_<case>, then load ROOT/mc_<case> at TP=1 through build_model +
        load_checkpoint (the path `checkpoint.load_dir` takes) and save its logits on
        ROOT/tokens.pt to ROOT/logits_tp1.pt. Case `fp8` (FP8 block-quantised) is also
        exported as FP8 blocks (ROOT/back_fp8_blocks). ROOT/big, if present, is converted
        under a memory budget with peak RSS measured; a conversion made to fail half-way shows
        the output stays absent. Results go to ROOT/results.json.
    python parity_worker.py parallel ROOT CASE...
        Two processes (gloo): each case's checkpoint at TP=2 (dense) or TP=2 with EP=2 (MoE);
        logits gathered over the tensor-parallel group into ROOT/logits_par.pt. Each process
        then saves its shard of the model as training does (ROOT/ep_<case>, weights only,
        no model config recorded), and the parent exports that to ROOT/back_ep_<case> the
        way a user exports a training checkpoint that records no model config (written before
        megatron-r1 recorded it: --config and --hf-config), and once more with no Hugging
        Face config at all (--family) to ROOT/back_derived_<case>.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from megatron_r1.checkpoint.dist_ckpt import latest_checkpoint, load_checkpoint, read_metadata
from megatron_r1.config.schema import ModelConfig, ParallelConfig, TrainConfig
from megatron_r1.layout import resolve_layout
from megatron_r1.parallel.launch_env import LaunchEnv, free_port

BIG_BUDGET = 28 * 1024**2
FAMILY_OF = {"fp8": "deepseek_v3"}


class _Wrapped(torch.nn.Module):
    """load_checkpoint expects DDP-wrapped chunks (`.module`)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def _parallel_config(model: ModelConfig, world: int) -> ParallelConfig:
    if world == 1:
        return ParallelConfig(backend="gloo")
    if model.is_moe:
        return ParallelConfig(backend="gloo", tensor=2, expert=2, expert_tensor=1)
    return ParallelConfig(backend="gloo", tensor=2)


def _logits(root: Path, case: str, launch: LaunchEnv, save_to: Path | None = None
            ) -> torch.Tensor:
    """Logits of ROOT/mc_<case> on this process's layout, gathered over TP; with `save_to`,
    the loaded model is saved there again from this layout (as a training checkpoint)."""
    import torch.distributed as dist

    from megatron_r1.model.build import build_model
    from megatron_r1.parallel.init import destroy_parallel, init_parallel

    step = latest_checkpoint(root / f"mc_{case}")
    model = ModelConfig(**read_metadata(step)["model"])
    tokens = torch.load(root / "tokens.pt")
    parallel = _parallel_config(model, launch.world_size)
    layout = resolve_layout(parallel, model, TrainConfig(global_batch_size=2, micro_batch_size=2),
                            launch.world_size, tokens.shape[1])
    ctx = init_parallel(layout, parallel, launch, seed=0)
    try:
        chunks = build_model(model, parallel, ctx, perform_initialization=False)
        load_checkpoint(step, [_Wrapped(c) for c in chunks], None, None, ctx)
        gpt = chunks[0].eval()
        with torch.no_grad():
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
            logits = gpt(tokens, positions, None)  # [b, s, V/TP], vocabulary-parallel
            if layout.tensor > 1:
                parts = [torch.empty_like(logits) for _ in range(layout.tensor)]
                dist.all_gather(parts, logits.contiguous(), group=ctx.tp_group)
                logits = torch.cat(parts, dim=-1)
        if save_to is not None:
            _save_like_training(gpt, save_to, layout, launch.rank)
        return logits[..., : model.vocab_size]
    finally:
        destroy_parallel()


def _save_like_training(gpt: torch.nn.Module, root: Path, layout: Any, rank: int) -> None:
    """The model part of megatron_r1.checkpoint.dist_ckpt.save_checkpoint, at this layout."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    step = root / "step_0000005"
    if rank == 0:
        step.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save({"model": gpt.sharded_state_dict(), "trainer": {}}, str(step))
    if rank == 0:
        meta = {"step": 5, "layout": dataclasses.asdict(layout)}
        (step / "megatron_r1.json").write_text(json.dumps(meta))
        (root / "latest").write_text(step.name)
    dist.barrier()


def _memory_case(root: Path) -> dict[str, Any]:
    """Convert ROOT/big both ways under BIG_BUDGET; peak RSS measured from just before."""
    from megatron_r1.checkpoint.hf.budget import current_rss_bytes, peak_rss_bytes, reset_peak_rss
    from megatron_r1.convert import hf_to_mcore, mcore_to_hf

    result: dict[str, Any] = {"budget": BIG_BUDGET}
    for direction in ("hf-to-mcore", "mcore-to-hf"):
        reset_peak_rss()
        before = current_rss_bytes()
        if direction == "hf-to-mcore":
            report = hf_to_mcore(root / "big", root / "mc_big", memory_budget=BIG_BUDGET)
        else:
            report = mcore_to_hf(root / "mc_big", root / "back_big", memory_budget=BIG_BUDGET)
        result[direction] = {"accounted_peak": report.accounted_peak_bytes,
                             "rss_growth": peak_rss_bytes() - before,
                             "bytes_read": report.bytes_read}
    return result


def _failure_case(root: Path) -> dict[str, Any]:
    """A read error half-way through: the output directory must not appear."""
    from megatron_r1.checkpoint.hf.safetensors_io import SafetensorsCheckpoint
    from megatron_r1.convert import hf_to_mcore

    original, calls = SafetensorsCheckpoint.read, [0]

    def failing_read(self: SafetensorsCheckpoint, name: str) -> torch.Tensor:
        calls[0] += 1
        if calls[0] > 5:
            raise OSError(f"simulated I/O error reading {name}")
        return original(self, name)

    SafetensorsCheckpoint.read = failing_read  # type: ignore[method-assign]
    error = ""
    try:
        hf_to_mcore(root / "llama", root / "mc_fail")
    except OSError as err:
        error = str(err)
    finally:
        SafetensorsCheckpoint.read = original  # type: ignore[method-assign]
    return {"error": error, "reads": calls[0],
            "left": sorted(p.name for p in root.iterdir() if "mc_fail" in p.name)}


def _convert(root: Path, cases: list[str]) -> None:
    from megatron_r1.convert import hf_to_mcore, mcore_to_hf

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    results: dict[str, Any] = {"reports": {}}
    for case in cases:
        report = hf_to_mcore(root / case, root / f"mc_{case}")
        results["reports"][case] = dataclasses.asdict(report)
        mcore_to_hf(root / f"mc_{case}", root / f"back_{case}", max_shard_bytes=200_000)
    if "fp8" in cases:
        mcore_to_hf(root / "mc_fp8", root / "back_fp8_blocks", fp8=True)
    logits = {case: _logits(root, case, LaunchEnv("single", 0, 1, 0, "127.0.0.1", free_port()))
              for case in cases}
    torch.save(logits, root / "logits_tp1.pt")
    if (root / "big").is_dir():
        results["memory"] = _memory_case(root)
    results["failure"] = _failure_case(root)
    (root / "results.json").write_text(json.dumps(results, indent=1))


def _parallel_rank(rank: int, root: str, cases: list[str], ports: list[int]) -> None:
    logits = {}
    for case, port in zip(cases, ports):
        launch = LaunchEnv("torchrun", rank, 2, rank, "127.0.0.1", port)
        logits[case] = _logits(Path(root), case, launch, save_to=Path(root) / f"ep_{case}")
    if rank == 0:
        torch.save(logits, Path(root) / "logits_par.pt")


def _export_trained(root: Path, cases: list[str]) -> None:
    from megatron_r1.convert import mcore_to_hf

    for case in cases:
        step = latest_checkpoint(root / f"mc_{case}")
        model = ModelConfig(**read_metadata(step)["model"])
        mcore_to_hf(root / f"ep_{case}", root / f"back_ep_{case}", model=model,
                    hf_config_dir=root / case)
        if case != "fp8":  # no Hugging Face config at all: derived from the model config
            mcore_to_hf(root / f"ep_{case}", root / f"back_derived_{case}", model=model,
                        family_name=FAMILY_OF.get(case, case))


def main() -> None:
    mode, root, cases = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    if mode == "convert":
        _convert(root, cases)
    else:
        import torch.multiprocessing as mp

        ports = [free_port() for _ in cases]
        mp.spawn(_parallel_rank, args=(str(root), cases, ports), nprocs=2, join=True)
        _export_trained(root, cases)


if __name__ == "__main__":
    main()
