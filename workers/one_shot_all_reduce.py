"""One-shot all-reduce for small messages between the GPUs of one host, over PyTorch's
symmetric memory: each rank copies its tensor into a buffer every rank maps, then one
kernel reads all ranks' copies over NVLink (peer-to-peer loads, no multicast) and sums
them. Decode steps all-reduce a few KiB twice per layer, where NCCL's latency dominates.
Captured in CUDA graphs like NCCL. Runs in each shard."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

MAX_BYTES = 1 << 20  # larger messages (prefill) go through NCCL
logger = logging.getLogger(__name__)


class OneShotAllReduce:
    """all_reduce(x) in place for contiguous x of at most MAX_BYTES; fits(x) says which."""

    def __init__(self, group, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed before PyTorch 2.8
            symm_mem.enable_symm_mem_for_group(self.group_name)
        self.buffer = symm_mem.empty(MAX_BYTES, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)
        self._op = torch.ops.symm_mem.one_shot_all_reduce_out

    def fits(self, x: torch.Tensor) -> bool:
        return x.is_cuda and x.is_contiguous() and x.numel() * x.element_size() <= MAX_BYTES

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.view(-1)
        staged = self.buffer[: flat.numel() * flat.element_size()].view(x.dtype)
        staged.copy_(flat)
        self._op(staged, "sum", self.group_name, flat)
        return x


def try_one_shot_all_reduce(pg, device: torch.device) -> OneShotAllReduce | None:
    """A OneShotAllReduce when every rank is on this host and each could set one up; None
    (NCCL for everything) otherwise. All ranks agree, so none waits in a collective the
    others skip."""
    communicator, error = None, None
    if pg.on_one_host():
        try:
            communicator = OneShotAllReduce(dist.group.WORLD, device)
        except (RuntimeError, AttributeError, ImportError) as exc:
            error = exc
    if pg.all_reduce_min(int(communicator is not None)) == 0:
        if error is not None:
            logger.warning("one-shot all-reduce unavailable, using NCCL: %s", error)
        return None
    return communicator
