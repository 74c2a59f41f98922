"""Programmatic dependent launch (PDL; CUDA, compute capability 9.0 and newer) for the
decode step's Triton kernels. A kernel launched with PDL may start while the kernel before
it in the stream is still running; it waits (griddepcontrol.wait) before it touches any
memory that kernel may write, so until then it can only read what no kernel writes: the
GEMV prefetches its first weight tile there. A kernel lets the next one start
(griddepcontrol.launch_dependents) once it no longer needs the SM slots for itself: the
small kernels right away, the GEMV after its weight loop. Inside a captured CUDA graph the
launches become programmatic edges, so a batch-1 decode step overlaps each small kernel
(norm, RoPE and K/V write, attention) with the weight streaming of the GEMV after it.

The rule every kernel here keeps: each program calls wait_for_producer before its first
read of an activation, the cache, a step input or a workspace, and before any store. So a
kernel finishes only after the kernel before it has, and ordering stays transitive along
the stream. SHARDSERVE_PDL=0 turns it off (an ablation switch)."""

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
    """The GPU has PDL (compute capability >= 9.0) and this Triton can emit it (3.3 and
    newer: griddepcontrol in tl.extra.cuda, and the launch_pdl launch option)."""
    if not hasattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait"):
        return False
    return torch.cuda.get_device_capability(index if index is not None else torch.cuda.current_device())[0] >= 9


if triton is not None:

    @triton.jit
    def wait_for_producer(PDL: tl.constexpr):
        """Blocks until the kernel before this one in the stream has finished and its
        writes are visible (a no-op without PDL, where the launch itself waited)."""
        if PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def release_dependents(PDL: tl.constexpr):
        """Lets the next kernel in the stream start launching its programs (each still
        waits for this kernel to finish before it reads what this one writes)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
