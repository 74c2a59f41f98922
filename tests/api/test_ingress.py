"""The ingresses' set-up (no Ray cluster): the environment `shardserve serve --ingress
haproxy` gives its local Ray (HAProxy by default where Serve has it, else Serve's proxy),
the refusal on a cluster, the replica's larger uvicorn body
buffer, the middleware that reads a body whole in Serve's proxy and sends it in the
request's scope, and the replica's that reads it there."""

from __future__ import annotations

import asyncio
import os
import pickle

import pytest
import uvicorn.protocols.http.h11_impl as h11_impl
import uvicorn.protocols.http.httptools_impl as httptools_impl

from api import cli
from api.app import PROXY_ENV_VARS
from api.ingress import (BODY_BUFFER_BYTES, BODY_SCOPE_KEY, HAPROXY_ENV_VARS, ScopeBodyMiddleware,
                         WholeBodyMiddleware, local_haproxy_env, proxy_middlewares, raise_body_buffer_limit)


def test_the_local_environment_is_rays_high_throughput_mode_with_free_haproxy_ports():
    env = local_haproxy_env()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert HAPROXY_ENV_VARS.items() <= env.items()
    stats, metrics = int(env["RAY_SERVE_HAPROXY_STATS_PORT"]), int(env["RAY_SERVE_HAPROXY_METRICS_PORT"])
    assert stats not in (8404, 9101) and metrics not in (8404, 9101)  # Ray's fixed defaults clash
    # Below the ephemeral range, where the processes the local Ray starts next take their
    # ports, and above Ray's worker ports: one of them once took HAProxy's before it bound it.
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    assert 20000 <= stats < low and 20000 <= metrics < low and stats != metrics


def test_no_haproxy_binary_is_a_clear_error(monkeypatch):
    import ray.serve._private.haproxy as serve_haproxy

    monkeypatch.setattr(serve_haproxy, "RAY_SERVE_HAPROXY_BINARY_PATH", "/nonexistent/haproxy")
    with pytest.raises(ValueError, match="--ingress haproxy needs HAProxy: .*/nonexistent/haproxy"):
        local_haproxy_env()


