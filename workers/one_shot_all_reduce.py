"""One-shot all-reduce for small messages between the GPUs of one host, over PyTorch's
symmetric memory: each rank copies its tensor into a buffer every rank maps, then one
kernel reads all ranks' copies over NVLink (peer-to-peer loads, no multicast) and sums
them. Decode steps all-reduce a few KiB twice per layer, where NCCL's latency dominates.
Messages of decode size in 16-bit floats take the barrier-free kernel of
workers/kernels/lamport_all_reduce.py instead (SHARDSERVE_LAMPORT_ALL_REDUCE=0 turns it
off). Captured in CUDA graphs like NCCL. Runs in each shard."""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from workers.kernels import lamport_all_reduce as lamport

MAX_BYTES = 1 << 20  # larger messages (prefill) go through NCCL
logger = logging.getLogger(__name__)
LAMPORT_ENABLED = os.environ.get("SHARDSERVE_LAMPORT_ALL_REDUCE", "1") != "0"


class OneShotAllReduce:
    """all_reduce(x) in place for contiguous x of at most MAX_BYTES; fits(x) says which."""

    def __init__(self, group, device: torch.device, use_lamport: bool = False):
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed before PyTorch 2.8
            symm_mem.enable_symm_mem_for_group(self.group_name)
        self.buffer = symm_mem.empty(MAX_BYTES, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)
        # The kernel that copies x into this rank's buffer, then sums every rank's (one
        # launch, where a copy then the reduce were two: 64 fewer kernels a decode step of
        # the 8B shape at TP > 1); PyTorch builds without it get the copy and the reduce.
        self._copy_and_reduce = getattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out", None)
        self._reduce = torch.ops.symm_mem.one_shot_all_reduce_out
        self._lamport = LamportAllReduce(group, device) if use_lamport else None

    def fits(self, x: torch.Tensor) -> bool:
        """Contiguous, at most MAX_BYTES, a multiple of 4 bytes long, and starting 16 bytes
        into its storage like the buffer's view does (the kernel takes x and the buffer
        only at the same alignment)."""
        nbytes = x.numel() * x.element_size()
        return (x.is_cuda and x.is_contiguous() and nbytes <= MAX_BYTES and nbytes % 4 == 0
                and x.storage_offset() * x.element_size() % 16 == 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._lamport is not None and lamport.takes(x):
            return self._lamport(x)
        flat = x.view(-1)
        staged = self.buffer[: flat.numel() * flat.element_size()].view(x.dtype)
        if self._copy_and_reduce is not None:
            # In place is safe: each thread reads its elements of x before the barrier
            # and writes the same elements of the sum after it.
            self._copy_and_reduce(staged, flat, "sum", self.group_name, flat)
        else:
            staged.copy_(flat)
            self._reduce(staged, "sum", self.group_name, flat)
        return x


class LamportAllReduce:
    """The barrier-free kernel's state on this rank: its receive buffer (symmetric memory,
    every rank's mapped here) and its programs' slot table."""

    def __init__(self, group, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        buffer = symm_mem.empty(lamport.buffer_numel(self.world_size), dtype=torch.int16, device=device)
        buffer.fill_(lamport.EMPTY)
        torch.cuda.synchronize(device)  # empty on every rank before the rendezvous returns on any
        handle = symm_mem.rendezvous(buffer, group.group_name)
        self._buffer = buffer
        # The handle maps each rank's whole allocation; the buffer may start past its base,
        # at the same offset on every rank (symmetric allocations).
        offset = buffer.data_ptr() - handle.buffer_ptrs[self.rank]
        self.buffers = torch.tensor([ptr + offset for ptr in handle.buffer_ptrs], dtype=torch.int64, device=device)
        self.slots = torch.zeros(lamport.MAX_PROGRAMS, dtype=torch.int32, device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return lamport.lamport_all_reduce(x, self.buffers, self.slots, self.rank, self.world_size)


def try_one_shot_all_reduce(pg, device: torch.device) -> OneShotAllReduce | None:
    """A OneShotAllReduce when every rank is on this host and each could set one up; None
    (NCCL for everything) otherwise. All ranks agree, so none waits in a collective the
    others skip."""
    communicator, error = None, None
    if pg.on_one_host():
        # Every rank takes the Lamport path or none does (the switch is per process).
        use_lamport = pg.all_reduce_min(int(LAMPORT_ENABLED and lamport.triton is not None)) == 1
        try:
            communicator = OneShotAllReduce(dist.group.WORLD, device, use_lamport)
        except (RuntimeError, AttributeError, ImportError) as exc:
            error = exc
    if pg.all_reduce_min(int(communicator is not None)) == 0:
        if error is not None:
            logger.warning("one-shot all-reduce unavailable, using NCCL: %s", error)
        return None
    return communicator
