"""The tensor-parallel group a shard belongs to, passed into the model as an object.

At world size 1 every collective is a no-op, so layers test in one process against
nn.Linear / nn.Embedding. Runs in each shard process."""

from __future__ import annotations

import pickle
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


class ProcessGroup:
    """Rank, size and the collectives the model and step loop use.

    `all_reduce`, `gather` and `broadcast` run on the device group (NCCL on GPU, gloo on CPU);
    `broadcast_object` and `all_reduce_min` run on a CPU (gloo) group, for step plans, or
    `broadcast_object` through shared memory when every rank is on one host.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, device_group=None, cpu_group=None,
                 timeout_s: float = 1800.0):
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._device_group = device_group
        self._cpu_group = cpu_group
        self.fast_all_reduce = None  # e.g. OneShotAllReduce: small messages on one host
        self.object_channel = None  # e.g. ShmBroadcastChannel: step plans on one host
        self._on_one_host: bool | None = None

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns x."""
        if self.world_size > 1:
            if self.fast_all_reduce is not None and self.fast_all_reduce.fits(x):
                return self.fast_all_reduce(x)
            dist.all_reduce(x, group=self._device_group)
        return x

    def gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x concatenated along `dim`, on every rank (bit for bit the same
        tensor on each). One all-gather: a single collective, where NCCL's gather is a
        send/recv per rank."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = torch.empty((self.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(parts, x, group=self._device_group)
        return torch.cat(parts.chunk(self.world_size), dim=dim)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x into x on every rank (device group, in stream order); returns x."""
        if self.world_size > 1:
            dist.broadcast(x, src=0, group=self._device_group)
        return x

    def broadcast_object(self, obj=None):
        """Rank 0's `obj` on every rank (pickled: through the shared-memory channel when
        there is one, else over gloo as a length then the bytes)."""
        if self.world_size == 1:
            return obj
        if self.object_channel is not None:
            return self.object_channel.broadcast(obj, self._broadcast_object_gloo, self.timeout_s)
        return self._broadcast_object_gloo(obj)

    def _broadcast_object_gloo(self, obj=None):
        if self.is_leader:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            size = torch.tensor([payload.numel()], dtype=torch.int64)
        else:
            size = torch.empty(1, dtype=torch.int64)
        dist.broadcast(size, src=0, group=self._cpu_group)
        if not self.is_leader:
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(payload, src=0, group=self._cpu_group)
        return obj if self.is_leader else pickle.loads(payload.numpy().tobytes())

    def all_gather_object(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank (CPU group)."""
        if self.world_size == 1:
            return [obj]
        objects = [None] * self.world_size
        dist.all_gather_object(objects, obj, group=self._cpu_group)
        return objects

    def on_one_host(self) -> bool:
        """Whether every rank runs on this host (the same answer on every rank; asked of
        all ranks once, then remembered)."""
        if self._on_one_host is None:
            self._on_one_host = len(set(self.all_gather_object(socket.gethostname()))) == 1
        return self._on_one_host

    def all_reduce_min(self, value: int) -> int:
        """The smallest `value` over ranks (e.g. KV blocks that fit on every shard)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._cpu_group)
        return int(t.item())


def init_process_group(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    device: str,
    timeout_s: float = 1800.0,
    store: dist.Store | None = None,
) -> ProcessGroup:
    """Joins the torch.distributed group (NCCL on GPU, gloo on CPU) plus a gloo CPU group.

    Rank 0 passes the TCPStore it already bound on a free port (see `bind_store`)."""
    if world_size == 1:
        return ProcessGroup()
    timeout = timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(master_addr, master_port, world_size, is_master=False, timeout=timeout)
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=timeout
    )
    device_group = dist.group.WORLD
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else device_group
    return ProcessGroup(rank, world_size, device_group, cpu_group, timeout_s)


def bind_store(host: str, world_size: int, timeout_s: float = 1800.0) -> dist.TCPStore:
    """Rank 0's rendezvous store on a port the OS picks (no hard-coded port, no race)."""
    # wait_for_workers=False: return at once so the caller can publish the port; the
    # default would block here until every rank had joined, which needs that port.
    return dist.TCPStore(
        host, 0, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
