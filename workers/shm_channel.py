"""Rank 0's step plans to the other ranks of one host through shared memory. A gloo
broadcast of a pickled plan costs about 0.9 ms a step between two processes (two TCP
round trips), which at TP=2 is a third of an 8B model's decode step; here the leader writes
the bytes into a ring of slots in a file under /dev/shm and each follower polls for the
next one. Plans larger than a slot still go through gloo, marked in the slot so every rank
takes the same path. Runs in each shard, on CPU and GPU alike.

A slot holds (sequence number, length, payload); each follower publishes the sequence
number it read last. The leader reuses a slot only once every follower has read the
message in it. The sequence number is written after the payload, as one aligned 8-byte
store, so a follower that sees it sees the payload: x86-64 keeps stores (and loads) in
program order. Other architectures (e.g. aarch64) may reorder them, so there the plans go
through gloo."""

from __future__ import annotations

import logging
import mmap
import os
import pickle
import platform
import tempfile
import time
import uuid
from collections.abc import Callable

import numpy as np

NUM_SLOTS = 4
SLOT_BYTES = 1 << 20  # a batch-256 plan with new requests pickles to tens of KiB
_HEADER = 16  # int64 sequence number, int64 payload length (-1: sent through gloo)
# A waiting rank of a GPU engine yields the GIL between polls for this long, then sleeps
# between polls. A CPU engine's ranks sleep between polls from the start: their cores run
# the forward pass (on 2 cores at TP=2, spinning ranks decoded at 18.8 ms a token, gloo at
# 17.8 and sleeping ranks at 18.1: scripts/profile_shards.py -tp 2 --max-tokens 128).
SPIN_S = 0.02
SLEEP_S = 2e-4

logger = logging.getLogger(__name__)


class ShmBroadcastChannel:
    """Rank 0 writes, ranks 1..world_size-1 read, in order, every message."""

    def __init__(self, path: str, rank: int, world_size: int, create: bool, spin_s: float = SPIN_S):
        self.rank = rank
        self.spin_s = spin_s
        self._acks_offset = NUM_SLOTS * (_HEADER + SLOT_BYTES)
        size = self._acks_offset + 8 * world_size
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, size)  # zero-filled: no message yet, nothing read
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._slots = [
            (np.frombuffer(self._map, dtype=np.int64, count=2, offset=i * (_HEADER + SLOT_BYTES)),
             i * (_HEADER + SLOT_BYTES) + _HEADER)
            for i in range(NUM_SLOTS)
        ]
        self._acks = np.frombuffer(self._map, dtype=np.int64, count=world_size, offset=self._acks_offset)
        self._seq = 0  # messages written (leader) or read (follower) so far

    def broadcast(self, obj, via_gloo: Callable, timeout_s: float):
        """The leader's `obj` on every rank. `via_gloo(obj)` is the fallback broadcast
        for a message larger than a slot, called on every rank in the same message."""
        self._seq += 1
        header, offset = self._slots[self._seq % NUM_SLOTS]
        if self.rank == 0:
            payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            oldest_unread = self._seq - NUM_SLOTS
            self._wait(lambda: int(self._acks[1:].min()) >= oldest_unread, timeout_s)
            large = len(payload) > SLOT_BYTES
            if not large:
                self._map[offset : offset + len(payload)] = payload
            header[1] = -1 if large else len(payload)
            header[0] = self._seq  # last: publishes the slot
            return via_gloo(obj) if large else obj
        self._wait(lambda: int(header[0]) == self._seq, timeout_s)
        length = int(header[1])
        obj = via_gloo(None) if length < 0 else pickle.loads(self._map[offset : offset + length])
        self._acks[self.rank] = self._seq
        return obj

    def _wait(self, ready: Callable[[], bool], timeout_s: float) -> None:
        if ready():
            return
        start = time.monotonic()
        while not ready():
            waited = time.monotonic() - start
            if waited > timeout_s:
                raise TimeoutError(f"no message from the other ranks in {timeout_s:g} s")
            time.sleep(0 if waited < self.spin_s else SLEEP_S)

    def close(self) -> None:
        self._slots = self._acks = None
        self._map.close()


def try_shm_channel(pg, spin_s: float = SPIN_S) -> ShmBroadcastChannel | None:
    """A channel when every rank is on this x86-64 host and could map the leader's file
    (its waits spin for spin_s before they sleep between polls);
    None (gloo for everything) otherwise. Every rank agrees. The file is unlinked once all have
    mapped it, so nothing is left behind however the processes end."""
    usable = (os.environ.get("SHARDSERVE_USE_SHM_PLANS", "1") != "0"  # an ablation switch
              and platform.machine() in ("x86_64", "AMD64"))
    if not pg.on_one_host() or pg.all_reduce_min(int(usable)) == 0:
        return None
    channel, error, path = None, None, None
    if pg.is_leader:  # created before anyone hears the path
        directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        path = os.path.join(directory, f"shardserve-plans-{uuid.uuid4().hex}")
        channel, error = _open(path, pg, True, spin_s)
    path = pg.broadcast_object(path if channel is not None else None)
    if not pg.is_leader and path is not None:
        channel, error = _open(path, pg, False, spin_s)
    ok = pg.all_reduce_min(int(channel is not None)) == 1
    if pg.is_leader and channel is not None:
        os.unlink(path)
    if not ok:
        if error is not None:
            logger.warning("shared-memory plan channel unavailable, using gloo: %s", error)
        if channel is not None:
            channel.close()
        return None
    return channel


def _open(path: str, pg, create: bool, spin_s: float) -> tuple[ShmBroadcastChannel | None, OSError | None]:
    try:
        return ShmBroadcastChannel(path, pg.rank, pg.world_size, create=create, spin_s=spin_s), None
    except OSError as exc:
        return None, exc