@pytest.fixture
def clean_environ(monkeypatch):
    """No HAProxy settings in os.environ during the test, and none left after it: the CLI
    writes the local Ray's there, and a later test's Ray would inherit them."""
    for name in (*HAPROXY_ENV_VARS, "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
        monkeypatch.setenv(name, "")  # recorded, so that the undo removes what the test sets
        monkeypatch.delenv(name)


def test_the_default_ingress_is_haproxy_where_serve_has_it(clean_environ, capsys):
    assert cli.build_parser().parse_args(["serve"]).ingress == "auto"
    assert not any(name in os.environ for name in HAPROXY_ENV_VARS)
    assert cli._local_ingress("auto") == "HAProxy ingress"
    assert {name: os.environ[name] for name in HAPROXY_ENV_VARS} == HAPROXY_ENV_VARS
    assert capsys.readouterr().err == ""


def test_without_haproxy_auto_falls_back_to_serves_proxy_and_says_so(clean_environ, monkeypatch, capsys):
    import ray.serve._private.haproxy as serve_haproxy

    monkeypatch.setattr(serve_haproxy, "RAY_SERVE_HAPROXY_BINARY_PATH", "/nonexistent/haproxy")
    assert cli._local_ingress("auto") == "Serve's proxy"
    assert not any(name in os.environ for name in HAPROXY_ENV_VARS)
    assert "HAProxy ingress not available" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--ingress haproxy needs HAProxy"):
        cli._local_ingress("haproxy")  # asked for by name: an error, not a fallback
    assert cli._local_ingress("proxy") == "Serve's proxy"


def test_haproxy_ingress_on_a_cluster_is_refused_before_joining_it(capsys):
    """A cluster's ingress is set where its Ray starts; the message says how."""
    code = cli.main(["serve", "--ingress", "haproxy", "--address", "ray://nowhere:1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in the environment of `ray start`" in err


def test_an_unknown_ingress_is_an_argument_error():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--ingress", "nginx"])


def test_the_replicas_uvicorn_reads_bodies_past_64_kib_without_waiting(monkeypatch):
    for module in (h11_impl, httptools_impl):
        monkeypatch.setattr(module, "HIGH_WATER_LIMIT", 65536)
    raise_body_buffer_limit()
    assert h11_impl.HIGH_WATER_LIMIT == httptools_impl.HIGH_WATER_LIMIT == BODY_BUFFER_BYTES
    raise_body_buffer_limit(1024)  # never lowered
    assert h11_impl.HIGH_WATER_LIMIT == httptools_impl.HIGH_WATER_LIMIT == BODY_BUFFER_BYTES


def _through_middleware(messages: list[dict], *, max_bytes: int = 1 << 20, headers=(), scope_type="http",
                        extra_receives: int = 0, scope: dict | None = None) -> list[dict]:
    """What an app behind WholeBodyMiddleware receives when the client's side yields
    `messages`: the app reads until a message without more_body (as it reads a body), then
    `extra_receives` more (as Serve's proxy watches for a disconnect). `scope` (updated in
    place) adds to the request's scope."""
    client = list(messages)

    async def receive():
        return client.pop(0)

    received = []

    async def app(scope, receive, send):
        received.append(await receive())
        while received[-1].get("more_body", False):
            received.append(await receive())
        for _ in range(extra_receives):
            received.append(await receive())

    scope = scope if scope is not None else {}
    scope.update({"type": scope_type, "headers": list(headers)})
    asyncio.run(WholeBodyMiddleware(app, max_bytes=max_bytes)(scope, receive, None))
    return received


def _in_the_replica(scope: dict, relayed: list[dict], receives: int) -> list[dict]:
    """What the replica's app behind ScopeBodyMiddleware receives in `receives` calls, given
    the scope as Serve's proxy sends it (pickled) and the messages the proxy relays."""
    scope = pickle.loads(pickle.dumps(scope))
    relayed = list(relayed)

    async def receive():
        return relayed.pop(0)

    received = []

    async def app(app_scope, receive, send):
        assert BODY_SCOPE_KEY not in app_scope
        for _ in range(receives):
            received.append(await receive())

    asyncio.run(ScopeBodyMiddleware(app)(scope, receive, None))
    return received


def _chunk(body: bytes, more: bool) -> dict:
    return {"type": "http.request", "body": body, "more_body": more}


def test_a_body_in_chunks_reaches_the_app_in_one_message_and_later_messages_pass_through():
    before = WholeBodyMiddleware.num_joined_bodies
    chunks = [_chunk(b"a" * 65536, True), _chunk(b"b" * 65536, True), _chunk(b"c" * 1000, False)]
    received = _through_middleware([*chunks, {"type": "http.disconnect"}], extra_receives=1)
    assert received == [_chunk(b"a" * 65536 + b"b" * 65536 + b"c" * 1000, False), {"type": "http.disconnect"}]
    assert WholeBodyMiddleware.num_joined_bodies == before + 1


def test_past_max_bytes_the_first_part_comes_whole_and_the_rest_as_it_arrives():
    chunks = [_chunk(b"a" * 600, True), _chunk(b"b" * 600, True), _chunk(b"c" * 600, False)]
    received = _through_middleware(chunks, max_bytes=1000)
    assert received == [_chunk(b"a" * 600 + b"b" * 600, True), _chunk(b"c" * 600, False)]


def test_a_body_declared_larger_than_max_bytes_passes_untouched():
    """The replica answers it 413 from its Content-Length: nothing is held in the proxy."""
    chunks = [_chunk(b"a" * 600, True), _chunk(b"b" * 600, False)]
    assert _through_middleware(chunks, max_bytes=1000, headers=[(b"content-length", b"1200")]) == chunks
    # A declared length within the bound (or none, or not a number) is read whole.
    for headers in ([(b"content-length", b"1200")], [], [(b"content-length", b"12x")]):
        assert _through_middleware(chunks, max_bytes=2000, headers=headers) == [_chunk(b"a" * 600 + b"b" * 600, False)]
    before = WholeBodyMiddleware.num_joined_bodies
    assert _through_middleware([_chunk(b"", False)]) == [_chunk(b"", False)]  # a GET's: nothing to join
    assert WholeBodyMiddleware.num_joined_bodies == before


def test_a_client_gone_before_its_body_ended_is_a_partial_body_then_the_disconnect():
    before = WholeBodyMiddleware.num_joined_bodies
    received = _through_middleware([_chunk(b"a" * 10, True), {"type": "http.disconnect"}])
    assert received == [_chunk(b"a" * 10, True), {"type": "http.disconnect"}]
    assert WholeBodyMiddleware.num_joined_bodies == before


@pytest.mark.parametrize("path", ["/v1/completions", "/llm/v1/completions", "/tokenize", "/detokenize"])
def test_a_whole_body_of_the_apps_routes_rides_in_the_scope_and_the_replica_reads_it_first(path):
    """Serve's proxy sends the scope with its call to the replica: a body in it needs no call
    back to the proxy. The proxy relays an empty body behind it, then the disconnect."""
    before = WholeBodyMiddleware.num_scope_bodies
    scope = {"method": "POST", "path": path}
    chunks = [_chunk(b"a" * 65536, True), _chunk(b"b" * 10, False)]
    relayed = _through_middleware([*chunks, {"type": "http.disconnect"}], extra_receives=1, scope=scope)
    assert relayed == [_chunk(b"", False), {"type": "http.disconnect"}]
    assert scope[BODY_SCOPE_KEY] == b"a" * 65536 + b"b" * 10
    assert WholeBodyMiddleware.num_scope_bodies == before + 1
    assert _in_the_replica(scope, relayed, receives=3) == [
        _chunk(b"a" * 65536 + b"b" * 10, False), _chunk(b"", False), {"type": "http.disconnect"}]


def test_the_proxy_drops_a_scope_body_once_the_response_starts():
    """The proxy's scope lives as long as the request's stream: past the response's start
    it holds no body (up to 16 MiB each, for every request streaming through it)."""
    scope = {"type": "http", "headers": [], "method": "POST", "path": "/v1/completions"}
    sent, seen = [], []

    async def receive():
        return _chunk(b"x" * 100, False)

    async def send(message):
        sent.append(message)

    async def app(app_scope, receive, send):
        await receive()
        seen.append(BODY_SCOPE_KEY in app_scope)  # the proxy pickles it into its call here
        await send({"type": "http.response.start", "status": 200, "headers": []})
        seen.append(BODY_SCOPE_KEY in app_scope)

    asyncio.run(WholeBodyMiddleware(app)(scope, receive, send))
    assert seen == [True, False] and sent == [{"type": "http.response.start", "status": 200, "headers": []}]


@pytest.mark.parametrize("method, path, messages", [
    ("GET", "/v1/completions", [_chunk(b"x", False)]),
    ("POST", "/v1/other", [_chunk(b"x", False)]),  # another app's route: its body as Serve relays it
    ("POST", "/v1/completions", [_chunk(b"", False)]),
    # past max_bytes: the first 1,200 bytes in one message, the rest as it comes
    ("POST", "/v1/completions", [_chunk(b"a" * 600, True), _chunk(b"b" * 600, True), _chunk(b"c", False)]),
    ("POST", "/v1/completions", [_chunk(b"a" * 10, True), {"type": "http.disconnect"}]),  # the client left
])
def test_any_other_body_is_relayed_as_it_came(method, path, messages):
    before = WholeBodyMiddleware.num_scope_bodies
    scope = {"method": method, "path": path}
    relayed = _through_middleware(messages, max_bytes=1000, scope=scope)
    assert BODY_SCOPE_KEY not in scope and WholeBodyMiddleware.num_scope_bodies == before
    assert b"".join(m.get("body", b"") for m in relayed) == b"".join(m.get("body", b"") for m in messages)
    assert _in_the_replica(scope, relayed, receives=len(relayed)) == relayed


def test_other_scopes_pass_through():
    messages = [{"type": "websocket.connect"}]
    assert _through_middleware(messages, scope_type="websocket") == messages


def test_shardserve_serve_installs_the_middleware_in_serves_proxy(monkeypatch):
    """`shardserve serve` sets the proxy callback for the local Ray it starts; the callback
    returns what Serve's proxy accepts (starlette Middleware) and raises uvicorn's buffer."""
    from ray.serve._private.http_util import validate_http_proxy_callback_return
    from ray.serve._private.utils import call_function_from_import_path

    assert PROXY_ENV_VARS["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "api.ingress.proxy_middlewares"
    for module in (h11_impl, httptools_impl):
        monkeypatch.setattr(module, "HIGH_WATER_LIMIT", 65536)
    [middleware] = validate_http_proxy_callback_return(
        call_function_from_import_path(PROXY_ENV_VARS["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"]))
    assert middleware.cls is WholeBodyMiddleware
    assert h11_impl.HIGH_WATER_LIMIT == BODY_BUFFER_BYTES
    assert [m.cls for m in proxy_middlewares()] == [WholeBodyMiddleware]
