"""Where a decode's device time goes, per shard and by kernel: torch.profiler on every
shard (LLM.engine.start_profile / stop_profile) while one prompt decodes, then each rank's
kernels summed by name, costliest first. Also says which all-reduce each shard's group
runs (NCCL alone, or the symmetric-memory one-shot and whether its Lamport kernel is on),
since a shard that cannot see its peers' GPUs falls back to NCCL with only a log line.

    python scripts/profile_kernels.py --model-shape llama-3.1-8b --load-format dummy --dtype bfloat16 -tp 2

Without --model-shape / --model it runs the built-in default model (on CPU there are no
kernels to list; the all-reduce line and the per-rank totals still print)."""

from __future__ import annotations

import argparse
import collections
import json
import tempfile

import ray

from cluster import LLM, SamplingParams
from scripts.bench_args import add_model_args, init_ray, model_path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--top", type=int, default=12, help="kernels listed per rank")
    return parser.parse_args(argv)


def all_reduce_path(shard) -> str:
    """On the shard: the group's all-reduce for small messages, in words."""
    fast = shard.runner.pg.fast_all_reduce
    if shard.runner.pg.world_size == 1:
        return "none (TP=1)"
    if fast is None:
        return "NCCL only" if shard.runner.device.type == "cuda" else "gloo only (CPU)"
    from workers.kernels.lamport_all_reduce import MAX_NUMEL

    lamport = (f"on for bfloat16/float16 messages up to {MAX_NUMEL * 2 // 1024} KiB"
               if getattr(fast, "_lamport", None) is not None else "off")
    return f"{type(fast).__name__} (symmetric memory), Lamport kernel {lamport}"


def kernels_by_name(trace_path: str) -> dict[str, tuple[float, int]]:
    """{kernel name: (total µs, launches)} from a Chrome trace torch.profiler wrote."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for event in events:
        if event.get("cat") == "kernel":
            totals[event["name"]][0] += event["dur"]
            totals[event["name"]][1] += 1
    return {name: (total, count) for name, (total, count) in totals.items()}


def main(argv=None) -> dict[int, dict[str, tuple[float, int]]]:
    args = parse_args(argv)
    init_ray()
    llm = LLM(model_path(args), tensor_parallel_size=args.tensor_parallel_size, load_format=args.load_format,
              dtype=args.dtype, max_model_len=args.max_model_len)
    try:
        prompt = [{"prompt_token_ids": [100 + i % 1000 for i in range(args.prompt_len)]}]
        llm.generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
        paths = ray.get([shard.__ray_call__.remote(all_reduce_path) for shard in llm.engine.shards])
        for rank, path in enumerate(paths):
            print(f"rank {rank} all-reduce: {path}")
        folder = tempfile.mkdtemp(prefix="profile-kernels-")
        llm.engine.start_profile()
        llm.generate(prompt, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True), use_tqdm=False)
        traces = sorted(p for p in llm.engine.stop_profile(folder) if p.endswith(".json"))
    finally:
        llm.shutdown()
    by_rank = {}
    for rank, trace in enumerate(traces):
        kernels = kernels_by_name(trace)
        by_rank[rank] = kernels
        total = sum(us for us, _ in kernels.values())
        launches = sum(n for _, n in kernels.values())
        print(f"rank {rank}: {launches} kernels, {total / 1e3:.2f} ms over {args.max_tokens} tokens ({trace})")
        for name, (us, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:args.top]:
            print(f"  {us / 1e3:9.2f} ms {n:7d} x {us / n:8.2f} us  {name[:70]}")
    return by_rank


if __name__ == "__main__":
    main()
