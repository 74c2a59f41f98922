"""Online serving benchmark for a running `shardserve serve`, in the manner of
`vllm bench serve`: random prompts streamed to /v1/completions at a request rate or a
maximum concurrency; request and output-token throughput, TTFT, TPOT and ITL.

    shardserve serve --tensor-parallel-size 2 --enable-prompt-embeds --max-model-len 1024 &
    python scripts/bench_serving.py --num-prompts 64 --input-len 128 --output-len 64
    python scripts/bench_serving.py --compare-embeds          # token ids vs prompt_embeds
    python scripts/bench_serving.py --serving-overhead        # TTFT minus the engine's own
    python scripts/bench_serving.py --compare-embeds --prompts-per-request 16 --output-len 1   # batch requests

`--prompt-embeds` sends the same random token ids as prompt_embeds: the model's own input
embeddings of them (rows of the checkpoint's `model.embed_tokens.weight`, what Hugging Face's
`get_input_embeddings()` returns), so both modes do the same work. `--serving-overhead`
measures, at concurrency 1 and interleaved prompt by prompt, the HTTP time to first token
and the offline engine's own (an in-process `LLM` with the same settings, `generate` with
max_tokens=1, which includes the engine client's Ray intake and output path) and reports
the difference of the medians: what HTTP, Ray Serve and the ingress add. That LLM needs
its own shards beside the server's (on one GPU keep --engine-kv-cache-memory-bytes small).
`--prompts-per-request K` sends K prompts in each request, as a list (`prompt` of K token-id
lists, or `prompt_embeds` of K payloads, OpenAI's batch form); a request's TTFT is its first
choice's first token, and its TPOT counts the tokens of one choice.
Talks only to loopback addresses."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import multiprocessing
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import torch

from api.embeds_codec import encode_prompt_embeds
from cluster.default_model import default_model_path, model_shape_path
from workers.config import ModelConfig, parse_dtype

NUM_WARMUP = 2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", default=None, help="served model name (default: the server's first)")
    parser.add_argument("--model-path", default=None,
                        help="the served model's folder, for vocab and embeddings (default: built-in)")
    parser.add_argument("--model-shape", default=None,
                        help="instead of --model-path: a shape from configs/models that the server runs with "
                             "--load-format dummy (its prompt_embeds are then random rows, see embed_rows)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="requests/s, Poisson arrivals; inf sends all at once")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-embeds", action="store_true", help="send the prompts as prompt_embeds")
    parser.add_argument("--compare-embeds", action="store_true", help="run token ids and prompt_embeds, print the ratio")
    parser.add_argument("--prompts-per-request", type=int, default=1, metavar="K",
                        help="prompts in each request's list (--num-prompts counts prompts, a multiple of K)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of the prompts per mode; with --compare-embeds in A B B A order, so that "
                             "drift (a warming server, a busy machine) weighs on both modes alike")
    parser.add_argument("--client-processes", type=int, default=1, metavar="N",
                        help="send the timed requests from N client processes, each with its share of the "
                             "prompts, of --max-concurrency and of --request-rate, started together each "
                             "round: one process's event loop also reads every chunk of every stream")
    parser.add_argument("--num-warmups", type=int, default=16,
                        help="untimed requests of each mode first, at the same concurrency (the "
                             "server's first-use costs fall on no timed mode)")
    parser.add_argument("--serving-overhead", action="store_true",
                        help="also measure TTFT at concurrency 1 minus the engine's own TTFT")
    parser.add_argument("--overhead-prompts", type=int, default=40, help="prompts for --serving-overhead")
    # The in-process engine of --serving-overhead: the server's settings.
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="device of the in-process engine for --serving-overhead (match the server's)")
    parser.add_argument("--engine-kv-cache-memory-bytes", type=int, default=64 << 20)
    return parser.parse_args(argv)


def check_loopback(base_url: str) -> None:
    host = urlparse(base_url).hostname or ""
    try:
        is_loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        is_loopback = False
    if not is_loopback:
        raise SystemExit(f"--base-url must be a loopback address (127.0.0.1, ::1, localhost), got {host!r}")


INTAKE = "shardserve_request_intake_seconds"
INTAKE_INPUT = {"token ids": "prompt", "prompt_embeds": "prompt_embeds"}
COMPILES = "shardserve_engine_kernel_compiles_total"
CACHE_QUERIES, CACHE_HITS = "shardserve_prefix_cache_queries_total", "shardserve_prefix_cache_hits_total"
API_SERVERS = "shardserve_api_servers"


def metric_samples(text: str) -> dict[str, float]:
    """Prometheus text as {sample with its labels: value}."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def server_metrics(base_url: str) -> dict[str, float] | None:
    """The server's /metrics samples; None when it is not a shardserve server."""
    text = httpx.get(base_url.rstrip("/").removesuffix("/v1") + "/metrics").text
    return metric_samples(text) if f"# TYPE {INTAKE} histogram" in text else None


