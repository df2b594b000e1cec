"""The megatron side of a conversion: the model's parameter table, streaming dist-checkpoint
writes, and reads of a few parameters at a time from a checkpoint of any layout.

Layer L2 (imports megatron.core). Key decisions:
- The truth about names, shapes and checkpoint layout is megatron-core's own: a GPTModel is
  built on the meta device (no memory) at TP=PP=EP=1 and its `sharded_state_dict()` is what
  gets written, through megatron's `dist_checkpointing.save` (validation, common.pt,
  metadata.json). The torch_dist format stores global tensors, so a checkpoint written once
  loads at any TP/PP/EP layout (megatron reshards on load).
- Streaming: the ShardedTensors carry meta tensors; their data is produced only when
  torch.distributed.checkpoint asks for it (`_LazyPlanner.resolve_data`), one parameter at a
  time. torch's FileSystemWriter keeps every tensor of a file alive until the file is done,
  so `_StreamingWriter` writes items itself (with torch's own `_write_item`, as megatron's
  writer does) and drops each one once written.
- Reading for export goes to the storage index directly (`CheckpointReader`): each wanted
  region (one parameter at TP=1, in the global coordinates megatron stored) is assembled
  from the chunks that overlap it, whatever TP/PP/EP layout wrote them, a budget-sized batch
  per read. megatron's own `load` would insist on whole layer-stacked tensors and, in a
  world of one, cannot describe a partial read of them. The index is checked first, so a
  missing or mis-shaped tensor is reported by name rather than by a DCP stack trace.
- torch.distributed.checkpoint wraps errors (an I/O error, a missing file) in its own
  exception; the original is re-raised.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedBase,
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
)
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import (
    DEFAULT_SUFFIX,
    FileSystemReader,
    FileSystemWriter,
    _write_item,
)
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from megatron_r1.checkpoint.hf.budget import MemoryBudget
from megatron_r1.checkpoint.hf.plan import MTensor
from megatron_r1.config.schema import ModelConfig, ParallelConfig, TrainConfig
from megatron_r1.layout import resolve_layout
from megatron_r1.model.build import build_model
from megatron_r1.parallel.init import ParallelContext, destroy_parallel, init_parallel
from megatron_r1.parallel.launch_env import LaunchEnv, free_port

log = logging.getLogger(__name__)

# Keys of model tensors in a dist checkpoint (optimizer and RNG entries are ignored on export).
_MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.")


def start_single_process(model: ModelConfig) -> ParallelContext:
    """A world of one (gloo) with megatron's groups at TP=PP=EP=1, for this converter process.

    Raises:
        ValueError: torch.distributed is already running (convert in a process of its own).
    """
    if dist.is_initialized():
        raise ValueError("the converter runs as a single process of its own; torch.distributed "
                         "is already initialised here")
    parallel = ParallelConfig(backend="gloo")
    layout = resolve_layout(parallel, model, TrainConfig(global_batch_size=1, micro_batch_size=1),
                            world_size=1, seq_length=1)
    launch = LaunchEnv("single", 0, 1, 0, "127.0.0.1", free_port())
    return init_parallel(layout, parallel, launch, seed=0)


def stop_single_process() -> None:
    destroy_parallel()


def model_template(model: ModelConfig, ctx: ParallelContext) -> dict[str, ShardedBase]:
    """`sharded_state_dict()` of the model built on the meta device (name -> ShardedTensor,
    ShardedTensorFactory or ShardedObject)."""
    (chunk,) = build_model(model, ParallelConfig(backend="gloo"), ctx,
                           perform_initialization=False, device=torch.device("meta"))
    return dict(chunk.sharded_state_dict())


def parameter_table(template: Mapping[str, ShardedBase]) -> dict[str, MTensor]:
    """{parameter name: (shape, dtype)} of the tensors in a template (objects left out)."""
    table = {}
    for name, item in template.items():
        if isinstance(item, ShardedTensor):
            table[name] = MTensor(tuple(item.local_shape), item.dtype)
        elif isinstance(item, ShardedTensorFactory):
            table[name] = MTensor(tuple(item.data.shape), item.data.dtype)
    return table


def _key(sh: ShardedTensor) -> tuple[str, tuple[int, ...]]:
    return sh.key, tuple(sh.global_offset)


class _LazyPlanner(MCoreSavePlanner):
    """megatron's save planner whose tensor data is produced on request."""

    def __init__(self, resolve: Callable[[str, tuple[int, ...]], torch.Tensor]) -> None:
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
        self._resolve = resolve

    def resolve_data(self, write_item: Any) -> Any:
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        index = write_item.index
        data = self._resolve(index.fqn, tuple(index.offset))
        return data.reshape(write_item.tensor_data.chunk.sizes)


