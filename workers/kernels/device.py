"""What the Triton kernels ask of the device they run on: whether the paged-cache kernels
fit a model's head size and cache blocks, and the GPU's SM count (which sizes their grids)."""

from __future__ import annotations

import functools

import torch

try:
    import triton
except ImportError:  # CPU-only installs
    triton = None


def supports_paged_cache(device: torch.device, head_dim: int, block_size: int) -> bool:
    """The paged-cache kernels run on CUDA with power-of-two head_dim >= 16 and block_size
    (Triton ranges; tensor-core dots need 16)."""
    def is_pow2(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    return (triton is not None and device.type == "cuda" and is_pow2(head_dim) and head_dim >= 16
            and is_pow2(block_size))


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (Triton's interpreter)."""
    if device.type != "cuda":
        return 1
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