def server_intake(samples: dict[str, float], mode: str) -> tuple[float, float]:
    """(sum in s, count) of the server's intake histogram for this mode's input: the time
    from a request's arrival at the replica to its choices running in the engine."""
    label = f'{{input="{INTAKE_INPUT[mode]}"}}'
    return samples.get(f"{INTAKE}_sum{label}", 0.0), samples.get(f"{INTAKE}_count{label}", 0.0)


def kernel_compiles(samples: dict[str, float]) -> float:
    """Triton kernels the engine compiled while serving (each stalled a step)."""
    return samples.get(COMPILES, 0.0)


def prefix_cache_tokens(samples: dict[str, float]) -> np.ndarray:
    """(prompt tokens looked up in the engine's prefix cache, those found there), totals.
    A /metrics scrape reads the engine's stats then, so a round's difference is exact."""
    return np.array([samples.get(CACHE_QUERIES, 0.0), samples.get(CACHE_HITS, 0.0)])


def random_prompts(num_prompts: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Random token ids, clear of the low ids where small vocabularies keep their specials."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (num_prompts, length), generator=gen).tolist()


def embed_rows(model_path: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    """The checkpoint's input embeddings of each prompt, (input_len, hidden) each. A folder
    without weights (a model shape, served with --load-format dummy) has no table to read:
    its rows are seeded random normals of the config's hidden size and dtype (scaled as
    trained Llama embeddings are), the same bytes on the wire and the same work in the
    engine as its own table's rows would be."""
    from safetensors import safe_open

    name = "model.embed_tokens.weight"
    if not any(model_path.glob("*.safetensors")):
        config = ModelConfig.from_pretrained(model_path)
        gen = torch.Generator().manual_seed(sum(map(sum, prompts)))  # other prompts, other rows
        dtype = parse_dtype(config.torch_dtype)
        return [(torch.randn(len(ids), config.hidden_size, generator=gen) * 0.02).to(dtype) for ids in prompts]
    for file in sorted(model_path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as checkpoint:
            if name in checkpoint.keys():
                table = checkpoint.get_tensor(name)
                return [table[ids].clone() for ids in prompts]
    raise SystemExit(f"{model_path} has no {name} in its *.safetensors; --prompt-embeds needs the weights")


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


async def send(http: httpx.AsyncClient, url: str, body: bytes) -> RequestResult:
    """One streamed completion; times its first chunk and the gaps between chunks."""
    start = last = time.perf_counter()
    result = RequestResult(ok=False)
    async with http.stream("POST", url, content=body, headers={"content-type": "application/json"}) as response:
        if response.status_code != 200:
            result.error = f"{response.status_code}: {(await response.aread())[:200]!r}"
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk, now = json.loads(line[6:]), time.perf_counter()
            if chunk.get("usage"):
                result.output_tokens = chunk["usage"]["completion_tokens"]
            if not chunk["choices"]:
                continue
            if result.ttft == 0.0:
                result.ttft = now - start
            else:
                result.itl.append(now - last)
            last = now
    result.latency, result.ok = time.perf_counter() - start, True
    return result


def client(args, max_connections: int) -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits, headers=headers)


async def run(args, url: str, bodies: list[bytes], *, max_concurrency: int | None, rate: float,
              untimed: list[bytes] = (), ready=lambda: None):
    """Sends `bodies` on a Poisson schedule (or all at once), at most max_concurrency in
    flight, after the `untimed` requests (on the same client: they open its connection)
    and then ready() (other client processes' barrier). Returns the results, the wall time
    and this process's CPU time over the timed requests (a client near one core's worth
    would be what limits the run, not the server)."""
    in_flight = max_concurrency or len(bodies)
    semaphore = asyncio.Semaphore(in_flight)
    arrivals = random.Random(args.seed)

    async def limited(body: bytes) -> RequestResult:
        async with semaphore:
            return await send(http, url, body)

    async with client(args, in_flight) as http:
        for body in untimed:  # other prompts than the timed ones, which would be cached
            await send(http, url, body)
        ready()
        start, cpu_start, tasks = time.perf_counter(), time.process_time(), []
        for body in bodies:
            tasks.append(asyncio.create_task(limited(body)))
            if rate != float("inf"):
                await asyncio.sleep(arrivals.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start, time.process_time() - cpu_start


class Clients:
    """Where the timed requests go from: this process, or --client-processes worker
    processes (started once; a barrier starts each round's timed requests in all of them
    together, so the round lasts as long as the slowest)."""

    def __init__(self, args, url: str):
        self.args, self.url, self.num = args, url, args.client_processes
        self.pool = None
        if self.num > 1:
            # The workers import this module by its package name (this file may run as a
            # script or through runpy, whose functions do not pickle), and are spawned: this
            # process's torch threads stay here.
            from scripts import bench_serving

            context = multiprocessing.get_context("spawn")
            self.run_share = bench_serving.run_share
            self.pool = context.Pool(self.num, initializer=bench_serving.set_barrier,
                                     initargs=(context.Barrier(self.num),))

    def run(self, bodies: list[bytes], untimed: list[bytes], *, max_concurrency: int | None, rate: float):
        """As run(), the results of every process together, the round's wall time and
        the processes' CPU time summed (each process sends its share of `untimed` first)."""
        if self.pool is None:
            return asyncio.run(run(self.args, self.url, bodies, max_concurrency=max_concurrency, rate=rate,
                                   untimed=untimed))
        num = self.num
        concurrency = [None if max_concurrency is None else max(1, max_concurrency // num + (i < max_concurrency % num))
                       for i in range(num)]
        shares = [(self.args, self.url, bodies[i::num], untimed[i::num], concurrency[i], rate / num)
                  for i in range(num)]
        parts = self.pool.starmap(self.run_share, shares)
        return ([result for part in parts for result in part[0]], max(part[1] for part in parts),
                sum(part[2] for part in parts))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


_BARRIER = None


def set_barrier(barrier) -> None:
    """A client process's barrier (Clients' pool initializer)."""
    global _BARRIER
    _BARRIER = barrier


def run_share(args, url: str, bodies: list[bytes], untimed: list[bytes], max_concurrency: int | None, rate: float):
    """One client process's share of a round (Clients.run)."""
    return asyncio.run(run(args, url, bodies, max_concurrency=max_concurrency, rate=rate, untimed=untimed,
                           ready=_BARRIER.wait))


def round_order(modes: list[str], rounds: int) -> list[str]:
    """Each mode `rounds` times; two modes alternate A B B A A B ..."""
    order = []
    for i in range(rounds):
        order += modes if i % 2 == 0 else modes[::-1]
    return order


def completion_body(model: str, prompt, output_len: int, per_token_chunks: bool = False) -> bytes:
    """The streamed request's JSON; `prompt` token ids, a tensor of embeddings, or a list
    (a batch request) of either. per_token_chunks: ask for each token's logprob, for a
    model without a tokenizer (a --model-shape): its tokens have no text, and the server
    sends no chunk for a token with neither text nor logprobs, so only the last chunk
    would come and TTFT would read as the whole request."""
    body = {"model": model, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if per_token_chunks:
        body["logprobs"] = 0
    if isinstance(prompt, torch.Tensor):
        body.update(prompt="", prompt_embeds=encode_prompt_embeds(prompt))
    elif prompt and isinstance(prompt[0], torch.Tensor):
        body.update(prompt="", prompt_embeds=[encode_prompt_embeds(rows) for rows in prompt])
    else:
        body["prompt"] = prompt
    return json.dumps(body).encode()


def batched(prompts: list, per_request: int) -> list:
    """The prompts as requests of `per_request` each (a list each), or one a request."""
    if per_request == 1:
        return prompts
    return [prompts[i:i + per_request] for i in range(0, len(prompts), per_request)]


def summarize(results: list[RequestResult], duration: float, choices: int = 1) -> dict[str, float]:
    """`choices`: per request, whose tokens stream side by side (TPOT counts one's)."""
    done = [r for r in results if r.ok]
    if not done:
        raise SystemExit(f"every request failed; first error: {results[0].error}")
    ms = lambda values: np.asarray(values, dtype=float) * 1000.0  # noqa: E731
    ttft = ms([r.ttft for r in done])
    tpot = ms([(r.latency - r.ttft) / (r.output_tokens / choices - 1)
               for r in done if r.output_tokens / choices > 1] or [0.0])
    itl = ms([gap for r in done for gap in r.itl] or [0.0])
    output_tokens = sum(r.output_tokens for r in done)
    metrics = {"successful requests": len(done), "failed requests": len(results) - len(done),
               "duration (s)": duration, "request throughput (req/s)": len(done) / duration,
               "output token throughput (tok/s)": output_tokens / duration,
               "total output tokens": output_tokens}
    for name, values in (("TTFT", ttft), ("TPOT", tpot), ("ITL", itl)):
        metrics[f"mean {name} (ms)"] = float(values.mean())
        metrics[f"median {name} (ms)"] = float(np.median(values))
        metrics[f"p99 {name} (ms)"] = float(np.percentile(values, 99))
    return metrics


def print_table(title: str, columns: dict[str, dict[str, float]], ratio: bool = False) -> None:
    names = list(columns)
    header = f"{'':<34}" + "".join(f"{n:>16}" for n in names) + (f"{'ratio':>10}" if ratio else "")
    print(f"\n{'=' * 20} {title} {'=' * 20}\n{header}")
    for key in columns[names[0]]:
        values = [columns[n][key] for n in names]
        row = f"{key:<34}" + "".join(f"{v:>16.2f}" if isinstance(v, float) else f"{v:>16}" for v in values)
        if ratio and values[0]:
            row += f"{values[-1] / values[0]:>9.3f}x"
        print(row)


def serving_overhead(args, url: str, model: str, model_path: Path, prompts: dict[str, list]) -> dict:
    """Per mode, median TTFT over HTTP and of the in-process engine at concurrency 1."""
    import ray

    from cluster import LLM

    if not ray.is_initialized():
        # address="local": a Ray of its own even where `ray start` left a cluster on this
        # machine (the server's, whose GPUs it holds), which ray.init() would join.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, args.tensor_parallel_size),
                 include_dashboard=False, log_to_driver=False)
    with LLM(str(model_path), tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
             load_format=args.load_format, max_model_len=args.max_model_len, enable_prompt_embeds=True,
             kv_cache_memory_bytes=args.engine_kv_cache_memory_bytes, device=args.device,
             enable_prefix_caching=False) as llm:  # the server computes each of these prompts once too
        return {mode: asyncio.run(_overhead(args, url, model, llm, mode_prompts))
                for mode, mode_prompts in prompts.items()}


async def _overhead(args, url: str, model: str, llm, prompts: list) -> dict:
    """Interleaved, prompt by prompt: the engine's TTFT (LLM.generate, max_tokens=1, which
    returns at the first token) and the same prompt over HTTP on a kept-alive connection,
    the engine first for even prompts and HTTP first for odd ones (neither always runs
    just after the other's leftover work)."""
    from cluster import SamplingParams

    one_token = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    http_ms, engine_ms = [], []
    async with client(args, 1) as http:
        for i, prompt in enumerate(prompts):
            offline = {"prompt_embeds": prompt} if isinstance(prompt, torch.Tensor) else {"prompt_token_ids": prompt}
            body = completion_body(model, prompt, 1)
            if i % 2:
                result = await send(http, url, body)
            start = time.perf_counter()
            llm.generate([offline], one_token, use_tqdm=False)  # blocks the loop: nothing else runs
            engine_s = time.perf_counter() - start
            if not i % 2:
                result = await send(http, url, body)
            if not result.ok:
                raise SystemExit(f"request failed: {result.error}")
            if i >= NUM_WARMUP:
                engine_ms.append(engine_s * 1000)
                http_ms.append(result.ttft * 1000)
    http_median, engine_median = statistics.median(http_ms), statistics.median(engine_ms)
    return {"median HTTP TTFT (ms)": http_median, "median engine TTFT (ms)": engine_median,
            "serving overhead (ms)": http_median - engine_median, "samples": len(http_ms)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_loopback(args.base_url)
    url = args.base_url.rstrip("/") + "/completions"
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or httpx.get(args.base_url.rstrip("/") + "/models", headers=headers).json()["data"][0]["id"]
    if args.model_shape:
        model_path = model_shape_path(args.model_shape)
    else:
        model_path = Path(args.model_path) if args.model_path else default_model_path()
    vocab = ModelConfig.from_pretrained(model_path).vocab_size
    per_request = args.prompts_per_request
    if per_request < 1 or args.num_prompts % per_request or args.num_warmups % per_request:
        raise SystemExit("--prompts-per-request must divide --num-prompts and --num-warmups")
    if not 1 <= args.client_processes <= args.num_prompts // per_request:
        raise SystemExit("--client-processes must be between 1 and the number of requests")
    modes = ["token ids", "prompt_embeds"] if args.compare_embeds else \
        ["prompt_embeds" if args.prompt_embeds else "token ids"]
    print(f"model={model} prompts={args.num_prompts} input_len={args.input_len} output_len={args.output_len} "
          f"request_rate={args.request_rate} max_concurrency={args.max_concurrency} base_url={args.base_url}"
          + (f" prompts_per_request={per_request}" if per_request > 1 else "")
          + (f" client_processes={args.client_processes}" if args.client_processes > 1 else ""))
    per_token = args.model_shape is not None

    def bodies(mode: str, num_prompts: int, seed: int) -> list[bytes]:
        """The requests of num_prompts random prompts drawn from `seed`, as `mode` sends them."""
        prompts = random_prompts(num_prompts, args.input_len, vocab, seed)
        if mode == "prompt_embeds":
            prompts = embed_rows(model_path, prompts)
        return [completion_body(model, p, args.output_len, per_token) for p in batched(prompts, per_request)]

    for mode in modes if args.num_warmups else ():  # untimed, own prompts: no timed prompt is cached
        asyncio.run(run(args, url, bodies(mode, args.num_warmups, args.seed + 2),
                        max_concurrency=args.max_concurrency, rate=float("inf")))
    results, durations, client_cpu = {m: [] for m in modes}, {m: 0.0 for m in modes}, {m: 0.0 for m in modes}
    # The timed requests' server intake (seconds, count), the engine's kernel compiles and
    # prefix-cache lookups (tokens queried, found) meanwhile, per mode, from the server's
    # /metrics before and after each round (its untimed requests included). Each round's
    # prompts are new to this run, but an earlier run's may still be cached (the same
    # --seed draws the same prompts, and a smaller --num-prompts the first of them): the
    # hit rate shows it.
    intake = {m: [0.0, 0.0] for m in modes}
    compiles = dict.fromkeys(modes)  # None: no shardserve /metrics read
    cache_tokens = {m: np.zeros(2) for m in modes}
    rounds_run = dict.fromkeys(modes, 0)
    clients = Clients(args, url)
    for mode in round_order(modes, args.rounds):
        # Each round its own prompts (a server's prefix cache would serve a repeat), the
        # same ones for both modes (embeddings rows are never a cache hit for token ids),
        # and others again for the untimed requests that open its connections.
        seed = args.seed + 100 * rounds_run[mode]
        timed = bodies(mode, args.num_prompts, seed)
        untimed = bodies(mode, NUM_WARMUP * per_request * args.client_processes, seed + 50)
        rounds_run[mode] += 1
        before = server_metrics(args.base_url)
        mode_results, duration, cpu = clients.run(timed, untimed, max_concurrency=args.max_concurrency,
                                                  rate=args.request_rate)
        client_cpu[mode] += cpu
        after = server_metrics(args.base_url)
        results[mode] += mode_results
        durations[mode] += duration
        if before is not None and after is not None:
            compiles[mode] = (compiles[mode] or 0.0) + kernel_compiles(after) - kernel_compiles(before)
            cache_tokens[mode] += prefix_cache_tokens(after) - prefix_cache_tokens(before)
        # With several API servers per engine each scrape is one API server's (Serve's router
        # picks it): the engine's figures above are every one's, its intake only that one's.
        if before is not None and after is not None and max(before.get(API_SERVERS, 1), after.get(API_SERVERS, 1)) == 1:
            (sum_before, count_before) = server_intake(before, mode)
            (sum_after, count_after) = server_intake(after, mode)
            intake[mode][0] += sum_after - sum_before
            intake[mode][1] += count_after - count_before
    clients.close()
    report = {m: summarize(results[m], durations[m], per_request) for m in modes}
    for mode in modes:  # of all client processes together
        report[mode]["client CPU (% of a core)"] = 100.0 * client_cpu[mode] / durations[mode]
        if intake[mode][1]:
            report[mode]["mean server intake (ms)"] = intake[mode][0] / intake[mode][1] * 1e3
        if compiles[mode] is not None:
            report[mode]["kernel compiles while serving"] = int(compiles[mode])
        if cache_tokens[mode][0]:
            report[mode]["prefix cache hit rate (%)"] = 100.0 * cache_tokens[mode][1] / cache_tokens[mode][0]
    print_table("Serving Benchmark Result", report, ratio=len(modes) == 2)
    if args.serving_overhead:
        overhead_prompts = random_prompts(args.overhead_prompts + NUM_WARMUP, args.input_len, vocab, args.seed + 1)
        per_mode = {m: embed_rows(model_path, overhead_prompts) if m == "prompt_embeds" else overhead_prompts
                    for m in modes}
        overhead = serving_overhead(args, url, model, model_path, per_mode)
        print_table("Serving overhead at concurrency 1 (max_tokens=1)", overhead, ratio=len(modes) == 2)
        report["overhead"] = overhead
    return report


if __name__ == "__main__":
    main()
