"""EmbedsHasher: the prefix cache's keys of embeddings prompts (each block's BLAKE3 digest
of its rows, workers.block_hash), made in a process of their own, one actor per engine.

The leader shard used to hash them on threads beside its step loop. The hash drops the GIL
for each block's 128 KiB, and each time a hashing thread wants it back it waits until the
step loop yields it: up to Python's 5 ms switch interval. Beside a busy step loop one such
thread hashed 14 prompts of 2 MiB a second (SHA-256 then), where alone it hashes about 650
(H200 host, session 26), and the scheduler waited for the digests. Here the threads have a process to
themselves. The engine client hashes a put of up to INLINE_DIGESTS_MAX_BYTES (1 MiB) of rows
itself, and sends the digests with the requests. For a larger put (an offline group, a long
prompt) it asks this actor for their digests right after the put. The leader gets the
reference to the answer and waits for it only when its scheduler first keys one of those
prompts, while it uploads the rows."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from workers.block_hash import embeds_block_digests, mixed_block_digests

# BLAKE3 hashes an 8B model's 2 MiB prompt in 0.54 ms on one of the H200 host's cores, and
# 0.24 ms a prompt on 4-8 threads (SHA-256: 1.85 and 0.30 ms; BENCHMARKS.md, "Prefix
# caching", session 27). Half of a host's cores at most: the shards and the driver share
# the node.
HASHER_THREADS = max(2, min(8, (os.cpu_count() or 4) // 2))
# Calls hashed at once (their prompts share the threads above).
HASHER_MAX_CONCURRENCY = 4
# A prompt's blocks are hashed this many to a task (each block's digest is its own), so one
# long prompt spreads over the threads.
BLOCKS_PER_TASK = 4

Spec = tuple[str, tuple[tuple[int, int], ...] | None]  # (dtype, embeds_spans) of one prompt


class EmbedsHasher:
    def __init__(self, block_size: int, threads: int = HASHER_THREADS):
        self.block_size = block_size
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="embeds-digests")

    def digests(self, arrays: np.ndarray | list[np.ndarray], specs: list[Spec]) -> list[tuple[bytes | None, ...]]:
        """Each prompt's block digests, in order. `arrays` is what the engine client put:
        one prompt's (seq_len, hidden) array, or a list of several prompts' arrays (Ray
        resolves the reference to them before the call: zero-copy on this node); `specs`
        has each one's dtype and, for a prompt that mixes token ids and rows, its spans."""
        if isinstance(arrays, np.ndarray):
            arrays = [arrays]
        if len(arrays) != len(specs):
            raise ValueError(f"{len(arrays)} embeddings arrays, but specs for {len(specs)}")
        hashing = [self._tasks(array, dtype, spans) for array, (dtype, spans) in zip(arrays, specs)]
        return [tuple(digest for task in tasks for digest in task.result()) for tasks in hashing]

    def _tasks(self, rows: np.ndarray, dtype: str, spans) -> list:
        """One prompt's hashing, as tasks on the threads whose digests, in order, are its
        digests: a mixed prompt whole, an embeddings prompt BLOCKS_PER_TASK blocks a task."""
        if spans is not None:
            return [self._threads.submit(mixed_block_digests, rows, dtype, spans, self.block_size)]
        step = BLOCKS_PER_TASK * self.block_size
        return [self._threads.submit(embeds_block_digests, rows[start:start + step], dtype, self.block_size)
                for start in range(0, rows.shape[0], step)]


def hasher_name(engine_name: str) -> str:
    return f"shardserve-{engine_name}-hasher"


def start_hasher(engine_name: str, block_size: int):
    """The engine's hasher actor, `shardserve-<name>-hasher`, on this node (where the engine
    client puts the rows), taking no CPU from what Ray schedules. Ray restarts it if its
    process dies, and runs again the calls that death cut short (hashing twice is
    harmless); a prompt whose digests the leader waited for in vain (workers.request.
    DIGESTS_WAIT_S) runs with its blocks unshared."""
    actor_cls = ray.remote(EmbedsHasher)
    here = ray.get_runtime_context().get_node_id()
    return actor_cls.options(
        name=hasher_name(engine_name), num_cpus=0, max_concurrency=HASHER_MAX_CONCURRENCY,
        max_restarts=-1, max_task_retries=-1, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
    ).remote(block_size)
