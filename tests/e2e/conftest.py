"""One real shardserve Serve application per test session, started from
configs/default.yaml's args (tensor_parallel_size 2, default model, prompt embeddings on)
on the session's local Ray, listening on a free loopback port."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import yaml

from api.ingress import free_port  # noqa: F401 - the e2e modules' port picker

CONFIG_PATH = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"
# The session's only change to the config's args: a KV cache of 64 MiB per shard instead
# of the 1 GiB CPU default (the machine is shared; 2,048 blocks are plenty here).
KV_CACHE_BYTES = 64 << 20
HEALTH_TIMEOUT_S = 120.0


def config_application() -> dict:
    """The single application entry of configs/default.yaml."""
    (application,) = yaml.safe_load(CONFIG_PATH.read_text())["applications"]
    return application


def wait_healthy(url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    """Bounded wait for the proxy to route /health to a ready replica."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s} s")
        time.sleep(0.25)


def stream_events(url: str, body: dict, on_first_event=lambda: None) -> list[str]:
    """The `data:` payloads of a streamed POST to url/v1/completions (answered 200), "[DONE]"
    last; on_first_event() runs once the first has arrived (mid-stream)."""
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()[:200]
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                if len(events) == 1:
                    on_first_event()
    return events


@pytest.fixture(scope="session")
def server_args() -> dict:
    return {**config_application()["args"], "kv_cache_memory_bytes": KV_CACHE_BYTES}


@pytest.fixture(scope="session")
def server_url(ray_cluster, server_args):
    """Base URL (no /v1) of the running application."""
    from ray import serve

    from api.app import build_app

    port = free_port()
    application = config_application()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(server_args), name=application["name"],
                  route_prefix=application["route_prefix"])
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        yield url
    finally:
        serve.shutdown()
