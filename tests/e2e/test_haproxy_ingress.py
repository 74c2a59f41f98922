"""`shardserve serve --ingress haproxy` as users run it (a subprocess with its own local Ray,
tensor_parallel_size 2): HAProxy on the port, replicas serving HTTP themselves. The
`openai` client gets the same greedy completions as from the session's server behind
Serve's proxy, prompt embeddings included (a 1 MB body among them, read by the replica's
uvicorn with its larger buffer); a bad payload is a 400 and the server keeps answering;
SIGTERM drains an in-flight stream, however many signals follow it, the CLI exits 0 without
Ray's warnings, and HAProxy goes with every other process it started. All of it with one
API server per engine, and again with two (`--api-server-count 2`: HAProxy in front of the
two API servers, the engine in ShardServeEngine)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from api.embeds_codec import encode_prompt_embeds
from scripts.bench_serving import metric_samples
from scripts.load_test import descendants
from tests.cluster.test_engine_faults import is_process_gone, wait_until
from tests.e2e.conftest import free_port, stream_events, wait_healthy

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 90.0
H = 256  # the default model's hidden size
GREEDY = {"temperature": 0.0, "max_tokens": 8, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module", params=[1, 2], ids=["one API server", "two API servers"])
def haproxy_server(request, tmp_path_factory):
    """(process, base URL, its log file) of `shardserve serve --ingress haproxy`, with
    `--api-server-count` the param."""
    port = free_port()
    command = [sys.executable, "-m", "api.cli", "serve", "--ingress", "haproxy", "--port", str(port),
               "--tensor-parallel-size", "2", "--enable-prompt-embeds", "--max-model-len", "1024",
               "--kv-cache-memory-bytes", str(16 << 20), "--device", "cpu", "--api-server-count", str(request.param)]
    log = open(tmp_path_factory.mktemp("haproxy") / "serve.log", "w+")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, START_TIMEOUT_S)
        assert wait_until(lambda: "serving" in _output(log), 30), _output(log)  # printed once serve.run returned
        yield server, url, log
    finally:
        if server.poll() is None:  # a test failed before the last one stopped it: stop Ray and HAProxy too
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                server.kill()
        log.close()


def _output(log) -> str:
    log.seek(0)
    return log.read()[-3000:]


def test_haproxy_holds_the_port_and_the_replica_serves_http_itself(haproxy_server, request):
    server, url, log = haproxy_server
    port = int(url.rsplit(":", 1)[1])

    def listeners() -> set[str]:
        return {_name(pid) for pid in descendants(server.pid) if _listens_on(pid, port)}

    # Serve reloads HAProxy (a new process takes the port over) as the replicas come up,
    # also after the app reports ready: one such handover can be under way right now.
    assert wait_until(lambda: listeners() == {"haproxy"}, 30), listeners()
    assert "HAProxy ingress" in _output(log)
    api_servers = request.node.callspec.params["haproxy_server"]
    assert ("2 API servers per engine" in _output(log)) == (api_servers == 2)
    samples = metric_samples(httpx.get(f"{url}/metrics", timeout=10).text)
    assert samples["shardserve_api_servers"] == api_servers


def test_completions_equal_those_behind_serves_proxy(haproxy_server, server_url):
    """Text, a list of embeddings (one of 1,000 rows: a 1.4 MB body), a chat with a
    prompt_embeds part and a stream: each the same greedy answer as the session's server
    (same model and settings, Serve's proxy) gives."""
    _, url, _ = haproxy_server
    direct = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    proxied = openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=120)
    gen = torch.Generator().manual_seed(11)
    embeds = [encode_prompt_embeds(torch.randn(rows, H, generator=gen)) for rows in (5, 1000)]
    requests = [
        {"prompt": "The quick brown fox"},
        {"prompt": "", "extra_body": {**GREEDY["extra_body"], "prompt_embeds": embeds}},
    ]
    for extra in requests:
        kwargs = {**GREEDY, **extra}
        got = direct.completions.create(model=None, **kwargs)
        want = proxied.completions.create(model=None, **kwargs)
        assert [c.text for c in got.choices] == [c.text for c in want.choices]
        assert got.usage == want.usage
    parts = [{"type": "text", "text": "Read:"}, {"type": "prompt_embeds", "data": embeds[0]}]
    chats = [client.chat.completions.create(model=None, messages=[{"role": "user", "content": parts}], **GREEDY)
             for client in (direct, proxied)]
    assert chats[0].choices[0].message.content == chats[1].choices[0].message.content
    assert chats[0].usage == chats[1].usage
    stream = direct.completions.create(model=None, prompt="Ray places one shard on each GPU", stream=True, **GREEDY)
    streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    want = proxied.completions.create(model=None, prompt="Ray places one shard on each GPU", **GREEDY)
    assert streamed == want.choices[0].text


def test_a_bad_payload_is_a_400_and_the_server_keeps_serving(haproxy_server):
    _, url, _ = haproxy_server
    bad = encode_prompt_embeds(torch.randn(7, 13))
    response = httpx.post(f"{url}/v1/completions", json={"prompt_embeds": bad, "max_tokens": 2}, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt_embeds"
    assert f"expected shape (seq_len, {H}), got (7, 13)" in error["message"]
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200, ok.text


def test_sigterm_drains_a_stream_then_everything_stops_haproxy_too(haproxy_server):
    """Last in this module: it stops the server. (Serve's own proxy draining a stream while
    its application is deleted, as this shutdown deletes it: test_reliability.py.)"""
    server, url, log = haproxy_server
    started = descendants(server.pid)
    body = {"prompt": "The quick brown fox", "max_tokens": 100, "ignore_eos": True, "stream": True}

    def signals():  # mid-stream: SIGTERM, then more as supervisors and wrappers send
        for sig in [signal.SIGTERM] + [signal.SIGINT, signal.SIGTERM] * 10:
            server.send_signal(sig)
            time.sleep(0.001)  # spaced, so some land while an earlier one is handled

    events = stream_events(url, body, signals)
    assert server.wait(STOP_TIMEOUT_S) == 0, _output(log)
    assert events[-1] == "[DONE]", _output(log)
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    output = _output(log)
    assert "shutting down" in output
    # The local Ray goes whole: no serve.shutdown() killing the controller under its own call.
    assert "graceful_shutdown failed" not in output, output
    assert len(started) >= 5  # Ray's own processes, HAProxy, the replica and two shards at least
    assert wait_until(lambda: all(is_process_gone(pid) for pid in started), 30), \
        [(pid, _name(pid)) for pid in started if not is_process_gone(pid)]


def _listens_on(pid: int, port: int) -> bool:
    """Whether process pid holds a socket listening on 127.0.0.1:port (from /proc, Linux)."""
    listening = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":  # local address, LISTEN
            listening.add(f"socket:[{fields[9]}]")
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:  # gone
        return False
    for fd in fds:
        try:
            if os.readlink(fd) in listening:
                return True
        except OSError:
            continue
    return False


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:  # gone
        return ""
