"""Save and resume training state with megatron-core dist_checkpointing (torch_dist format).

Layer L2. A checkpoint is a directory `<root>/step_0000030/` holding the model's sharded
state dict (reshardable: a checkpoint saved at one TP/PP/EP layout loads at another), the
optimizer state (distributed optimizer in its `dp_reshardable` format), the LR scheduler, every
rank's RNG states, the trainer's own state (step, data position) and `megatron_r1.json`
(step and layout, plus what the caller describes, e.g. the model config and its Hugging Face
source; readable without torch). Saves are atomic: everything is written into a
hidden temporary directory that is renamed into place only after every rank finished, and
`latest` is then replaced atomically; a crash mid-save leaves the previous checkpoint intact.
Weights holding a NaN or an inf are never saved (the save raises, naming the tensor), so
every checkpoint is finite and `keep_last` can only remove older finite ones.

Optimizer state follows parameters through data-parallel resharding only; loading it at a
different TP/PP/EP layout is refused with a clear error (load weights only instead).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_r1.optim import agree_on_first, first_nonfinite_weight
from megatron_r1.parallel.init import ParallelContext

LATEST_FILE = "latest"
METADATA_FILE = "megatron_r1.json"
_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}
# Layout degrees the optimizer state is tied to (data parallelism may change).
_OPTIMIZER_LAYOUT_KEYS = ("tensor", "pipeline", "context", "expert", "expert_tensor",
                          "virtual_pipeline", "first_stage_layers", "last_stage_layers")


def step_dir(root: str | os.PathLike[str], step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def latest_checkpoint(root: str | os.PathLike[str] | None) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    if root is None:
        return None
    marker = Path(root) / LATEST_FILE
    if not marker.is_file():
        return None
    path = Path(root) / marker.read_text().strip()
    if not (path / METADATA_FILE).is_file():
        raise FileNotFoundError(f"{marker} points to {path}, which is not a complete checkpoint "
                                f"(no {METADATA_FILE})")
    return path


def checkpoint_at(path: str | os.PathLike[str]) -> Path | None:
    """The checkpoint `path` names: a checkpoints directory's newest complete step (its
    `latest` marker), or `path` itself when it is one step directory; None when it is neither."""
    given = Path(path)
    return latest_checkpoint(given) or (given if (given / METADATA_FILE).is_file() else None)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's step and layout, without loading tensors."""
    file = Path(path) / METADATA_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a megatron-r1 checkpoint: {METADATA_FILE} missing")
    return json.loads(file.read_text())  # type: ignore[no-any-return]


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _torch_adam_states(optimizer: MegatronOptimizer) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """(param, state) of every torch.optim.Adam(W) megatron fell back to (no Apex/TE)."""
    found = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(opt, "optimizer", None)
        if isinstance(torch_opt, torch.optim.Adam | torch.optim.AdamW):
            found += [(p, torch_opt.state[p]) for g in torch_opt.param_groups for p in g["params"]]
    return found


def _prime_torch_adam_state(optimizer: MegatronOptimizer) -> None:
    """Create the Adam state a fresh optimizer does not have yet (step 0, zero moments: what
    torch.optim.AdamW would create at its first step anyway). torch's AdamW creates it lazily,
    while megatron's distributed optimizer reads `step` from every parameter's state to
    build a state dict, so saving before the first step, or loading into a fresh optimizer,
    would fail. On load the values are placeholders that loading replaces."""
    for param, state in _torch_adam_states(optimizer):
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            state.setdefault("exp_avg", torch.zeros_like(param))
            state.setdefault("exp_avg_sq", torch.zeros_like(param))


