"""What a `ray.put` of embeddings rows and a shard's read of them cost while the object store
hands out pages no process has touched yet, and after: the page faults behind an embeddings
prompt's first token.

    python scripts/probe_store_pages.py [--mib 16] [--puts 300] [--store-gib 0 2] [--preallocate] [--warmup]

For each object-store size (0: Ray's default, 30% of memory), a fresh local Ray: the driver
puts a --mib array --puts times, and an actor reads each one as a shard does (one copy out
of the store into a buffer of its own), then the driver drops it. Printed per quarter of
the puts: the median put and read in ms and the minor page faults each took. A page a
process has not touched costs it a fault (4 KiB each, 4,096 per 16 MiB), and a page no
process has touched costs the kernel a fresh zeroed page too. --preallocate also runs each
size but the default with RAY_preallocate_plasma_memory=1 (the store's pages populated when
Ray starts: for a store of tens of GiB that takes longer than Ray waits for its raylet).
--warmup also runs each size after the engine's own remedy, `warm_object_store` (what an
engine that takes embeddings writes into the store while its shards start), once Ray has
freed it.

On the H200 host the allocator came back to freed pages after the first few hundred MiB:
then a 2 MiB put took 0.9 ms with 6 faults, Ray's own cost. On the 2-core development
machine each new object lay past the last for most of the first lap of a 7 GiB store (9.7
against 1.7 ms per 16 MiB put). BENCHMARKS.md, session 27."""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import time


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def plasma_bytes_used() -> float:
    """The store's bytes in use, as `ray memory --stats-only` prints them."""
    from ray._private.internal_api import memory_summary

    match = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
    return float(match.group(1)) * 2**20 if match else 0.0


def run_one(mib: int, puts: int, store_gib: float, warmup: bool) -> None:
    import numpy as np
    import ray
    import torch

    kwargs = {"object_store_memory": int(store_gib * 2**30)} if store_gib else {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, **kwargs)

    @ray.remote(num_cpus=0)
    class Reader:
        def __init__(self, nbytes: int):
            self.buffer = torch.empty(nbytes, dtype=torch.uint8)
            self.buffer.fill_(0)

        def read(self, array) -> tuple[float, int]:
            began, before = time.perf_counter(), faults()
            self.buffer.copy_(torch.from_numpy(array.view(np.uint8).reshape(-1)))
            return time.perf_counter() - began, faults() - before

    nbytes = mib << 20
    array = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    reader = Reader.remote(nbytes)
    ray.get(reader.__ray_ready__.remote())
    store = ray.cluster_resources().get("object_store_memory", 0.0)
    label = f"store {store / 2**30:.1f} GiB" + (", preallocated" if os.environ.get("RAY_preallocate_plasma_memory") else "")
    if warmup:
        from cluster.engine_client import warm_object_store

        began, before = time.perf_counter(), faults()
        written = warm_object_store()
        took, warm_faults = time.perf_counter() - began, faults() - before
        while written and plasma_bytes_used() >= written:  # Ray frees dropped objects in batches, about once a second
            time.sleep(0.05)
        label += f", warmed ({written >> 20} MiB in {took * 1e3:.0f} ms, {warm_faults} faults)"
    rows = []
    for _ in range(puts):
        began, before = time.perf_counter(), faults()
        ref = ray.put(array)
        put_s, put_faults = time.perf_counter() - began, faults() - before
        read_s, read_faults = ray.get(reader.read.remote(ref))
        del ref
        rows.append((put_s, put_faults, read_s, read_faults))
    quarter = max(1, puts // 4)
    print(f"{label}: {puts} puts of {mib} MiB = {puts * nbytes / store:.2f} laps of the store")
    for q in range(0, puts, quarter):
        part = rows[q:q + quarter]
        med = [statistics.median(r[i] for r in part) for i in range(4)]
        print(f"  puts {q:>4}-{q + len(part) - 1:<4} put {med[0] * 1e3:7.2f} ms {med[1]:>6.0f} faults"
              f"   read {med[2] * 1e3:7.2f} ms {med[3]:>6.0f} faults")
    ray.shutdown()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--puts", type=int, default=300)
    parser.add_argument("--store-gib", type=float, nargs="+", default=[0, 2])
    parser.add_argument("--preallocate", action="store_true")
    parser.add_argument("--warmup", action="store_true")
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--warmed", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        run_one(args.mib, args.puts, args.one, args.warmed)
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    for store_gib in args.store_gib:
        variants = [({}, False)]  # (environment added, warmed by the engine's warm-up)
        if args.preallocate and store_gib:
            variants.append(({"RAY_preallocate_plasma_memory": "1"}, False))
        if args.warmup:
            variants.append(({}, True))
        for extra_env, warmed in variants:
            subprocess.run([sys.executable, __file__, "--mib", str(args.mib), "--puts", str(args.puts),
                            "--one", str(store_gib)] + (["--warmed"] if warmed else []),
                           env={**env, **extra_env}, check=True)


if __name__ == "__main__":
    main()
