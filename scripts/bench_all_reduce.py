"""What one tensor-parallel all-reduce costs inside a CUDA graph, by path: the Lamport
kernel, PyTorch's one-shot all-reduce over symmetric memory, and NCCL, against a graph of
the same number of one-element-op kernels (the floor any kernel pays). Each graph holds 64
calls, as one decode step of the 8B shape has; the printed time is per call, the median
of --repeats replays, with the ranks lined up by a barrier before each.

    python scripts/bench_all_reduce.py --world-size 2 --sizes 8192 32768 262144

Needs --world-size GPUs on this host (the shards' one-host case)."""

from __future__ import annotations

import argparse
import multiprocessing
import statistics

import torch
import torch.distributed as dist

CALLS_PER_GRAPH = 64


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768, 262144],
                        help="message sizes in bytes, bfloat16 (8192: one decode row of hidden size 4096)")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    bad = [size for size in args.sizes if size <= 0 or size % 4]
    if bad:
        parser.error(f"--sizes are whole bfloat16 messages of a positive multiple of 4 bytes; got {bad}")
    return args


def _graph_of(op, x: torch.Tensor) -> torch.cuda.CUDAGraph:
    """CALLS_PER_GRAPH calls of op(x), captured (after warm-up runs, as the engine does)."""
    from workers.cuda_graphs import capture

    def calls():
        for _ in range(CALLS_PER_GRAPH):
            op(x)

    return capture(calls, None)[0]


def _per_call_us(graph: torch.cuda.CUDAGraph, repeats: int) -> float:
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / CALLS_PER_GRAPH)
    return statistics.median(times)


def _rank_main(rank: int, world_size: int, port: int, args, results) -> None:
    from workers.kernels import lamport_all_reduce as lamport_kernel
    from workers.one_shot_all_reduce import try_one_shot_all_reduce
    from workers.parallel import init_process_group

    torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0)
    pg = init_process_group(rank, world_size, "127.0.0.1", port, "cuda", store=store)
    device = torch.device("cuda", rank)
    one_shot = try_one_shot_all_reduce(pg, device)
    if one_shot is None:
        raise RuntimeError("the one-shot all-reduce is unavailable on this host (see the warning above)")
    lamport = one_shot._lamport

    def symmetric_memory(t):
        one_shot._lamport = None
        try:
            one_shot(t)
        finally:
            one_shot._lamport = lamport

    # Each path with the messages it takes (a larger one goes elsewhere in the engine).
    paths = {"Lamport": (lamport, lambda t: lamport is not None and lamport_kernel.takes(t)),
             "one kernel (floor)": (lambda t: t.mul_(1.0), lambda t: True),
             "symmetric-memory one-shot": (symmetric_memory, one_shot.fits),
             "NCCL": (lambda t: dist.all_reduce(t, group=pg._device_group), lambda t: True)}
    rows = []
    for nbytes in args.sizes:
        x = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)
        for name, (op, takes) in paths.items():
            us = _per_call_us(_graph_of(op, x), args.repeats) if takes(x) else None
            rows.append((nbytes, name, us))
    if rank == 0:
        results.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    if torch.cuda.device_count() < args.world_size:
        raise SystemExit(f"needs {args.world_size} GPUs on this host, it has {torch.cuda.device_count()}")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, args.world_size, port, args, results))
             for r in range(args.world_size)]
    for p in procs:
        p.start()
    try:
        rows = _wait_for_rows(procs, results)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    nccl = {nbytes: us for nbytes, name, us in rows if name == "NCCL"}
    print(f"world size {args.world_size}, bfloat16, {CALLS_PER_GRAPH} calls per CUDA graph, "
          f"median of {args.repeats} replays")
    print(f"{'bytes':>8} {'path':<26} {'us/call':>8} {'vs NCCL':>8}")
    for nbytes, name, us in rows:
        if us is None:
            print(f"{nbytes:>8} {name:<26} {'—':>8} {'':>8}  (not a size this path takes)")
        else:
            print(f"{nbytes:>8} {name:<26} {us:8.2f} {us / nccl[nbytes]:7.2f}x")


def _wait_for_rows(procs, results, timeout_s: float = 300.0) -> list:
    """Rank 0's rows; stops at once, naming the rank, if a rank exits without them."""
    import queue
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return results.get(timeout=0.5)
        except queue.Empty:
            failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if failed:
                raise SystemExit(f"rank {failed[0]} exited with code {procs[failed[0]].exitcode} (its error is above)")
    raise SystemExit(f"no result within {timeout_s:.0f} s")


if __name__ == "__main__":
    main()
