"""Everything a training stage needs before its first step, and after its last.

Layer L3. In order: find this process's rank (launcher env), check the layout against the
world size (before any process group exists), start the process groups, write the resolved
config, build and wrap the model (without drawing random weights when a checkpoint supplies
them), build the optimizer, and restore state: the run's own latest checkpoint if it has one
(a requeued job resumes), else `checkpoint.load_dir` if set.
SFT and GRPO share it, so both resume, log and save the same way.

Every checkpoint records the model config and the model's source (the Hugging Face model it
was converted from, inherited from the checkpoint the run started from; else the family its
config maps to), and its root keeps the tokenizer and generation files (`hf_assets/`), so
`megatron-r1 convert mcore-to-hf --ckpt <run>/checkpoints --out DIR` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from megatron_r1.batching import MicroBatching
from megatron_r1.checkpoint.assets import ASSETS_DIR, write_assets
from megatron_r1.checkpoint.dist_ckpt import (
    checkpoint_at,
    latest_checkpoint,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from megatron_r1.config import Config, write_resolved_config
from megatron_r1.config.schema import ModelConfig, ParallelConfig
from megatron_r1.data.tokenizer import resolve_tokenizer
from megatron_r1.hf_export import family_of
from megatron_r1.layout import Layout, resolve_layout
from megatron_r1.metrics import MetricsWriter
from megatron_r1.model.build import build_model
from megatron_r1.optim import (
    MegatronOptimizer,
    OptimizerParamScheduler,
    build_optimizer,
    gather_updated_params,
    wrap_for_training,
)
from megatron_r1.parallel.init import ParallelContext, destroy_parallel, init_parallel
from megatron_r1.parallel.launch_env import LaunchEnv, discover

log = logging.getLogger(__name__)


@dataclass
class Session:
    """A started training stage on this rank."""

    cfg: Config
    ctx: ParallelContext
    model: list[torch.nn.Module]
    """This rank's DDP-wrapped model chunks."""
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    run_dir: Path
    checkpoint_dir: Path
    metrics: MetricsWriter
    start_step: int = 0
    """Optimizer steps already done (restored from a checkpoint)."""
    trainer_state: dict[str, Any] = field(default_factory=dict)
    """What the stage saved with its last checkpoint (e.g. the data position)."""
    extra_models: dict[str, list[torch.nn.Module]] = field(default_factory=dict)
    """Further models of the stage saved with each checkpoint (GRPO's reference model)."""
    resumed: bool = False
    """Whether the state (and the extra models) came from the run's own checkpoint."""
    source: dict[str, Any] | None = None
    """Where the model came from, recorded with every checkpoint (`_model_source`)."""
    assets_from: Path | None = None
    """`hf_assets/` of the checkpoint the run started from, if any (copied at the first save)."""
    tokenizer: Any = None
    """The run's tokenizer once `run_tokenizer` resolved it; saved as the checkpoint root's
    `hf_assets/` when the starting checkpoint brought none."""

    @property
    def is_logging_rank(self) -> bool:
        return self.ctx.rank == 0

    def save(self, step: int, trainer_state: dict[str, Any],
             describe: dict[str, Any] | None = None) -> Path:
        """Checkpoint `step` (collective), with what an export to Hugging Face needs: the
        model config and source in megatron_r1.json, `hf_assets/` in the root (rank 0 gives
        the root its assets before the first checkpoint that needs them appears).

        Args:
            describe: further megatron_r1.json entries of the stage (e.g. `reward_model`)."""
        if self.ctx.rank == 0:
            write_assets(self.checkpoint_dir, copy_from=self.assets_from,
                         tokenizer=self.tokenizer)
        gather_updated_params(self.model)  # type: ignore[arg-type]
        entries = {"model": dataclasses.asdict(self.cfg.model), "source": self.source,
                   **(describe or {})}
        return save_checkpoint(self.checkpoint_dir, step, self.model, self.optimizer,
                               self.scheduler, trainer_state, self.ctx,
                               keep_last=self.cfg.checkpoint.keep_last,
                               extra_models=self.extra_models, describe=entries)


def _initial_checkpoint(cfg: Config, own: Path) -> tuple[Path | None, bool]:
    """(checkpoint to load, whether it is the run's own, i.e. a full resume)."""
    mine = latest_checkpoint(own)
    if mine is not None:
        return mine, True
    if cfg.checkpoint.load_dir is None:
        return None, False
    found = checkpoint_at(cfg.checkpoint.load_dir)
    if found is None:
        raise FileNotFoundError(f"checkpoint.load_dir={cfg.checkpoint.load_dir!r}: no checkpoint "
                                "there (neither a step directory nor a `latest` marker)")
    return found, False


def _model_source(model: ModelConfig, start: Path | None) -> dict[str, Any] | None:
    """The `source` a run records: that of the checkpoint it starts from (a converted Hugging
    Face model's config.json, dtypes and family, carried through any number of runs), else
    `{"format": "megatron-r1", "family": ...}` (a model megatron-r1 initialised, whose config
    maps to that Hugging Face family), else None (`convert mcore-to-hf` then needs --family or
    --hf-config)."""
    if start is not None:
        inherited: dict[str, Any] | None = read_metadata(start).get("source")
        if inherited:
            return inherited
    try:
        family = family_of(model)
    except ValueError:
        return None
    return {"format": "megatron-r1", "family": family.name}


