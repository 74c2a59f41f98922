"""api.metrics without Ray or Serve: the Prometheus text of a replica, and the refresher
that keeps the engine gauges current for Ray's exporter once requests flow."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from api.metrics import METRICS, Metrics


def samples(metrics: Metrics, stats=None) -> dict[str, float]:
    text = metrics.render(stats).decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_prometheus_text_counts_requests_tokens_and_latencies():
    metrics = Metrics()
    metrics.count_finished("stop")
    metrics.observe_request(start=10.0, first_token=10.5, end=12.5, num_tokens=5)
    metrics.observe_intake("prompt_embeds", 0.004)
    values = samples(metrics, SimpleNamespace(num_running=3, num_waiting=1, kv_cache_usage=0.25, num_aborted=2))
    assert values['shardserve_requests_total{status="stop"}'] == 1
    assert values["shardserve_generation_tokens_total"] == 5
    assert values["shardserve_time_to_first_token_seconds_sum"] == 0.5
    assert values["shardserve_time_per_output_token_seconds_sum"] == 0.5  # 2 s over 4 tokens
    assert values["shardserve_e2e_request_latency_seconds_sum"] == 2.5
    assert values['shardserve_request_intake_seconds_sum{input="prompt_embeds"}'] == 0.004
    assert values['shardserve_request_intake_seconds_bucket{input="prompt_embeds",le="0.0025"}'] == 0
    assert values['shardserve_request_intake_seconds_bucket{input="prompt_embeds",le="0.005"}'] == 1
    assert (values["shardserve_num_requests_running"], values["shardserve_num_requests_waiting"],
            values["shardserve_kv_cache_usage_perc"]) == (3, 1, 0.25)
    assert values["shardserve_engine_aborted_requests_total"] == 2
    # The engine's count is cumulative: the counter follows it, never back.
    values = samples(metrics, SimpleNamespace(num_running=0, num_waiting=0, kv_cache_usage=0.0, num_aborted=5))
    assert values["shardserve_engine_aborted_requests_total"] == 5
    assert set(metrics.ray) == set(METRICS)


def test_engine_gauges_refresh_without_a_scrape_once_requests_flow():
    async def scenario():
        read = asyncio.Event()

        async def stats():
            read.set()
            return SimpleNamespace(num_running=2, num_waiting=5, kv_cache_usage=0.5, num_aborted=0)

        metrics = Metrics(stats_source=stats)
        metrics.count_finished("length")  # the first request starts the refresher
        # stats() returns without suspending, so the refresher stores the figures before
        # this wait can resume.
        await asyncio.wait_for(read.wait(), timeout=10)
        metrics._refresher.cancel()
        return samples(metrics)  # no stats passed: the refreshed values are shown

    values = asyncio.run(scenario())
    assert (values["shardserve_num_requests_running"], values["shardserve_num_requests_waiting"],
            values["shardserve_kv_cache_usage_perc"]) == (2, 5, 0.5)