class _StreamingWriter(FileSystemWriter):
    """FileSystemWriter that holds one tensor at a time: items are grouped into files of about
    `file_bytes`, resolved one by one and released after writing."""

    def __init__(self, path: str, file_bytes: int) -> None:
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1)
        self.file_bytes = file_bytes

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        prefix = plan.storage_data.prefix
        files: list[list[Any]] = [[]]
        size = 0
        for item in plan.items:
            nbytes = 0 if item.type == WriteItemType.BYTE_IO else item.tensor_storage_size() or 0
            if files[-1] and size + nbytes > self.file_bytes:
                files.append([])
                size = 0
            files[-1].append(item)
            size += nbytes
        results: list[WriteResult] = []
        for i, items in enumerate(files):
            file_name = f"{prefix}{i}{DEFAULT_SUFFIX}"
            path = self.fs.concat_path(self.path, file_name)
            with self.fs.create_stream(path, "wb") as stream:
                for item in items:
                    data = planner.resolve_data(item)
                    if isinstance(data, torch.Tensor):
                        data = data.detach().contiguous()
                    results.append(_write_item(self.transforms, stream, data, item, file_name,
                                               self.serialization_format))
                    del data
                stream.flush()
                os.fsync(stream.fileno())
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future


class _StreamingSaveStrategy(SaveShardedStrategy):
    """megatron's torch_dist format (same backend name and version, same loader) written by
    the lazy planner and the streaming writer."""

    def __init__(self, resolve: Callable[[str, tuple[int, ...]], torch.Tensor],
                 file_bytes: int) -> None:
        super().__init__("torch_dist", 1)
        self._resolve = resolve
        self._file_bytes = file_bytes

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict: Any, checkpoint_dir: Any) -> None:
        by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, keep_only_main_replica=True)
        pyt_state_dict = mcore_to_pyt_state_dict(by_key, is_loading=False)
        with _unwrapped_failures():
            dcp.save(pyt_state_dict, storage_writer=_StreamingWriter(str(checkpoint_dir),
                                                                     self._file_bytes),
                     planner=_LazyPlanner(self._resolve))


@contextmanager
def _unwrapped_failures() -> Iterator[None]:
    """torch.distributed.checkpoint wraps every error of a save/load (ours included: a
    missing tensor, an I/O error) in a CheckpointException; re-raise the original one."""
    try:
        yield
    except CheckpointException as err:
        failures = list(err.failures.values())
        if not failures:
            raise
        raise failures[0][0] from None


class _LastParameter:
    """The most recently produced parameter, kept while its pieces are written (a swiglu
    factory writes gate and up halves one after the other) and charged to the budget."""

    def __init__(self, budget: MemoryBudget) -> None:
        self._budget = budget
        self.name: str | None = None
        self.tensor: torch.Tensor | None = None
        self._hold: Any = None

    def set(self, name: str, tensor: torch.Tensor) -> None:
        self.clear()
        self._hold = self._budget.hold(tensor.numel() * tensor.element_size(), name)
        self._hold.__enter__()
        self.name, self.tensor = name, tensor

    def clear(self) -> None:
        if self._hold is not None:
            self._hold.__exit__(None, None, None)
        self.name, self.tensor, self._hold = None, None, None


