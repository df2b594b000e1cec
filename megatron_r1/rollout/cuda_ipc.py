"""CUDA tensors handed from a trainer rank to vLLM's workers by IPC handle (GPU only).

Layer L1 (torch only). `share` turns a device tensor into plain values (ints, bytes, strings)
that vLLM's msgpack-serialised `collective_rpc` carries without its insecure pickle mode;
`open_shared` rebuilds, in the worker's process, a tensor over the same device memory (no
copy, no host round trip). The device travels as its UUID: the worker's CUDA_VISIBLE_DEVICES
lists only its engine's devices, renumbered from 0, so the sender's ordinal names another
device there (or none). Each share is opened by one receiver (rollout/engine_nodes.py). The sender must keep the tensor alive until every worker has
loaded it (VLLMEngine.update_weights holds each bucket until its `collective_rpc` returns).
This is torch's own CUDA tensor reduction (what torch.multiprocessing sends between
processes), flattened. It cannot run on a CPU machine: a GPU check (README).
"""

from __future__ import annotations

import os
from typing import Any

import torch


def share(name: str, tensor: torch.Tensor) -> dict[str, Any]:
    """Plain-value description of a CUDA tensor's storage for another process."""
    from torch.multiprocessing.reductions import reduce_tensor

    if not tensor.is_cuda:
        raise ValueError(f"{name}: CUDA IPC shares device tensors, this one is on "
                         f"{tensor.device}")
    _, args = reduce_tensor(tensor.detach().contiguous())
    (_cls, size, stride, storage_offset, _storage_cls, dtype, device, handle, storage_bytes,
     storage_offset_bytes, _requires_grad, ref_counter_handle, ref_counter_offset,
     event_handle, event_sync_required) = args
    return {"name": name, "size": list(size), "stride": list(stride),
            "storage_offset": int(storage_offset), "dtype": str(dtype).removeprefix("torch."),
            # the receiver's CUDA_VISIBLE_DEVICES may number the device differently (an
            # engine's workers see only its devices, from 0): it finds the device by UUID
            "device_uuid": str(torch.cuda.get_device_properties(int(device)).uuid),
            "handle": bytes(handle), "storage_bytes": int(storage_bytes),
            "storage_offset_bytes": int(storage_offset_bytes),
            "ref_counter_handle": bytes(ref_counter_handle),
            "ref_counter_offset": int(ref_counter_offset), "event_handle": bytes(event_handle),
            "event_sync_required": bool(event_sync_required)}


def open_shared(item: dict[str, Any]) -> tuple[str, torch.Tensor]:
    """(name, tensor over the sender's device memory), in the receiving process."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    dtype = getattr(torch, item["dtype"])
    tensor = rebuild_cuda_tensor(
        torch.Tensor, torch.Size(item["size"]), tuple(item["stride"]), item["storage_offset"],
        torch.storage.TypedStorage, dtype, device_of(item["device_uuid"]), item["handle"],
        item["storage_bytes"], item["storage_offset_bytes"], False,
        item["ref_counter_handle"], item["ref_counter_offset"], item["event_handle"],
        item["event_sync_required"])
    return item["name"], tensor


def device_of(uuid: str) -> int:
    """This process's ordinal of the device with `uuid` (torch.cuda.get_device_properties'
    uuid, which does not depend on CUDA_VISIBLE_DEVICES)."""
    for index in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(index).uuid) == uuid:
            return index
    raise RuntimeError(f"CUDA device {uuid} is not visible to this process "
                       f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): an "
                       "engine worker opens only tensors on its own node's devices")
