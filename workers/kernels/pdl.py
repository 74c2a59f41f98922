"""Programmatic dependent launch (PDL; CUDA compute capability 9.0+) for the step's Triton
kernels: each may start while the kernel before it runs, so a GEMV streams weights during
the small kernel before it. Runs in each shard; SHARDSERVE_PDL=0 turns it off."""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

ENABLED = os.environ.get("SHARDSERVE_PDL", "1") != "0"


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for launching a kernel that takes the PDL constexpr: with PDL on
    CUDA devices that have it (compute capability >= 9.0), without it elsewhere
    (older GPUs, Triton's interpreter, SHARDSERVE_PDL=0)."""
    if ENABLED and triton is not None and device.type == "cuda" and _has_pdl(device.index):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@functools.cache
def _has_pdl(index: int | None) -> bool:
    """An NVIDIA GPU with PDL (compute capability >= 9.0; ROCm reports its own numbers
    there) and a Triton that can emit it (3.3 and newer: griddepcontrol in tl.extra.cuda,
    and the launch_pdl launch option)."""
    if torch.version.hip is not None or not hasattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait"):
        return False
    return torch.cuda.get_device_capability(index if index is not None else torch.cuda.current_device())[0] >= 9


# The rule every kernel launched with PDL keeps: each program calls wait_for_producer
# before its first read of anything a kernel may write (activations, the cache, step
# inputs, workspaces) and before any store; only weights may be read before it. So a kernel
# ends only after the one before it has, and ordering stays transitive along the stream.
# Small kernels start with release_then_wait; the GEMV releases after its weight loop.
if triton is not None:

    @triton.jit
    def wait_for_producer(PDL: tl.constexpr):
        """Blocks until the kernel before this one in the stream has finished and its
        writes are visible (a no-op without PDL, where the launch itself waited)."""
        if PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def release_then_wait(PDL: tl.constexpr):
        """A small kernel's first step: the next kernel may start launching, and this one
        waits for the kernel before it (release_dependents, then wait_for_producer)."""
        release_dependents(PDL)
        wait_for_producer(PDL)

    @triton.jit
    def release_dependents(PDL: tl.constexpr):
        """Lets the next kernel in the stream start launching its programs (each still
        waits for this kernel to finish before it reads what this one writes)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