def save_streaming(template: Mapping[str, ShardedBase], checkpoint_dir: Path,
                   produce: Callable[[str], torch.Tensor], working_bytes: Callable[[str], int],
                   budget: MemoryBudget, *, file_bytes: int = 4 * 1024**3,
                   common: dict[str, Any] | None = None) -> None:
    """Write the template's tensors as a megatron dist checkpoint, each produced on demand.

    Args:
        produce: parameter name -> its full tensor (TP=1 layout, the template's dtype).
        working_bytes: parameter name -> bytes `produce` allocates at most (charged to the
            budget while it runs; the planner checked each fits).
        file_bytes: approximate size of each `__0_<i>.distcp` data file.
        common: plain (non-tensor) entries saved next to the model (e.g. {"trainer": {}}).
    """
    state: dict[str, Any] = {}
    pieces: dict[tuple[str, tuple[int, ...]], tuple[str, int | None]] = {}
    factories: dict[str, ShardedTensorFactory] = {}
    for name, item in template.items():
        if isinstance(item, ShardedTensorFactory):
            factories[name] = item
            built = item.build()
            for i, sh in enumerate(nested_values(built)):
                pieces[_key(sh)] = (name, i)
            state[name] = built
        elif isinstance(item, ShardedTensor):
            pieces[_key(item)] = (name, None)
            state[name] = item
        elif isinstance(item, ShardedObject):
            state[name] = item
    last = _LastParameter(budget)

    def resolve(key: str, offset: tuple[int, ...]) -> torch.Tensor:
        name, piece = pieces[(key, offset)]
        if last.name != name:
            last.clear()  # its pieces are written: the writer resolves items one by one
            with budget.hold(working_bytes(name), name):
                tensor = produce(name)
            last.set(name, tensor)
        assert last.tensor is not None
        if piece is None:
            return last.tensor
        real = dataclasses.replace(factories[name], data=last.tensor)
        return list(nested_values(real.build()))[piece].data

    try:
        dist_checkpointing.save({"model": state, **(common or {})}, str(checkpoint_dir),
                                sharded_strategy=_StreamingSaveStrategy(resolve, file_bytes))
    finally:
        last.clear()


class _RegionPlanner(LoadPlanner):
    """Reads given regions of stored tensors into given output tensors: one read item per
    overlap of a region with a stored chunk, whatever layout wrote the checkpoint. Regions
    outside the stored tensor (a padded vocabulary of another size) stay zero."""

    def __init__(self, regions: list[tuple[str, tuple[int, ...], torch.Tensor]]) -> None:
        self.regions = regions

    def set_up_planner(self, state_dict: Any, metadata: Any = None,
                       is_coordinator: bool = False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for i, (key, offsets, out) in enumerate(self.regions):
            for chunk in self.metadata.state_dict_metadata[key].chunks:
                lo = [max(a, b) for a, b in zip(offsets, chunk.offsets)]
                hi = [min(a + n, b + m) for a, n, b, m in
                      zip(offsets, out.shape, chunk.offsets, chunk.sizes)]
                if any(low >= high for low, high in zip(lo, hi)):
                    continue
                items.append(ReadItem(
                    type=LoadItemType.TENSOR, dest_index=MetadataIndex(str(i)),
                    dest_offsets=torch.Size(x - a for x, a in zip(lo, offsets)),
                    storage_index=MetadataIndex(key, chunk.offsets),
                    storage_offsets=torch.Size(x - b for x, b in zip(lo, chunk.offsets)),
                    lengths=torch.Size(h - x for h, x in zip(hi, lo))))
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: Any) -> None:
        raise AssertionError("only tensors are read")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        out = self.regions[int(read_item.dest_index.fqn)][2]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            out = out.narrow(dim, start, length)
        return out

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # read straight into the view resolve_tensor returned


