"""Through Ray Serve and HTTP, on an application of its own (tensor_parallel_size 2, route
/faults, small queue bounds) beside the session's server: past its bounds a burst is
refused with 503 + Retry-After; a shard that dies or hangs ends in-flight requests within
10 s (503 in OpenAI's shape; a stream: an error event, then [DONE]), the replica fails its
health check, Serve replaces it with new shards, and requests succeed again with no
operator action. Last, deleting the application (what `shardserve serve` does on SIGTERM)
lets a stream in flight through Serve's proxy finish before its replica and shards go."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import runpy
from pathlib import Path

import httpx
import pytest
import ray

from api.app import build_app
from tests.cluster.test_engine_faults import DEADLINE_S, is_process_gone, wait_until
from tests.e2e.conftest import stream_events
from tests.e2e.test_server import metrics

APP = "faults"
ARGS = {"tensor_parallel_size": 2, "max_model_len": 1024, "kv_cache_memory_bytes": 16 << 20,
        "step_timeout_s": 3.0, "max_num_seqs": 4, "max_waiting_requests": 4, "enable_prompt_embeds": True}
LOAD_TEST = Path(__file__).resolve().parents[2] / "scripts" / "load_test.py"
LONG = {"prompt": "The quick brown fox", "max_tokens": 900, "ignore_eos": True, "temperature": 0.0}
RECOVERY_TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def faults_url(server_url):
    from ray import serve

    serve.run(build_app(ARGS), name=APP, route_prefix="/faults")
    try:
        yield f"{server_url}/faults"
    finally:
        serve.delete(APP)


def engine_actors(kind: str = "rank") -> dict[str, object]:
    """name -> handle of the engine actors of this module's application (named by
    EngineClient): its shards (`...-rank<r>`), or with kind="hasher" its hashers."""
    named = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"]: ray.get_actor(a["name"], namespace=a["namespace"])
            for a in named if a["name"].startswith(f"shardserve-{APP}-")
            and a["name"].rsplit("-", 1)[1].startswith(kind)}


def shard_actors() -> dict[str, object]:
    return engine_actors("rank")


def wait_recovered(url: str, timeout_s: float = RECOVERY_TIMEOUT_S) -> None:
    """Bounded polling until a short completion succeeds again (a new replica serves)."""
    body = {"prompt": "hello", "max_tokens": 2}

    def ok():
        try:
            return httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_until(ok, timeout_s, interval_s=0.5), f"no recovery within {timeout_s} s"


def fail_in_flight_requests(url: str, inject) -> tuple[float, list[str], httpx.Response]:
    """Starts a stream and a plain request, injects the fault once both run, and returns
    (seconds until both ended, the stream's events, the plain response)."""
    with ThreadPoolExecutor(2) as pool:
        stream = pool.submit(stream_events, url, {**LONG, "stream": True})
        plain = pool.submit(httpx.post, f"{url}/v1/completions", json=LONG, timeout=60)
        assert wait_until(lambda: metrics(url)["shardserve_num_requests_running"] == 2, 60, 0.1)
        injected_at = time.monotonic()
        inject()
        events, response = stream.result(timeout=DEADLINE_S + 5), plain.result(timeout=DEADLINE_S + 5)
        return time.monotonic() - injected_at, events, response


def fail_then_recover(url: str, inject, label: str) -> None:
    """The fault injected under a stream and a plain request: both end cleanly within
    DEADLINE_S, then requests succeed again; prints how long each took."""
    failed_after, events, response = fail_in_flight_requests(url, inject)
    assert failed_after < DEADLINE_S
    assert_failed_cleanly(events, response)
    started = time.monotonic()
    wait_recovered(url)
    print(f"{label}: in-flight requests failed after {failed_after:.1f} s; "
          f"recovered {time.monotonic() - started + failed_after:.1f} s after the fault")


def assert_failed_cleanly(events: list[str], response: httpx.Response) -> None:
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert (error["code"], error["type"]) == (503, "service_unavailable")
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "service_unavailable"
    assert "Ray" not in response.text and "Traceback" not in response.text


def test_a_burst_past_the_bounds_is_refused_with_retry_after_and_the_rest_completes(faults_url):
    wait_recovered(faults_url)
    main = runpy.run_path(str(LOAD_TEST))["main"]
    report = main(["--base-url", f"{faults_url}/v1", "--clients", "40", "--rounds", "1", "--max-tokens", "128",
                   "--disconnect-fraction", "0", "--time-limit-s", "120"])
    totals = report["totals"]
    assert report["ok"] and totals["error"] == 0, report["failures"]
    # At most 4 running + 4 waiting at a time: much of a burst of 40 is refused.
    assert totals["refused"] >= 10 and totals["completed"] >= 8
    assert totals["completed"] + totals["refused"] == 40


@pytest.mark.parametrize("fault", ["kill follower", "kill leader", "hang follower"])
def test_shard_fault_fails_in_flight_requests_and_serve_replaces_the_replica(faults_url, fault):
    wait_recovered(faults_url)
    before = shard_actors()
    assert len(before) == 2
    victim = sorted(before)[0 if fault == "kill leader" else 1]
    pid = ray.get(before[victim].pid.remote())

    def inject():
        if fault.startswith("kill"):
            ray.kill(before[victim])
        else:
            os.kill(pid, signal.SIGSTOP)  # alive but silent: caught by the 3 s step watchdog

    try:
        fail_then_recover(faults_url, inject, fault)
    finally:
        if fault.startswith("hang") and not is_process_gone(pid):
            os.kill(pid, signal.SIGCONT)
    after = shard_actors()
    assert len(after) == 2 and not set(after) & set(before)  # a new replica, new shards
    # The old replica's engine hasher went with it; the new engine has its own.
    assert wait_until(lambda: len(engine_actors("hasher")) == 1, 30), engine_actors("hasher")
    assert wait_until(lambda: is_process_gone(pid), 30)


def test_deleting_the_application_drains_a_stream_in_flight_through_serves_proxy(faults_url):
    """Last in this module: it deletes the application, as `shardserve serve` does on
    SIGTERM (api.cli._shutdown) before its local Ray goes. Serve's proxy still carries the
    stream while the replica finishes it; then the replica and its shards stop. The CLI's
    own signal handling, on the same _shutdown, runs in test_haproxy_ingress.py."""
    from ray import serve

    wait_recovered(faults_url)
    pids = [ray.get(shard.pid.remote()) for shard in shard_actors().values()]
    deleting = threading.Thread(target=serve.delete, args=(APP,))
    body = {**LONG, "max_tokens": 100, "stream": True}
    events = stream_events(faults_url, body, deleting.start)  # mid-stream
    deleting.join(60)
    assert not deleting.is_alive()
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert APP not in serve.status().applications
    assert len(pids) == 2 and wait_until(lambda: all(is_process_gone(pid) for pid in pids), 30)
