"""The shared-memory channel that carries step plans from rank 0 to the other ranks of one
host: every rank receives every message in order, through wrap-arounds of the slot ring,
a leader that runs ahead of slow readers, and messages too large for a slot (which go
through gloo on every rank). Real processes on a gloo group (CPU)."""

from __future__ import annotations

import os
import time

import pytest

from tests.workers.conftest import run_distributed
from workers.shm_channel import NUM_SLOTS, SLOT_BYTES, ShmBroadcastChannel, try_shm_channel


def _messages() -> list:
    small = [{"step": i, "ids": list(range(i % 7))} for i in range(3 * NUM_SLOTS + 1)]
    large = b"x" * (SLOT_BYTES + 1)  # larger than a slot: through gloo
    return small[:5] + [large] + small[5:] + [None, large, "last"]


def _exchange(pg, slow_rank: int):
    channel = try_shm_channel(pg)
    assert channel is not None, "every rank is on this host: the channel must come up"
    pg.object_channel = channel
    files = sorted(f for f in os.listdir("/dev/shm") if f.startswith("shardserve-plans-")) \
        if os.path.isdir("/dev/shm") else []
    received = []
    for message in _messages():
        if pg.rank == slow_rank:
            time.sleep(0.01)  # the leader runs ahead until the ring is full, then waits
        received.append(pg.broadcast_object(message if pg.is_leader else None))
    channel.close()
    return received, files


@pytest.mark.parametrize("world_size, slow_rank", [(2, 1), (3, 2), (3, 0)])
def test_every_rank_receives_every_message_in_order(world_size, slow_rank):
    results = run_distributed(_exchange, world_size, slow_rank)
    expected = _messages()
    for rank, (received, _) in enumerate(results):
        assert received == expected, f"rank {rank}"
    # Unlinked once mapped: nothing of this group's is left in /dev/shm.
    leader_files = results[0][1]
    assert not any(os.path.exists(os.path.join("/dev/shm", f)) for f in leader_files)


def test_a_reader_times_out_when_the_leader_never_writes(tmp_path):
    path = str(tmp_path / "plans")
    leader = ShmBroadcastChannel(path, 0, 2, create=True)
    follower = ShmBroadcastChannel(path, 1, 2, create=False)
    try:
        with pytest.raises(TimeoutError, match="no message"):
            follower.broadcast(None, lambda obj: pytest.fail("no gloo here"), timeout_s=0.05)
    finally:
        follower.close()
        leader.close()


def test_the_leader_waits_for_a_reader_before_reusing_its_slot(tmp_path):
    path = str(tmp_path / "plans")
    leader = ShmBroadcastChannel(path, 0, 2, create=True, spin_s=0.0)  # sleeps between polls
    follower = ShmBroadcastChannel(path, 1, 2, create=False, spin_s=0.0)
    try:
        for i in range(NUM_SLOTS):  # fills the ring; nobody has read
            leader.broadcast(i, None, timeout_s=1)
        with pytest.raises(TimeoutError):
            leader.broadcast("overwrites slot 1", None, timeout_s=0.05)
        leader._seq -= 1  # the failed write did not happen
        assert [follower.broadcast(None, None, timeout_s=1) for _ in range(2)] == [0, 1]
        leader.broadcast("now fits", None, timeout_s=1)
        rest = [follower.broadcast(None, None, timeout_s=1) for _ in range(NUM_SLOTS - 1)]
        assert rest == [2, 3, "now fits"]
    finally:
        follower.close()
        leader.close()
