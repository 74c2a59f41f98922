"""Through Ray Serve and HTTP with the real `openai` client, on an application of its own
(route /asc) beside the session's server: two API servers on one tensor-parallel engine
(api_server_count 2: ShardServeEngine owns the engine, two ShardServe replicas attach to
it). Both answer, each with the same results as the session's one-server app; a stream
dropped on either frees its KV blocks; a dead shard fails both API servers' requests
cleanly and Serve brings the engine and the API servers back; deleting the application
lets a stream in flight finish before the engine's shards stop. The bench and /metrics know there are two."""

from __future__ import annotations

import json
import runpy
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import ray

from api.app import build_app
from api.embeds_codec import encode_prompt_embeds
from api.settings import DEFAULT_MODEL_NAME
from scripts.bench_serving import metric_samples
from tests.cluster.test_engine_faults import is_process_gone, wait_until
from tests.e2e.conftest import KV_CACHE_BYTES, stream_events
from tests.e2e.test_reliability import fail_then_recover
from tests.e2e.test_server import BENCH, GREEDY, random_embeds

APP = "asc"
ARGS = {"tensor_parallel_size": 2, "max_model_len": 1024, "kv_cache_memory_bytes": KV_CACHE_BYTES,
        "enable_prompt_embeds": True, "api_server_count": 2}
LONG = {"prompt": "The quick brown fox", "max_tokens": 900, "ignore_eos": True, "temperature": 0.0}
NUM_REQUESTS = 16


@pytest.fixture(scope="module")
def asc_url(server_url):
    from ray import serve

    serve.run(build_app(ARGS), name=APP, route_prefix=f"/{APP}")
    try:
        yield f"{server_url}/{APP}"
    finally:
        if APP in serve.status().applications:
            serve.delete(APP)


def engine_actors() -> dict[str, object]:
    """name -> handle of the actors of this module's engine (its shards and hasher)."""
    return {a["name"]: ray.get_actor(a["name"], namespace=a["namespace"])
            for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(f"shardserve-{APP}-")}


def leader():
    """The leader shard of this module's engine (ShardServeEngine names it)."""
    (handle,) = [handle for name, handle in engine_actors().items() if name.endswith("-rank0")]
    return handle


def is_idle() -> bool:
    stats = ray.get(leader().stats.remote())
    return stats.num_running == 0 and stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks


def completion(base_url: str, index: int) -> tuple[str, int]:
    """Request `index` of the burst, greedy: text or embeddings by parity. Its text and
    prompt_tokens."""
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    extra_body, prompt = dict(GREEDY["extra_body"]), f"Request {index}: the quick brown fox"
    if index % 2:
        extra_body["prompt_embeds"], prompt = encode_prompt_embeds(random_embeds(index, rows=3 + index)), ""
    response = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=prompt, temperature=GREEDY["temperature"],
                                         max_tokens=GREEDY["max_tokens"], extra_body=extra_body)
    return response.choices[0].text, response.usage.prompt_tokens


def test_both_api_servers_answer_what_one_server_answers(asc_url, server_url):
    from ray import serve

    with ThreadPoolExecutor(NUM_REQUESTS) as pool:
        got = list(pool.map(lambda i: completion(asc_url, i), range(NUM_REQUESTS)))
    expected = [completion(server_url, i) for i in range(NUM_REQUESTS)]
    assert got == expected
    clients = ray.get(leader().clients.remote())
    owner, *api_servers = clients.values()
    # The engine's owner sent nothing; each API server sent some of the burst (Serve's router
    # spreads concurrent requests over both), and together all of it.
    assert owner == 0 and len(api_servers) == 2, clients
    assert all(sent > 0 for sent in api_servers) and sum(api_servers) == NUM_REQUESTS, clients
    # The engine has its two API servers: a third that asks is told to ask again.
    engines = serve.get_deployment_handle("ShardServeEngine", APP)
    assert engines.open_client.remote().result(timeout_s=30) is None
    assert len(ray.get(leader().clients.remote())) == 3


def test_a_stream_dropped_on_an_api_server_frees_its_kv_blocks(asc_url):
    for _ in range(2):  # Serve's router may pick either API server for each
        closed = threading.Event()

        def drop_after_first_token():
            closed.set()
            raise ConnectionAbortedError("the client goes away")

        with pytest.raises(ConnectionAbortedError):
            stream_events(asc_url, {**LONG, "stream": True}, drop_after_first_token)
        assert closed.is_set()
        assert wait_until(is_idle, 15), ray.get(leader().stats.remote())


def test_metrics_and_the_bench_with_two_api_servers(asc_url):
    """Each API server's /metrics says the engine has two; the bench then leaves out the
    server's intake (one API server's, picked by the router for each scrape), and keeps the
    engine's own figures, the same from either."""
    samples = metric_samples(httpx.get(f"{asc_url}/metrics").text)
    assert samples["shardserve_api_servers"] == 2
    main = runpy.run_path(str(BENCH))["main"]
    report = main(["--base-url", f"{asc_url}/v1", "--num-prompts", "4", "--input-len", "40", "--output-len", "2",
                   "--compare-embeds", "--rounds", "2", "--num-warmups", "2", "--seed", "4343"])
    for mode in ("token ids", "prompt_embeds"):
        assert report[mode]["successful requests"] == 8 and report[mode]["failed requests"] == 0
        assert "mean server intake (ms)" not in report[mode]
        assert report[mode]["kernel compiles while serving"] == 0
        assert report[mode]["prefix cache hit rate (%)"] == 0.0


def test_a_dead_follower_fails_both_api_servers_requests_and_serve_recovers_them(asc_url):
    """A follower killed: the engine's owner sees its run() fail and kills the leader, and
    each API server then finds its polls failing. The in-flight requests end in OpenAI's
    503 shape within 10 s, Serve replaces the engine and the API servers (their health checks
    fail), and the new API servers attach to the new engine."""
    before = engine_actors()
    (victim,) = [handle for name, handle in before.items() if name.endswith("-rank1")]
    fail_then_recover(asc_url, lambda: ray.kill(victim), "two API servers, follower killed")
    assert wait_until(lambda: len(ray.get(leader().clients.remote())) == 3, 60)  # the owner and two API servers
    # A new engine (two shards and a hasher); the old one's actors gone.
    assert wait_until(lambda: len(after := engine_actors()) == 3 and not set(after) & set(before), 30), engine_actors()


def test_deleting_the_application_lets_a_stream_finish_then_stops_the_engine(asc_url):
    """Last in this module: it deletes the application. Serve stops the API servers after
    their requests in flight; ShardServeEngine waits for them to detach before it stops
    the shards, so the stream ends with its own finish reason, not an error."""
    from ray import serve

    def api_servers_running() -> bool:  # a replica still starting when the app goes never detaches
        states = serve.status().applications[APP].deployments["ShardServe"].replica_states
        return states == {"RUNNING": 2}

    assert wait_until(api_servers_running, 60), serve.status().applications[APP].deployments["ShardServe"]
    pids = [ray.get(leader().pid.remote())]
    deleting = threading.Thread(target=serve.delete, args=(APP,))
    events = stream_events(asc_url, {**LONG, "max_tokens": 100, "stream": True}, deleting.start)
    deleting.join(60)
    assert not deleting.is_alive()
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert APP not in serve.status().applications
    assert wait_until(lambda: all(is_process_gone(pid) for pid in pids), 30)
