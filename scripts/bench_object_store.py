"""The object-store hand-off of a prompt's embeddings, alone: the engine's one `ray.put` of
a (rows, hidden) array, then one actor call per shard that receives it as the engine sends
it (the reference as a top-level argument, resolved by Ray before the call runs), against
the same calls carrying token ids only. Interleaved, medians of --repeats. Also prints the
object store's size beside /dev/shm's: a store larger than /dev/shm is kept on disk.

    python scripts/bench_object_store.py --rows 128 --hidden 4096 --dtype bfloat16 --num-actors 2

"send -> run" is from the driver's call to the method's first line (time.time(): one clock
for every process of a host); "round trip" is the call to its result back on the driver."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time

import ray
import torch

from cluster.engine_client import EngineClient
from cluster.prompts import to_object_store_array
from workers.config import parse_dtype


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-actors", type=int, default=2, help="shards that each receive the request")
    parser.add_argument("--repeats", type=int, default=100)
    return parser.parse_args(argv)


@ray.remote(num_cpus=0)
class Receiver:
    """Stands in for a shard's add_requests: notes when the call starts running."""

    def add_request(self, request, embeds_array=None) -> float:
        started = time.time()
        if embeds_array is not None:
            assert embeds_array.ndim == 2  # the array itself arrived, not a reference
        return started


def _call(receivers, request, embeds: torch.Tensor | None) -> tuple[float, float, float]:
    """(put ms, send -> run ms of the slowest receiver, round trip ms); with `embeds`, the
    engine's put first and its ref as every call's argument."""
    put_ms, ref = 0.0, None
    if embeds is not None:
        array, dtype = to_object_store_array(embeds)
        start = time.perf_counter()
        ref = EngineClient.put_prompt_embeds(array, dtype).ref
        put_ms = (time.perf_counter() - start) * 1e3
    sent, start = time.time(), time.perf_counter()
    started = ray.get([receiver.add_request.remote(request, ref) for receiver in receivers])
    round_trip = (time.perf_counter() - start) * 1e3
    return put_ms, (max(started) - sent) * 1e3, round_trip


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    tensor = torch.randn(args.rows, args.hidden).to(parse_dtype(args.dtype))
    ids = tuple(range(10, 10 + args.rows))
    receivers = [Receiver.remote() for _ in range(args.num_actors)]
    try:
        for _ in range(3):  # warm-up: workers started, first calls paid
            _call(receivers, ids, None)
            _call(receivers, None, tensor)
        figures = {"token ids": [], "prompt_embeds": []}
        for i in range(args.repeats):
            for mode in (("token ids", "prompt_embeds") if i % 2 else ("prompt_embeds", "token ids")):
                figures[mode].append(_call(receivers, ids, None) if mode == "token ids" else _call(receivers, None, tensor))
    finally:
        for receiver in receivers:
            ray.kill(receiver)
    result = {}
    for mode, runs in figures.items():
        for column, name in ((1, "send -> run"), (2, "round trip")):
            result[f"{mode}: {name} (ms)"] = statistics.median(run[column] for run in runs)
    result["prompt_embeds: ray.put (ms)"] = statistics.median(run[0] for run in figures["prompt_embeds"])
    store_bytes = ray.cluster_resources().get("object_store_memory", 0.0)
    shm = shutil.disk_usage("/dev/shm") if os.path.isdir("/dev/shm") else None
    megabytes = tensor.numel() * tensor.element_size() / 1e6
    print(f"{args.rows} x {args.hidden} {args.dtype} ({megabytes:.2f} MB) to {args.num_actors} actor(s), "
          f"medians of {args.repeats}; object store {store_bytes / 1e9:.1f} GB, "
          + (f"/dev/shm {shm.total / 1e9:.1f} GB ({shm.free / 1e9:.1f} GB free)" if shm else "no /dev/shm"))
    for key, value in result.items():
        print(f"  {key:<34} {value:8.3f}")
    return result


if __name__ == "__main__":
    main()
