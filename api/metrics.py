"""Prometheus metrics of one replica, served as text on /metrics: requests by status,
time to first token, time per output token, running and waiting requests, KV-cache
usage. Runs in the Serve ingress."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """One registry per replica (no process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "shardserve_requests", "Finished completion choices, by finish status",
            ["status"], registry=self.registry)
        self.ttft = Histogram(
            "shardserve_time_to_first_token_seconds", "Time to first token",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram(
            "shardserve_time_per_output_token_seconds", "Time per output token after the first",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=self.registry)
        self.e2e = Histogram(
            "shardserve_e2e_request_latency_seconds", "End-to-end latency of a choice",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.generation_tokens = Counter(
            "shardserve_generation_tokens", "Generated tokens", registry=self.registry)
        self.running = Gauge("shardserve_num_requests_running", "Requests running in the engine",
                             registry=self.registry)
        self.waiting = Gauge("shardserve_num_requests_waiting", "Requests waiting for KV blocks",
                             registry=self.registry)
        self.kv_usage = Gauge("shardserve_kv_cache_usage_perc", "Fraction of KV-cache blocks in use",
                              registry=self.registry)

    def count_finished(self, status: str) -> None:
        self.requests.labels(status=status).inc()

    def observe_request(self, start: float, first_token: float | None, end: float, num_tokens: int) -> None:
        self.e2e.observe(end - start)
        self.generation_tokens.inc(num_tokens)
        if first_token is not None:
            self.ttft.observe(first_token - start)
            if num_tokens > 1:
                self.tpot.observe((end - first_token) / (num_tokens - 1))

    def render(self, stats) -> bytes:
        """Prometheus text exposition, with the engine gauges refreshed from `stats`."""
        if stats is not None:
            self.running.set(stats.num_running)
            self.waiting.set(stats.num_waiting)
            self.kv_usage.set(stats.kv_cache_usage)
        return generate_latest(self.registry)
