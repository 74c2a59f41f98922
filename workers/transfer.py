"""Host-to-device copies that do not wait for the device. A plain copy of pageable host
memory to the GPU synchronizes the stream first, so building one step's inputs would wait
for every step queued before it (async scheduling) and leave the GPU idle while the host
prepares the next. Staged through pinned memory, the copy is queued like a kernel.
Runs in each shard."""

from __future__ import annotations

import torch


def to_device(data, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`data` (a host tensor, or anything torch.tensor takes) as a tensor on `device`,
    copied in stream order without a host wait on CUDA."""
    tensor = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return tensor.to(device)
    # Pinned memory belongs to the calling thread's current device, which is GPU 0 on a
    # thread that never chose one (a shard sees every GPU of its host): the guard keeps a
    # request thread from opening a context on another shard's GPU.
    with torch.cuda.device(device):
        return tensor.pin_memory().to(device, non_blocking=True)
