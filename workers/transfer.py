"""Host-to-device copies that do not wait for the device. A plain copy of pageable host
memory to the GPU synchronizes the stream first, so building one step's inputs would wait
for every step queued before it (async scheduling) and leave the GPU idle while the host
prepares the next. Staged through pinned memory, the copy is queued like a kernel.
Runs in each shard."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

# A shard's host copy of a call's embeddings rows (object store -> pinned memory) is a
# memcpy: one prompt after another, copying and uploading 8 prompts of 2 MiB took 4.1 ms
# on the H200 host. upload_rows splits the copy into pieces of about this size for a pool
# of UPLOAD_THREADS threads (a torch copy gives up the GIL): at batch 16 the first group
# then went from the driver's send to the step loop in 4.9 ms instead of 6.6 ms
# (BENCHMARKS.md, session 28).
UPLOAD_THREADS = 4
UPLOAD_PIECE_BYTES = 1 << 20


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


def upload_rows(tensors: list[torch.Tensor], device: torch.device, dtype: torch.dtype,
                pool: ThreadPoolExecutor | None = None) -> list[torch.Tensor]:
    """Host tensors (one call's embeddings rows) as tensors of `dtype` on CUDA `device`,
    each its own (a prompt's rows are freed when it finishes), copied in stream order as
    to_device does: all first into one pinned buffer (gather_rows, on `pool`), then each
    uploaded from its part of it."""
    with torch.cuda.device(device):
        pinned = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, pin_memory=True)
    return [part.to(device, non_blocking=True) for part in gather_rows(tensors, pinned, pool)]


def gather_rows(tensors: list[torch.Tensor], buffer: torch.Tensor, pool: ThreadPoolExecutor | None = None
                ) -> list[torch.Tensor]:
    """Copies each tensor into its part of the flat `buffer` (cast to its dtype), in pieces
    of about UPLOAD_PIECE_BYTES of whole rows, the pieces on `pool`'s threads; returns the
    parts, each viewed as its tensor's shape."""
    parts, pieces, offset = [], [], 0
    for tensor in tensors:
        part = buffer[offset:offset + tensor.numel()].view(tensor.shape)
        offset += tensor.numel()
        parts.append(part)
        row_bytes = tensor.element_size() * (tensor[0].numel() if len(tensor) else 1)
        rows = max(1, UPLOAD_PIECE_BYTES // row_bytes)
        pieces += [(part[start:start + rows], tensor[start:start + rows]) for start in range(0, len(tensor), rows)]
    if pool is None or len(pieces) < 2:
        for target, source in pieces:
            target.copy_(source)
    else:
        for done in [pool.submit(target.copy_, source) for target, source in pieces]:
            done.result()
    return parts
