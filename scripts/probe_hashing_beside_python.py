"""How fast threads hash embeddings prompts beside a thread that runs Python, as the leader
shard's step loop does: the GIL convoy that moved the prefix cache's hashing into an actor
of its own (cluster/embeds_hasher.py; BENCHMARKS.md, "Prefix caching", session 26).

    python scripts/probe_hashing_beside_python.py [--threads 0 1 2 4 8]

Each row: a Python-bound loop's time beside N hashing threads, and how many prompts (256 x
4096 bfloat16 rows, 2 MiB, in 16-row blocks as workers.block_hash digests them) those
threads hashed a second meanwhile. The hash (BLAKE3 since session 27, SHA-256 before)
drops the GIL for each block; to get it back a thread waits until the running one yields
it, up to Python's switch interval (5 ms). How long depends on how the OS places the
threads: on the 2-core development machine one SHA-256 thread managed 21 prompts a second
in some runs and 216 in others (about 800 alone); on the 16-core H200 host, 14 (session
26). BLAKE3, 2.5x faster alone on the development machine, hashed 21-22 a second beside
the loop there: the wait for the GIL, not the hash, sets the pace."""

from __future__ import annotations

import argparse
import sys
import threading
import time

import numpy as np

from workers.block_hash import embeds_block_digests


def busy_python(iterations: int = 300_000) -> float:
    """Seconds of a loop that holds the GIL the whole time (dicts, lists, arithmetic)."""
    start, total = time.perf_counter(), 0
    for i in range(iterations):
        entry = {"a": i}
        total += len([j for j in range(4)]) + entry["a"]
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    args = parser.parse_args(argv)
    prompts = np.random.default_rng(0).integers(0, 65535, (64, 256, 4096), dtype=np.uint16)
    start = time.perf_counter()
    embeds_block_digests(prompts[0], "bfloat16", 16)
    print(f"one prompt alone: {(time.perf_counter() - start) * 1e3:.2f} ms; "
          f"switch interval {sys.getswitchinterval() * 1e3:g} ms")
    print(f"{'hashing threads':>15} {'busy loop ms':>13} {'prompts hashed/s':>17}")
    for count in args.threads:
        stop, hashed = threading.Event(), [0]

        def hash_prompts():
            i = 0
            while not stop.is_set():
                embeds_block_digests(prompts[i % len(prompts)], "bfloat16", 16)
                hashed[0] += 1
                i += 1

        threads = [threading.Thread(target=hash_prompts, daemon=True) for _ in range(count)]
        for thread in threads:
            thread.start()
        began = time.perf_counter()
        busy = busy_python()
        elapsed = time.perf_counter() - began
        stop.set()
        for thread in threads:
            thread.join()
        print(f"{count:>15} {busy * 1e3:13.1f} {hashed[0] / elapsed:17.0f}")


if __name__ == "__main__":
    main()
