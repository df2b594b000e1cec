"""Colocation offload: what the trainer does not need while the rollout engine runs leaves the
accelerator, and comes back before it is needed.

Layer L2. Three kinds of state, switched by the config (the planner counts exactly these):

- gradient buffers (rollout.offload_train_state): megatron DDP's own
  `offload_grad_buffers` / `restore_grad_buffers`; the storage is freed and every view
  (`param.main_grad`, the buckets) stays valid; gradients are dead between steps, so they
  come back as zeros without a copy.
- optimizer states and fp32 master weights (rollout.offload_train_state): megatron-core
  0.16.1's `MegatronOptimizer.offload_to_cpu` replaces each optimizer parameter's `.data` by
  a host copy, which cuts the distributed optimizer's fp32 shards loose from the model
  parameters they are views of (fp32 models: the updates would land in host copies) and
  moves an FP32Optimizer's parameters, i.e. the model itself; and it skips non-CUDA tensors,
  so nothing of it can run here. `StorageOffload` instead copies each storage to (pinned)
  host memory and frees the device storage in place (`untyped_storage().resize_(0)`, the
  technique megatron uses for the gradient buffers), skipping storages the model shares:
  every tensor object, view and optimizer reference survives, and restore reallocates and
  copies back bit for bit.
- the reference model (grpo.offload_reference): its parameters and buffers the same way,
  brought back only for its log-probs, its refresh and checkpoints.

On a CPU-only machine "device" and "host" are both host memory: the same code frees and
reallocates real storage and copies the same bytes, which is what the tests check (exact
round trips, identical training) and the metrics report (bytes and seconds per transfer).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator

import torch
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import MegatronOptimizer


class StorageOffload:
    """Moves the storages behind a set of tensors to host memory and back, in place."""

    def __init__(self, tensors: Iterable[torch.Tensor], device: torch.device,
                 keep: Iterable[torch.Tensor] = ()) -> None:
        """Args:
            tensors: whose storages to move (views of one storage move once).
            device: only storages on this device move (host tensors stay where they are).
            keep: tensors whose storages must stay (e.g. the model's own parameters).
        """
        kept = {t.untyped_storage().data_ptr() for t in keep}
        found: dict[int, torch.UntypedStorage] = {}
        for t in tensors:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if t.device == device and storage.nbytes() and ptr not in kept:
                found.setdefault(ptr, storage)
        self._storages = list(found.values())
        self._sizes = [s.nbytes() for s in self._storages]
        self._host: list[torch.UntypedStorage] | None = None
        self._device = device
        self.offloaded = False

    @property
    def nbytes(self) -> int:
        return sum(self._sizes)

    def _host_buffers(self) -> list[torch.UntypedStorage]:
        if self._host is None:  # allocated (and pinned) once, reused every rollout
            pin = self._device.type == "cuda"
            self._host = [torch.UntypedStorage(n, device="cpu") for n in self._sizes]
            if pin:
                self._host = [h.pin_memory() for h in self._host]
        return self._host

    def offload(self) -> None:
        """Copy every storage to host memory and free it on the device."""
        if self.offloaded:
            return
        for storage, host in zip(self._storages, self._host_buffers()):
            host.copy_(storage, non_blocking=True)
        _synchronize(self._device)  # the copies must land before the storage goes
        for storage in self._storages:
            storage.resize_(0)
        _release_cached(self._device)
        self.offloaded = True

    def restore(self) -> None:
        """Reallocate every storage on the device and copy its bytes back."""
        if not self.offloaded:
            return
        assert self._host is not None
        for storage, host, size in zip(self._storages, self._host, self._sizes):
            storage.resize_(size)
            storage.copy_(host, non_blocking=True)
        _synchronize(self._device)
        self.offloaded = False


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_cached(device: torch.device) -> None:
    """Hand freed device memory back to the driver. A freed storage's block stays in torch's
    caching allocator, where only this process can use it; the colocated engine is another
    process, and vLLM sizes itself from the driver's free memory (torch.cuda.mem_get_info;
    vllm/v1/worker/utils.py around line 761 refuses to start below gpu_memory_utilization x
    total). Checked on a GPU by tests/gpu/test_offload_gpu.py."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def optimizer_tensors(optimizer: MegatronOptimizer) -> list[torch.Tensor]:
    """Every tensor the torch optimizers behind megatron's hold: their parameters (fp32
    master weights for 16-bit models, shards under the distributed optimizer) and states."""
    tensors = []
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                tensors.append(param)
                tensors += [v for v in inner.state.get(param, {}).values() if torch.is_tensor(v)]
    return tensors


class TrainStateOffload:
    """rollout.offload_train_state: optimizer states and master weights to host, gradient
    buffers freed, between a rollout's last optimizer step and the next rollout's first, and
    from start-up (before the rollout engines start) to the first step."""

    def __init__(self, model: list[DistributedDataParallel], optimizer: MegatronOptimizer,
                 device: torch.device) -> None:
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self._states: StorageOffload | None = None
        self._state_ids: tuple[int, ...] = ()  # the optimizer tensors _states was built for
        self.offloaded = False

    def offload(self) -> dict[str, float]:
        """Move the train state off the device; the bytes and seconds it took."""
        if self.offloaded:
            return {}
        start = time.perf_counter()
        tensors = optimizer_tensors(self.optimizer)
        ids = tuple(id(t) for t in tensors)
        if self._states is None or ids != self._state_ids:
            # Adam's moments appear at the first step (torch creates optimizer state lazily),
            # so an offload before training (at start-up) sees fewer tensors than the ones
            # after: rebuilt once then, its host buffers reused from there on.
            params = [p for chunk in self.model for p in chunk.parameters()]
            self._states = StorageOffload(tensors, self.device, keep=params)
            self._state_ids = ids
        self._states.offload()
        grads = sum(b.grad_data.untyped_storage().nbytes() for chunk in self.model
                    for b in [*chunk.buffers, *chunk.expert_parallel_buffers])
        for chunk in self.model:
            chunk.offload_grad_buffers(synchronize=self.device.type == "cuda",
                                       empty_cache=self.device.type == "cuda")
        self.offloaded = True
        return {"offload/optimizer_gb": self._states.nbytes / 1e9, "offload/grads_freed_gb":
                grads / 1e9, "offload/train_state_out_s": time.perf_counter() - start}

    def restore(self) -> dict[str, float]:
        """Bring the train state back before an optimizer step."""
        if not self.offloaded:
            return {}
        start = time.perf_counter()
        assert self._states is not None
        for chunk in self.model:
            chunk.restore_grad_buffers(synchronize=self.device.type == "cuda")
        self._states.restore()
        self.offloaded = False
        return {"offload/train_state_in_s": time.perf_counter() - start}


class ModelOffload:
    """grpo.offload_reference: a frozen model's parameters and buffers in host memory except
    inside `on_device()`."""

    def __init__(self, chunks: list[torch.nn.Module], device: torch.device) -> None:
        tensors = [t for c in chunks for t in (*c.parameters(), *c.buffers())]
        self._storage = StorageOffload(tensors, device)
        self.seconds = 0.0

    @property
    def nbytes(self) -> int:
        return self._storage.nbytes

    def pop_seconds(self) -> float:
        """Seconds spent moving the weights since the last call (a rollout's worth)."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def offload(self) -> None:
        start = time.perf_counter()
        self._storage.offload()
        self.seconds += time.perf_counter() - start

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        """The model's weights on the device for the block, back to host after it."""
        start = time.perf_counter()
        self._storage.restore()
        self.seconds += time.perf_counter() - start
        try:
            yield
        finally:
            self.offload()
