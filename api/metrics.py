"""Metrics of one replica, recorded twice: Prometheus text on the replica's /metrics, and
Ray's metrics (tagged with Serve's deployment / replica / application), which every
node's Ray metrics exporter serves under the `ray_` prefix. Runs in the Serve ingress."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from ray.serve import metrics as ray_metrics

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
INTAKE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# name -> (kind, help, tag names, buckets of a histogram): the one list both exporters are
# built from.
METRICS = {
    "shardserve_requests": ("counter", "Finished completion choices, by finish status", ("status",), None),
    "shardserve_generation_tokens": ("counter", "Generated tokens", (), None),
    "shardserve_time_to_first_token_seconds": ("histogram", "Time to first token", (), LATENCY_BUCKETS),
    "shardserve_time_per_output_token_seconds": (
        "histogram", "Time per output token after the first", (), TOKEN_BUCKETS),
    "shardserve_e2e_request_latency_seconds": (
        "histogram", "End-to-end latency of a choice", (), LATENCY_BUCKETS),
    "shardserve_request_intake_seconds": (
        "histogram", "From a request's arrival at the replica to all its choices running in the engine "
        "(body, checks, and for prompt_embeds their decode and ray.put), by input: prompt_embeds "
        "when the request has any, else prompt", ("input",), INTAKE_BUCKETS),
    "shardserve_api_servers": (
        "gauge", "API servers (ShardServe replicas) that share this one's engine (--api-server-count); with "
        "more than one, this /metrics has one API server's requests, Ray's metrics export every one's", (), None),
    "shardserve_num_requests_running": ("gauge", "Requests running in the engine", (), None),
    "shardserve_num_requests_waiting": ("gauge", "Requests waiting for KV blocks", (), None),
    "shardserve_kv_cache_usage_perc": ("gauge", "Fraction of KV-cache blocks in use", (), None),
    "shardserve_engine_aborted_requests": (
        "counter", "Requests the engine aborted and freed (client gone, stop string matched here)", (), None),
    "shardserve_prefix_cache_queries": (
        "counter", "Prompt tokens looked up in the prefix cache when a request was admitted", (), None),
    "shardserve_prefix_cache_hits": (
        "counter", "Prompt tokens found in the prefix cache (their K/V reused, not computed)", (), None),
    "shardserve_engine_kernel_compiles": (
        "counter", "Triton kernels the engine's leader shard compiled while serving (each stalled a step; "
        "the shard's log names the kernel and its specialization)", (), None),
}
# Counters the engine keeps as totals since it started: metric -> EngineStats field.
ENGINE_COUNTERS = {
    "shardserve_engine_aborted_requests": "num_aborted",
    "shardserve_prefix_cache_queries": "prefix_cache_queries",
    "shardserve_prefix_cache_hits": "prefix_cache_hits",
    "shardserve_engine_kernel_compiles": "num_kernel_compiles",
}
ENGINE_REFRESH_S = 2.0

StatsSource = Callable[[], Awaitable[object]]


def _prometheus_metric(name: str, registry: CollectorRegistry):
    kind, doc, tags, buckets = METRICS[name]
    if kind == "histogram":
        return Histogram(name, doc, list(tags), buckets=buckets, registry=registry)
    return {"counter": Counter, "gauge": Gauge}[kind](name, doc, list(tags), registry=registry)


def _ray_metric(name: str):
    kind, doc, tags, buckets = METRICS[name]
    if kind == "histogram":
        return ray_metrics.Histogram(name, doc, boundaries=list(buckets), tag_keys=tags or None)
    return {"counter": ray_metrics.Counter, "gauge": ray_metrics.Gauge}[kind](name, doc, tag_keys=tags or None)


class Metrics:
    """One Prometheus registry per replica (no process-global state). With `stats_source`
    (the engine's async stats), the engine gauges are refreshed every ENGINE_REFRESH_S
    once requests flow, so Ray's exporter sees them without anyone scraping /metrics.

    `api_servers`: how many API servers share the engine. Each renders the engine's figures
    on its /metrics, but only the one with `export_engine_stats` hands them to Ray's
    metrics, where the API servers' series would otherwise add up to a multiple of them."""

    def __init__(self, stats_source: StatsSource | None = None, *, api_servers: int = 1,
                 export_engine_stats: bool = True) -> None:
        self.registry = CollectorRegistry()
        self.prometheus = {name: _prometheus_metric(name, self.registry) for name in METRICS}
        self.ray = {name: _ray_metric(name) for name in METRICS}
        self.prometheus["shardserve_api_servers"].set(api_servers)
        self.ray["shardserve_api_servers"].set(api_servers)
        self._export_engine_stats = export_engine_stats
        self._stats_source = stats_source
        self._refresher: asyncio.Task | None = None
        self._engine_totals = dict.fromkeys(ENGINE_COUNTERS, 0)  # as last seen (counters only go up)

    def count_finished(self, status: str) -> None:
        self.prometheus["shardserve_requests"].labels(status=status).inc()
        self.ray["shardserve_requests"].inc(1, tags={"status": status})
        self._ensure_refresher()

    def observe_request(self, start: float, first_token: float | None, end: float, num_tokens: int) -> None:
        self._observe("shardserve_e2e_request_latency_seconds", end - start)
        self.prometheus["shardserve_generation_tokens"].inc(num_tokens)
        if num_tokens:
            self.ray["shardserve_generation_tokens"].inc(num_tokens)
        if first_token is not None:
            self._observe("shardserve_time_to_first_token_seconds", first_token - start)
            if num_tokens > 1:
                self._observe("shardserve_time_per_output_token_seconds", (end - first_token) / (num_tokens - 1))

    def observe_intake(self, input_kind: str, seconds: float) -> None:
        """input_kind: "prompt_embeds" (the request has any) or "prompt"."""
        self.prometheus["shardserve_request_intake_seconds"].labels(input=input_kind).observe(seconds)
        self.ray["shardserve_request_intake_seconds"].observe(seconds, tags={"input": input_kind})

    def _observe(self, name: str, value: float) -> None:
        self.prometheus[name].observe(value)
        self.ray[name].observe(value)

    def render(self, stats) -> bytes:
        """Prometheus text exposition, with the engine gauges refreshed from `stats`."""
        self.set_engine_stats(stats)
        return generate_latest(self.registry)

    def set_engine_stats(self, stats) -> None:
        """Engine gauges from an EngineStats (None: the engine is gone; keep the last)."""
        if stats is None:
            return
        for name, value in (("shardserve_num_requests_running", stats.num_running),
                            ("shardserve_num_requests_waiting", stats.num_waiting),
                            ("shardserve_kv_cache_usage_perc", stats.kv_cache_usage)):
            self.prometheus[name].set(value)
            if self._export_engine_stats:
                self.ray[name].set(value)
        for name, field in ENGINE_COUNTERS.items():
            total = getattr(stats, field)
            if total > self._engine_totals[name]:
                self.prometheus[name].inc(total - self._engine_totals[name])
                if self._export_engine_stats:
                    self.ray[name].inc(total - self._engine_totals[name])
                self._engine_totals[name] = total

    def _ensure_refresher(self) -> None:
        """Starts the gauge refresher on the replica's event loop, from the first request
        (the constructor may run where no loop is)."""
        if self._stats_source is None or self._refresher is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._refresher = loop.create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            try:
                self.set_engine_stats(await self._stats_source())
            except Exception:  # a failed read must not end the refresher
                logger.exception("reading engine stats for metrics failed")
            await asyncio.sleep(ENGINE_REFRESH_S)