def _restore_adam_steps(optimizer: MegatronOptimizer) -> None:
    """Set each parameter's Adam `step` from its param group after a load. Without Apex/TE,
    megatron's distributed optimizer saves the step once per param group (the per-parameter
    copies it loads back are not the saved values), and its load gives all parameters one
    shared tensor, which torch's AdamW would then advance once per parameter per step,
    corrupting the bias correction. Each parameter gets its own tensor of the saved step."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(opt, "optimizer", None)
        if not isinstance(torch_opt, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in torch_opt.param_groups:
            if "step" in group:
                for param in group["params"]:
                    torch_opt.state[param]["step"] = torch.tensor(float(group["step"]))


def _model_key(i: int, num_chunks: int) -> str:
    return "model" if num_chunks == 1 else f"model{i}"


def _module(chunk: torch.nn.Module) -> Any:
    """The GPTModel (or its Float16Module) inside a DDP wrapper; a plain chunk as is."""
    return getattr(chunk, "module", chunk)


def _sharded_state_dict(model: list[torch.nn.Module], optimizer: MegatronOptimizer | None,
                        scheduler: OptimizerParamScheduler | None, trainer_state: dict[str, Any],
                        ctx: ParallelContext, *, is_loading: bool, with_rng: bool,
                        extra_models: dict[str, list[torch.nn.Module]]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for i, chunk in enumerate(model):
        state[_model_key(i, len(model))] = _module(chunk).sharded_state_dict()
    for name, chunks in extra_models.items():
        # Other models of the stage (e.g. GRPO's reference model), under their own prefix.
        state[name] = {_model_key(i, len(chunks)): _module(c).sharded_state_dict(
            prefix=f"{name}.") for i, c in enumerate(chunks)}
    if optimizer is not None and scheduler is not None:
        _prime_torch_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata=_OPTIMIZER_FORMAT)
        state["scheduler"] = scheduler.state_dict()
    if with_rng:
        # One object per rank: RNG streams differ by TP/PP/EP and data-parallel rank.
        world, rank = ctx.layout.world_size, ctx.rank
        state["rng"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
    state["trainer"] = trainer_state
    return state


def save_checkpoint(root: str | os.PathLike[str], step: int, model: list[torch.nn.Module],
                    optimizer: MegatronOptimizer, scheduler: OptimizerParamScheduler,
                    trainer_state: dict[str, Any], ctx: ParallelContext, *,
                    keep_last: int = 0,
                    extra_models: dict[str, list[torch.nn.Module]] | None = None,
                    describe: dict[str, Any] | None = None) -> Path:
    """Save a complete checkpoint of `step` atomically (collective: every rank calls it).

    Args:
        trainer_state: small picklable state of the caller (e.g. the data position); it is
            saved once (rank 0) and must be identical on every rank.
        keep_last: delete older checkpoints beyond this many (0 keeps all).
        extra_models: further models saved with the policy, by name (e.g. "ref_model").
        describe: JSON-serialisable entries added to megatron_r1.json (rank 0's), e.g. the
            model config and its source, which `convert mcore-to-hf` reads.
    """
    root = Path(root)
    problem = agree_on_first(first_nonfinite_weight(
        [*model, *(c for chunks in (extra_models or {}).values() for c in chunks)]), ctx)
    if problem is not None:
        raise FloatingPointError(
            f"step {step}: {problem} holds non-finite values; no checkpoint is written (the "
            f"latest finite one stays: {latest_checkpoint(root) if root.exists() else None})")
    final = step_dir(root, step)
    tmp = root / f".{final.name}.partial"
    if ctx.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    state = _sharded_state_dict(model, optimizer, scheduler, trainer_state, ctx,
                                is_loading=False, with_rng=True,
                                extra_models=extra_models or {})
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    if ctx.rank == 0:
        metadata = {"step": step, "layout": dataclasses.asdict(ctx.layout), "saved_at": time.time(),
                    "format": "megatron-core torch_dist"}
        assert not metadata.keys() & (describe or {}).keys(), sorted(describe or {})
        metadata.update(describe or {})
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / LATEST_FILE, final.name)
        if keep_last:
            done = sorted(p for p in root.glob("step_*") if (p / METADATA_FILE).is_file())
            for old in done[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _drop_absent(path: Path, template: dict[str, Any], num_chunks: int,
                 fresh: Collection[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Take the `fresh` entries the checkpoint lacks out of the model part of `template`;
    return them per model key with their current (initialised) tensors, to load as they are."""
    saved = dist_checkpointing.load_tensors_metadata(str(path))
    kept: dict[str, dict[str, torch.Tensor]] = {}
    for i in range(num_chunks):
        state = template[_model_key(i, num_chunks)]
        for name in fresh:
            entry = state.get(name)
            if entry is not None and entry.key not in saved:
                kept.setdefault(_model_key(i, num_chunks), {})[name] = state.pop(name).data
    return kept


def load_checkpoint(path: str | os.PathLike[str], model: list[torch.nn.Module],
                    optimizer: MegatronOptimizer | None, scheduler: OptimizerParamScheduler | None,
                    ctx: ParallelContext, *,
                    extra_models: dict[str, list[torch.nn.Module]] | None = None,
                    fresh: Collection[str] = ()) -> dict[str, Any]:
    """Load a checkpoint into `model` (and `optimizer`/`scheduler` unless None, and the
    `extra_models` it was saved with); return the trainer state saved with it plus `step`.
    Collective.

    Args:
        fresh: `model` state-dict keys the checkpoint may lack (a reward model's new head on
            a policy's backbone); those it lacks keep their initialised values. Any other
            missing tensor is still an error.

    Raises:
        ValueError: optimizer state requested from a checkpoint of another model-parallel
            layout (it cannot be resharded; pass optimizer=None to load weights only), or
            from a checkpoint lacking some `fresh` tensors (its optimizer state belongs to
            another model).
    """
    path = Path(path)
    metadata = read_metadata(path)
    saved = metadata["layout"]
    if optimizer is not None:
        changed = [f"{k}: {saved.get(k)} -> {getattr(ctx.layout, k)}"
                   for k in _OPTIMIZER_LAYOUT_KEYS if saved.get(k) != getattr(ctx.layout, k)]
        if changed:
            raise ValueError(
                f"checkpoint {path} was saved with another model-parallel layout "
                f"({', '.join(changed)}); its optimizer state cannot be resharded. Set "
                "checkpoint.load_optimizer=false to load the weights only.")
    same_world = saved.get("world_size") == ctx.layout.world_size
    # Weights only (optimizer None): the saved optimizer, scheduler and RNG entries are
    # simply not requested.
    extra_models = extra_models or {}
    template = _sharded_state_dict(model, optimizer, scheduler, {}, ctx, is_loading=True,
                                   with_rng=same_world and optimizer is not None,
                                   extra_models=extra_models)
    kept = _drop_absent(path, template, len(model), fresh) if fresh else {}
    if fresh and optimizer is not None:
        # Agreed on by every rank: only the stages holding the fresh tensors see them missing.
        absent = agree_on_first(", ".join(sorted({k for keys in kept.values() for k in keys}))
                                or None, ctx)
        if absent is not None:
            raise ValueError(
                f"checkpoint {path} has no {absent} (a policy checkpoint for a reward model?): "
                "its optimizer state belongs to another model. Set "
                "checkpoint.load_optimizer=false to load the weights only.")
    loaded = dist_checkpointing.load(template, str(path))
    for i, chunk in enumerate(model):
        key = _model_key(i, len(model))
        _module(chunk).load_state_dict({**loaded[key], **kept.get(key, {})})
    for name, chunks in extra_models.items():
        for i, chunk in enumerate(chunks):
            state = loaded[name][_model_key(i, len(chunks))]
            _module(chunk).load_state_dict({k.removeprefix(f"{name}."): v
                                            for k, v in state.items()})
    if optimizer is not None and scheduler is not None:
        # Under no_grad: the fallback torch optimizer copies into views of leaf parameters.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
        scheduler.load_state_dict(loaded["scheduler"])
    if "rng" in loaded:
        _set_rng_state(loaded["rng"])
    trainer_state = dict(loaded.get("trainer", {}))
    trainer_state["step"] = metadata["step"]
    return trainer_state