def micro_batching(cfg: Config, layout: Layout) -> MicroBatching:
    """How this run cuts its steps into micro-batches (train.* and the layout's needs)."""
    return MicroBatching(micro_batch_size=cfg.train.micro_batch_size,
                         max_tokens=cfg.train.max_tokens_per_microbatch,
                         pack=cfg.train.pack_sequences, multiple_of=layout.sequence_multiple,
                         uniform=layout.uniform_microbatch_shapes)


ExtraModels = Callable[[ParallelContext], dict[str, list[torch.nn.Module]]]


class ModelBuilder(Protocol):
    """Builds this rank's model chunks (model.build.build_model, reward_head's
    build_reward_model); `perform_initialization=False` leaves the weights unset."""

    def __call__(self, model: ModelConfig, parallel: ParallelConfig, ctx: ParallelContext, *,
                 perform_initialization: bool = True) -> list[Any]: ...


def start_session(cfg: Config, launch: LaunchEnv | None = None,
                  extra_models: ExtraModels | None = None, *,
                  build: ModelBuilder = build_model, fresh: Collection[str] = ()) -> Session:
    """Start a training stage on this rank (collective over the job's processes).

    Args:
        extra_models: builds further models that are saved with every checkpoint; restored on
            resume (`Session.resumed`), left for the caller to initialise otherwise.
        build: builds this rank's model chunks (default: the policy; the reward-model stage
            passes build_reward_model).
        fresh: state-dict keys of the model that a `checkpoint.load_dir` checkpoint may lack
            (a reward head on a policy's backbone): they keep their initialisation. The run's
            own checkpoints always hold everything.
    """
    launch = launch or discover()
    layout = resolve_layout(cfg.parallel, cfg.model, cfg.train, launch.world_size,
                            cfg.data.seq_length)
    ctx = init_parallel(layout, cfg.parallel, launch, cfg.train.seed)
    run_dir = Path(cfg.logging.run_dir)
    if ctx.rank == 0:
        write_resolved_config(cfg, run_dir)
    checkpoint_dir = Path(cfg.checkpoint.save_dir or run_dir / "checkpoints")
    path, own = _initial_checkpoint(cfg, checkpoint_dir)
    # A checkpoint loaded next overwrites every weight (load_checkpoint loads strictly),
    # except `fresh` ones a load_dir checkpoint may lack: random weights drawn first would be
    # thrown away, and each rank draws its layers' full, unsharded weights on the CPU
    # (use_cpu_initialization) before splitting them, minutes for a large model.
    chunks = build(cfg.model, cfg.parallel, ctx,
                   perform_initialization=path is None or (not own and bool(fresh)))
    model: list[torch.nn.Module] = list(wrap_for_training(chunks, cfg.model, cfg.parallel, ctx))
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.model, cfg.parallel,  # type: ignore[arg-type]
                                           cfg.train.steps, ctx)
    extras = extra_models(ctx) if extra_models is not None else {}
    start_step, trainer_state = 0, {}
    if path is not None:
        full = own or cfg.checkpoint.load_optimizer
        state = load_checkpoint(path, model, optimizer if full else None,
                                scheduler if full else None, ctx,
                                extra_models=extras if own else None,
                                fresh=() if own else fresh)
        if full:
            start_step, trainer_state = state.pop("step"), state
        else:
            # The optimizer copied the weights as built (random or unset) into its fp32
            # master weights when it was built (bf16/fp16 models); without this its first
            # step would write them back over the loaded ones.
            optimizer.reload_model_params()
        if ctx.rank == 0:
            log.info("loaded %s (%s)", path, "resume" if own else
                     "initialisation" + ("" if full else ", weights only"))
    dist.barrier()
    metrics = MetricsWriter(run_dir, enabled=ctx.rank == 0,
                            tensorboard=cfg.logging.tensorboard, start_step=start_step)
    return Session(cfg=cfg, ctx=ctx, model=model, optimizer=optimizer, scheduler=scheduler,
                   run_dir=run_dir, checkpoint_dir=checkpoint_dir, metrics=metrics,
                   start_step=start_step, trainer_state=trainer_state, extra_models=extras,
                   resumed=path is not None and own, source=_model_source(cfg.model, path),
                   assets_from=path.parent / ASSETS_DIR if path is not None else None)


def run_tokenizer(session: Session) -> Any:
    """The run's tokenizer: data.tokenizer, or the built-in one built by rank 0 into the run
    directory while the other ranks wait, then loaded by them. Collective. Kept as
    `session.tokenizer` (the checkpoints' `hf_assets/` when the run brings none)."""
    cfg = session.cfg

    def resolve() -> Any:
        return resolve_tokenizer(cfg.data, vocab_size=cfg.model.vocab_size,
                                 cache_dir=session.run_dir)

    tokenizer = resolve() if session.ctx.rank == 0 else None
    dist.barrier()
    session.tokenizer = tokenizer if tokenizer is not None else resolve()
    return session.tokenizer


def end_session(session: Session) -> None:
    """Flush metrics and tear the process groups down."""
    session.metrics.close()
    destroy_parallel()
