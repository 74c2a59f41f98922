"""Load test of a running shardserve server (loopback only, bounded in clients, rounds and
time): each round, N concurrent streaming clients (a fraction sending prompt_embeds, a
fraction dropping mid-stream). Every request must complete or be refused by deliberate
backpressure (429/503 with Retry-After); after each round the KV cache must be empty, and
the resident memory of the server's Ray processes must not grow across rounds.

    shardserve serve -tp 2 --enable-prompt-embeds --max-model-len 1024 --port 8000 &
    python scripts/load_test.py --base-url http://127.0.0.1:8000/v1 --clients 300 --rounds 3 \\
        --server-pid $!

Prints a report and exits 1 if a check fails."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from api.embeds_codec import encode_prompt_embeds
from scripts.bench_serving import check_loopback, metric_samples

# Ray actor classes whose processes make up a server: their RSS is what must not grow.
SERVER_ACTOR_CLASSES = ("ShardWorker", "ServeReplica", "ProxyActor")
SETTLE_TIMEOUT_S = 30.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=None, help="model name to send (default: the server's only model)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--clients", type=int, default=300, help="concurrent streaming clients per round (max 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (max 50); the first warms up")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--embeds-fraction", type=float, default=0.5, help="clients sending prompt_embeds")
    parser.add_argument("--disconnect-fraction", type=float, default=0.1, help="clients dropping mid-stream")
    parser.add_argument("--hidden-size", type=int, default=256, help="the model's hidden size (embeds width)")
    parser.add_argument("--time-limit-s", type=float, default=600.0, help="bound on the whole run")
    parser.add_argument("--server-pid", type=int, default=None,
                        help="pid of `shardserve serve`: its Ray actor processes are the ones whose RSS is read")
    parser.add_argument("--ray-address", default=None,
                        help="or the server's Ray cluster, to find them there (omit both: skip the RSS check "
                             "unless this process is already connected to Ray)")
    parser.add_argument("--max-rss-growth-mib", type=float, default=64.0,
                        help="allowed RSS growth of the server's processes from round 2 to the last")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    check_loopback(args.base_url)
    if not (1 <= args.clients <= 2000 and 1 <= args.rounds <= 50):
        raise SystemExit("--clients must be in [1, 2000] and --rounds in [1, 50]: the test is bounded")
    return args


@dataclass
class Outcome:
    kind: str  # completed | refused | disconnected | error
    detail: str = ""


def request_bodies(args, model: str, round_index: int) -> list[tuple[dict, bool]]:
    """(body, drops mid-stream) for each client of a round."""
    rng = random.Random(args.seed * 1000 + round_index)
    generator = torch.Generator().manual_seed(args.seed * 1000 + round_index)
    bodies = []
    for i in range(args.clients):
        body = {"model": model, "max_tokens": args.max_tokens, "stream": True, "ignore_eos": True,
                "prompt": f"Load test client {i}: the quick brown fox"}
        if rng.random() < args.embeds_fraction:
            rows = rng.randint(2, 12)
            body["prompt"] = ""
            body["prompt_embeds"] = encode_prompt_embeds(torch.randn(rows, args.hidden_size, generator=generator))
        bodies.append((body, rng.random() < args.disconnect_fraction))
    return bodies


async def one_client(http: httpx.AsyncClient, url: str, body: dict, drops: bool) -> Outcome:
    try:
        async with http.stream("POST", f"{url}/completions", json=body) as response:
            if response.status_code in (429, 503):
                if "retry-after" not in response.headers:
                    return Outcome("error", f"{response.status_code} without Retry-After")
                return Outcome("refused")
            if response.status_code != 200:
                return Outcome("error", f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            return await read_stream(response, drops)
    except httpx.HTTPError as exc:
        return Outcome("error", f"{type(exc).__name__}: {exc}")


async def read_stream(response: httpx.Response, drops: bool) -> Outcome:
    finish_reason = None
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            return Outcome("completed") if finish_reason else Outcome("error", "[DONE] without a finish_reason")
        event = json.loads(data)
        if "error" in event:
            return Outcome("error", f"error event: {event['error']['message']}")
        if drops:
            return Outcome("disconnected")  # leaving the block closes the connection mid-stream
        finish_reason = next((c["finish_reason"] for c in event["choices"] if c["finish_reason"]), finish_reason)
    return Outcome("error", "the stream ended without [DONE]")


async def run_round(args, url: str, model: str, round_index: int, deadline: float) -> dict[str, int]:
    bodies = request_bodies(args, model, round_index)
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits, headers=headers) as http:
        tasks = [one_client(http, url, body, drops) for body, drops in bodies]
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), max(deadline - time.monotonic(), 1.0))
    counts = {kind: 0 for kind in ("completed", "refused", "disconnected", "error")}
    for outcome in outcomes:
        counts[outcome.kind] += 1
    errors = sorted({o.detail for o in outcomes if o.kind == "error"})
    return {**counts, "error_samples": errors[:5]}


def server_metrics(root: str) -> dict[str, float]:
    return metric_samples(httpx.get(f"{root}/metrics", timeout=10).text)


def settle(root: str) -> dict[str, float]:
    """Bounded polling until no request runs or waits and every KV block is free (aborts
    of dropped clients reach the shards asynchronously)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        m = server_metrics(root)
        idle = m["shardserve_num_requests_running"] == 0 and m["shardserve_num_requests_waiting"] == 0
        if (idle and m["shardserve_kv_cache_usage_perc"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def server_pids(args) -> list[int]:
    """Pids of the server's shard, replica and proxy actors."""
    if args.server_pid is not None:
        return sorted(pid for pid in descendants(args.server_pid)
                      if _cmdline(pid).startswith(tuple(f"ray::{name}" for name in SERVER_ACTOR_CLASSES)))
    import ray
    from ray._private import state  # the GCS's actor table: works without the dashboard

    if not ray.is_initialized():
        if args.ray_address is None:
            return []
        ray.init(address=args.ray_address, log_to_driver=False)
    return sorted(info["Pid"] for info in state.actors().values()
                  if info["State"] == "ALIVE" and info["ActorClassName"].startswith(SERVER_ACTOR_CLASSES))


def descendants(pid: int) -> set[int]:
    """Every process below pid, from /proc's children lists (Linux)."""
    found, pending = set(), [pid]
    while pending:
        for task in Path(f"/proc/{pending.pop()}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            pending += [c for c in children if c not in found]
            found.update(children)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def rss_bytes(pids: list[int]) -> dict[int, int]:
    """VmRSS of each pid still alive, from /proc (the server runs on this machine)."""
    sizes = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as status:
                line = next(l for l in status if l.startswith("VmRSS:"))
            sizes[pid] = int(line.split()[1]) * 1024
        except (OSError, StopIteration):
            continue
    return sizes


def rss_growth_mib(first: dict[int, int], last: dict[int, int]) -> float:
    """Growth summed over the processes alive at both measurements."""
    return sum(last[pid] - first[pid] for pid in first.keys() & last.keys()) / (1 << 20)


def served_model(url: str, api_key: str | None) -> str:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.get(f"{url}/models", headers=headers, timeout=10).json()["data"][0]["id"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    url = args.base_url.rstrip("/")
    root = url.removesuffix("/v1")
    model = args.model or served_model(url, args.api_key)
    deadline = time.monotonic() + args.time_limit_s
    pids = server_pids(args)
    rounds, rss = [], []
    for index in range(args.rounds):
        started = time.monotonic()
        counts = asyncio.run(run_round(args, url, model, index, deadline))
        after = settle(root)
        rss.append(rss_bytes(pids))
        rounds.append({**counts, "seconds": round(time.monotonic() - started, 1),
                       "kv_cache_usage_after": after["shardserve_kv_cache_usage_perc"],
                       "running_after": after["shardserve_num_requests_running"],
                       "rss_mib": round(sum(rss[-1].values()) / (1 << 20), 1)})
        print(f"round {index}: {rounds[-1]}", flush=True)
    return report(args, rounds, rss, pids)


def report(args, rounds: list[dict], rss: list[dict[int, int]], pids: list[int]) -> dict:
    growth = rss_growth_mib(rss[1], rss[-1]) if len(rss) > 2 and pids else 0.0
    failures = []
    if any(r["error"] for r in rounds):
        failures.append(f"{sum(r['error'] for r in rounds)} requests failed: {rounds[-1]['error_samples']}")
    if any(r["kv_cache_usage_after"] or r["running_after"] for r in rounds):
        failures.append("KV blocks or requests were left after a round")
    if growth > args.max_rss_growth_mib:
        failures.append(f"server RSS grew {growth:.1f} MiB from round 1 to the last")
    totals = {kind: sum(r[kind] for r in rounds) for kind in ("completed", "refused", "disconnected", "error")}
    result = {"clients": args.clients, "rounds": rounds, "totals": totals, "processes": len(pids),
              "rss_growth_mib": round(growth, 1), "failures": failures, "ok": not failures}
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