class _CachedMetadataReader(FileSystemReader):
    """Reads `.metadata` once (it indexes every chunk; large for big MoE checkpoints)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._metadata = super().read_metadata()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        return self._metadata


class CheckpointReader:
    """Reads parameters out of a megatron dist checkpoint written at any TP/PP/EP layout, a
    few at a time, straight from its storage index (no model-wide load)."""

    def __init__(self, step_dir: Path) -> None:
        self.step_dir = step_dir
        self._reader = _CachedMetadataReader(str(step_dir))
        md = self._reader.read_metadata().state_dict_metadata
        self.tensors = {k: tuple(v.size) for k, v in md.items()
                        if isinstance(v, TensorStorageMetadata)}
        self.max_chunk_bytes = max(
            (math.prod(c.sizes) * v.properties.dtype.itemsize for v in md.values()
             if isinstance(v, TensorStorageMetadata) for c in v.chunks), default=0)

    def check(self, template: Mapping[str, ShardedBase]) -> None:
        """The checkpoint holds every model tensor the template needs, with its global shape,
        and no model tensor the template lacks.

        Raises:
            ValueError: naming the first missing, unexpected or mis-shaped tensor.
        """
        wanted: dict[str, ShardedTensor] = {}
        for name, item in template.items():
            for sh in _shards(item):
                wanted.setdefault(sh.key, sh)
                if sh.key not in self.tensors:
                    raise ValueError(f"checkpoint {self.step_dir} lacks tensor {sh.key!r} "
                                     f"(megatron parameter {name}): it was saved from another "
                                     "model config")
        for key, sh in wanted.items():
            if self.tensors[key] != tuple(sh.global_shape) and not sh.allow_shape_mismatch:
                raise ValueError(f"checkpoint tensor {key!r} has shape {list(self.tensors[key])}, "
                                 f"but the model config implies {list(sh.global_shape)}")
        extra = sorted(k for k in self.tensors
                       if k.startswith(_MODEL_KEY_PREFIXES) and k not in wanted)
        mtp = [k for k in extra if k.startswith("mtp.")]
        if mtp:
            log.info("skipping %d multi-token-prediction tensor(s) of the checkpoint (mtp.*)",
                     len(mtp))
        extra = [k for k in extra if not k.startswith("mtp.")]
        if extra:
            raise ValueError(f"checkpoint {self.step_dir} holds {len(extra)} model tensor(s) the "
                             f"model config does not have, e.g. {extra[0]!r}")

    def load(self, template: Mapping[str, ShardedBase], names: Iterable[str]
             ) -> dict[str, torch.Tensor]:
        """The named parameters, full (TP=1 layout), in the template's dtypes. A factory's
        pieces (swiglu's gate and up halves) are read straight into views of one buffer, so
        no merge copy is made."""
        names = list(names)
        regions: list[tuple[str, tuple[int, ...], torch.Tensor]] = []
        loaded: dict[str, torch.Tensor] = {}
        merges: dict[str, list[torch.Tensor]] = {}
        for name in names:
            item = template[name]
            if isinstance(item, ShardedTensorFactory):
                buffer = torch.empty(item.data.shape, dtype=item.data.dtype)
                shards = _shards(dataclasses.replace(item, data=buffer))
                if all(_is_view_of(sh.data, buffer) for sh in shards):
                    loaded[name] = buffer
                else:  # a factory that copies: read pieces, merge after
                    shards = _shards(item)
                    merges[name] = []
            else:
                shards = _shards(item)
            for sh in shards:
                shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
                if name in loaded:
                    out = sh.data.view(shape)
                else:
                    # Padded rows absent from the checkpoint (another vocab padding) stay 0.
                    out = (torch.zeros if sh.allow_shape_mismatch else torch.empty)(
                        shape, dtype=sh.dtype)
                    if name in merges:
                        merges[name].append(out.view(sh.local_shape))
                    else:
                        loaded[name] = out.view(sh.local_shape)
                regions.append((sh.key, tuple(sh.global_offset), out))
        with _unwrapped_failures():
            dcp.load({}, storage_reader=self._reader, planner=_RegionPlanner(regions),
                     no_dist=True)
        for name, parts in merges.items():
            factory = template[name]
            assert isinstance(factory, ShardedTensorFactory)
            loaded[name] = factory.merge_fn(parts)
        return {name: loaded[name] for name in names}


def _is_view_of(t: torch.Tensor, buffer: torch.Tensor) -> bool:
    return t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


def _shards(item: ShardedBase) -> list[ShardedTensor]:
    """The ShardedTensors a template entry is stored as (a factory's built pieces)."""
    if isinstance(item, ShardedTensorFactory):
        return [sh for sh in nested_values(item.build()) if isinstance(sh, ShardedTensor)]
    return [item] if isinstance(item, ShardedTensor) else []
