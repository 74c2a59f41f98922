"""api.metrics without Ray or Serve: the Prometheus text of a replica, and the refresher
that keeps the engine gauges current for Ray's exporter once requests flow."""

from __future__ import annotations

import asyncio
from api.metrics import METRICS, Metrics
from scripts.bench_serving import metric_samples
from workers.messages import EngineStats


def engine_stats(*, running: int, waiting: int, free_blocks: int, aborted: int = 0,
                 cache_queries: int = 0, cache_hits: int = 0, compiles: int = 0) -> EngineStats:
    return EngineStats(num_running=running, num_waiting=waiting, num_total_blocks=4,
                       num_free_blocks=free_blocks, num_aborted=aborted,
                       prefix_cache_queries=cache_queries, prefix_cache_hits=cache_hits,
                       num_kernel_compiles=compiles)


def samples(metrics: Metrics, stats=None) -> dict[str, float]:
    return metric_samples(metrics.render(stats).decode())


def test_prometheus_text_counts_requests_tokens_and_latencies():
    metrics = Metrics()
    metrics.count_finished("stop")
    metrics.observe_request(start=10.0, first_token=10.5, end=12.5, num_tokens=5)
    metrics.observe_intake("prompt_embeds", 0.004)
    values = samples(metrics, engine_stats(running=3, waiting=1, free_blocks=3, aborted=2,
                                           cache_queries=100, cache_hits=64, compiles=1))
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
    assert (values["shardserve_prefix_cache_queries_total"], values["shardserve_prefix_cache_hits_total"]) == (100, 64)
    assert values["shardserve_engine_kernel_compiles_total"] == 1
    # The engine's counts are cumulative: the counters follow them, never back.
    values = samples(metrics, engine_stats(running=0, waiting=0, free_blocks=4, aborted=5,
                                           cache_queries=180, cache_hits=64, compiles=3))
    assert values["shardserve_engine_aborted_requests_total"] == 5
    assert (values["shardserve_prefix_cache_queries_total"], values["shardserve_prefix_cache_hits_total"]) == (180, 64)
    assert values["shardserve_engine_kernel_compiles_total"] == 3
    assert set(metrics.ray) == set(METRICS)


def test_engine_gauges_refresh_without_a_scrape_once_requests_flow():
    async def scenario():
        read = asyncio.Event()

        async def stats():
            read.set()
            return engine_stats(running=2, waiting=5, free_blocks=2)

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


class RecordingRayMetric:
    """Stands in for one of Ray's metrics: what was handed to it."""

    def __init__(self):
        self.calls = []

    def set(self, value, tags=None):
        self.calls.append(("set", value))

    def inc(self, value=1, tags=None):
        self.calls.append(("inc", value))


def test_with_several_api_servers_only_the_reporting_one_hands_engine_figures_to_ray():
    """Each API server renders the engine's figures on its /metrics; Ray's metrics get them
    from one, or Ray's sums over the API servers would count them once per API server."""
    stats = engine_stats(running=3, waiting=1, free_blocks=3, aborted=2, cache_queries=10, cache_hits=4)
    engine_metrics = ["shardserve_num_requests_running", "shardserve_prefix_cache_queries"]
    for reports in (True, False):
        metrics = Metrics(api_servers=2, export_engine_stats=reports)
        recorded = {name: RecordingRayMetric() for name in engine_metrics}
        metrics.ray.update(recorded)
        values = samples(metrics, stats)
        assert values["shardserve_api_servers"] == 2
        assert values["shardserve_num_requests_running"] == 3 and values["shardserve_prefix_cache_queries_total"] == 10
        assert [metric.calls for metric in recorded.values()] == ([[("set", 3)], [("inc", 10)]] if reports else [[], []])
    assert samples(Metrics())["shardserve_api_servers"] == 1
