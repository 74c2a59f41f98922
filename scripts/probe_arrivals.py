"""The engine alone (an AsyncEngine in this process, no Serve) under Poisson arrivals,
against concurrency 1: median and p90 time to first token and median time per output
token, per phase. A server's first token under load is the engine's plus its intake; this
says which part grew. Random token-id prompts, each once (no prefix cache hit).

    python scripts/probe_arrivals.py --model-shape llama-3.1-8b --load-format dummy --dtype bfloat16 \\
        --device cuda --rates 16 40

On nvidia-h200 (8B shape) this found the eager mixed steps: at 16 req/s the median first
token took 56.5 ms against 9.3 at concurrency 1 (BENCHMARKS.md, "Mixed steps")."""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from scripts.bench_args import add_model_args, init_ray, model_path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--rates", type=float, nargs="+", default=[16.0, 40.0], help="requests/s, Poisson arrivals")
    parser.add_argument("--num-prompts", type=int, default=320, help="per rate")
    parser.add_argument("--c1-prompts", type=int, default=48, help="at concurrency 1, before and after the rates")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


class Probe:
    def __init__(self, engine, args):
        self.engine, self.args = engine, args
        self.rng = random.Random(args.seed)
        self.count = 0

    async def one(self, results: list) -> None:
        """One request, from start() to its last token: (TTFT ms, TPOT ms)."""
        from cluster.prompts import EnginePrompt
        from workers.sampling_params import SamplingParams

        ids = tuple(self.rng.randrange(self.engine.vocab_size) for _ in range(self.args.input_len))
        params = SamplingParams(temperature=0.0, max_tokens=self.args.output_len, ignore_eos=True)
        self.count += 1
        start = time.monotonic()
        stream = self.engine.start(f"probe-{self.count}", EnginePrompt(None, ids, None), params,
                                   asyncio.get_running_loop())
        first, tokens = None, 0
        async for update in stream.updates():
            if first is None and update.token_ids:
                first = time.monotonic()
            tokens += len(update.token_ids)
        end = time.monotonic()
        results.append(((first - start) * 1e3, (end - first) * 1e3 / max(tokens - 1, 1)))

    async def closed(self, concurrency: int, count: int) -> list:
        results, slots = [], asyncio.Semaphore(concurrency)

        async def limited():
            async with slots:
                await self.one(results)

        await asyncio.gather(*[limited() for _ in range(count)])
        return results

    async def poisson(self, rate: float, count: int) -> list:
        results, tasks, arrivals = [], [], random.Random(self.args.seed + 1)
        for _ in range(count):
            tasks.append(asyncio.create_task(self.one(results)))
            await asyncio.sleep(arrivals.expovariate(rate))
        await asyncio.gather(*tasks)
        return results


def summary(results: list) -> dict:
    ttft = sorted(r[0] for r in results)
    return {"requests": len(results), "median TTFT (ms)": statistics.median(ttft),
            "p90 TTFT (ms)": ttft[int(0.9 * (len(ttft) - 1))],
            "median TPOT (ms)": statistics.median(r[1] for r in results)}


async def run(engine, args) -> dict:
    probe = Probe(engine, args)
    await probe.closed(4, 8)  # warm-up
    phases = [("c1", probe.closed(1, args.c1_prompts))]
    phases += [(f"{rate:g} req/s", probe.poisson(rate, args.num_prompts)) for rate in args.rates]
    phases += [("c1 again", probe.closed(1, args.c1_prompts))]
    rows = {}
    for name, phase in phases:
        rows[name] = summary(await phase)
        print(f"{name:>12}  " + "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in rows[name].items()), flush=True)
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    from cluster.async_engine import AsyncEngine
    from cluster.engine_args import EngineArgs

    init_ray()
    engine = AsyncEngine(EngineArgs(
        model=model_path(args), tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
        load_format=args.load_format, device=args.device, max_model_len=args.max_model_len,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes, enable_prefix_caching=False))
    print(f"TP={args.tensor_parallel_size}, {args.input_len} -> {args.output_len} tokens, rates {args.rates}")
    try:
        return asyncio.run(run(engine, args))
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
