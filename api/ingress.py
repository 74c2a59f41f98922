"""How HTTP reaches the replicas. Two ingresses, as Ray Serve offers them:

- "proxy" (Serve's default): a proxy actor per node takes each request and hands it to a
  replica over Ray calls; the replica pulls the body back from it, message by message.
- "haproxy" (Ray Serve's high-throughput mode): HAProxy on the Serve port forwards each
  connection to a replica that serves HTTP itself ("direct ingress"). No Ray call carries
  the body or the streamed tokens. On the 8B shape at concurrency 1 it cut the serving
  overhead from 9.3 to 2.2 ms for token ids (BENCHMARKS.md, "Online serving", session 11).

Behind Serve's proxy, a body would reach the replica in as many actor calls as batches of
it had arrived at the proxy when the replica asked: a 0.7 MB prompt_embeds body took four.
WholeBodyMiddleware, which `shardserve serve` installs in the proxy through Serve's proxy
callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=api.ingress.proxy_middlewares), reads a
body of up to PROXY_BODY_BUFFER_BYTES before the proxy routes the request. A whole body of
the app's own routes then travels in the request's scope, which the proxy sends with its
call to the replica; the replica's ScopeBodyMiddleware reads it there, without a call
back to the proxy (which, relaying token streams, answers such calls late under load).

Serve reads its ingress from the environment of the cluster's processes, when they start.
`shardserve serve --ingress haproxy` sets it for the local Ray it starts; on a cluster, set
RAY_SERVE_ENABLE_HA_PROXY=1 and RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in the environment of
`ray start` on every node."""

from __future__ import annotations

import random
import socket
from pathlib import Path

PROXY_CALLBACK = "api.ingress.proxy_middlewares"

INGRESSES = ("proxy", "haproxy")

# Ray Serve's high-throughput mode: HAProxy in front of direct-ingress replicas, and the
# throughput settings that go with it (user code on the replica's own loop, which
# REPLICA_ENV_VARS in api/app.py sets in any case, and gRPC between deployments).
HAPROXY_ENV_VARS = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # A replica that stops keeps serving this long, so that HAProxy on every node has
    # stopped sending it requests first (30 s by default, for multi-node clusters; it is
    # also the least a replica's shutdown takes). A local Ray has one HAProxy, on this node,
    # updated within 0.1 s; in-flight requests still get graceful_shutdown_timeout_s.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}

# uvicorn stops reading a request's body once 64 KiB of it wait for the app, and reads on
# only after the app took them: a 1 MB prompt_embeds body then arrives over about 15 turns
# of a replica's event loop, each behind every other request's stream (at concurrency 16 on
# the 8B shape, 16 ms of intake against 0.6 ms for token ids). Up to this much is read
# without waiting for the app; the app's own body limit (413) still applies as it reads.
BODY_BUFFER_BYTES = 4 << 20


def local_haproxy_env() -> dict[str, str]:
    """HAPROXY_ENV_VARS, with HAProxy's stats and metrics listeners on free ports rather
    than Ray's fixed 8404 and 9101 (two servers on one machine would clash there). A
    ValueError, saying what to install, where HAProxy is not available."""
    try:
        from ray.serve._private.haproxy import get_haproxy_binary  # Serve's own lookup
    except ImportError:
        import ray

        raise ValueError(f"--ingress haproxy needs Ray Serve's HAProxy ingress (Ray 2.56 or later; this is "
                         f"Ray {ray.__version__})") from None
    try:
        get_haproxy_binary()
    except FileNotFoundError as exc:
        raise ValueError(f"--ingress haproxy needs HAProxy: {exc}") from None
    stats_port = free_port()
    return {**HAPROXY_ENV_VARS,
            "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port(besides=stats_port))}


# What Serve's proxy reads of a body before it routes the request (WholeBodyMiddleware): a
# (512, 4096) bf16 prompt_embeds tensor is 5.6 MB of base64. A larger body's first
# PROXY_BODY_BUFFER_BYTES go in one message and the rest as it comes, so a proxy holds at
# most this much of each request it routes.
PROXY_BODY_BUFFER_BYTES = 16 << 20

# Where a whole body read by WholeBodyMiddleware travels to the replica: in the ASGI scope,
# which Serve's proxy pickles into its call to the replica, so the replica need not call the
# proxy back for it. Only for POSTs to the paths of this app's routes that read a body
# (ScopeBodyMiddleware puts it back there); other paths get their bodies as Serve relays them.
BODY_SCOPE_KEY = "shardserve.body"
SCOPE_BODY_PATHS = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")


class WholeBodyMiddleware:
    """ASGI middleware for Serve's HTTP proxy: reads an HTTP request's body, up to
    `max_bytes`, before the proxy routes the request, then hands it on as one message.

    The proxy routes a request as soon as its headers are in; the replica then pulls the
    body back over actor calls, each taking the chunks that have reached the proxy by then.
    Under load, with the proxy's loop busy relaying token streams, a 0.7 MB body came in
    four such calls (BENCHMARKS.md, "Online serving", session 10). Read whole first, it
    comes in one; for a POST to one of SCOPE_BODY_PATHS it comes in none, inside the
    request's scope (BODY_SCOPE_KEY). The replica could not start on the request before its
    whole body anyway (it is one JSON document). A body declared larger than max_bytes, and
    any message after the body (a disconnect), pass through as they come."""

    num_joined_bodies = 0  # bodies this process read in several chunks and passed on in one
    num_scope_bodies = 0  # bodies this process sent to the replica inside the request's scope

    def __init__(self, app, max_bytes: int = PROXY_BODY_BUFFER_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or _declared_length(scope) > self.max_bytes:
            return await self.app(scope, receive, send)
        chunks, size, queued = [], 0, []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before its body was in
                queued.append(message)
                more = True
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if not more or size >= self.max_bytes:
                break
        body = b"".join(chunks)
        if not more and len(chunks) > 1:
            WholeBodyMiddleware.num_joined_bodies += 1
        if not more and body and scope.get("method") == "POST" and scope["path"].endswith(SCOPE_BODY_PATHS):
            # The proxy pickles the scope into its call to the replica: the body rides along,
            # and the replica's ScopeBodyMiddleware reads it there instead of calling back
            # for it. What the proxy relays behind it is an empty body.
            scope[BODY_SCOPE_KEY] = body
            body = b""
            WholeBodyMiddleware.num_scope_bodies += 1
            send = _dropping_body(scope, send)
        queued.insert(0, {"type": "http.request", "body": body, "more_body": more})

        async def replay():
            return queued.pop(0) if queued else await receive()

        await self.app(scope, replay, send)


def _dropping_body(scope, send):
    """`send`, which first drops the body from the scope: once the response starts, the
    replica has the request, and the proxy holds no body for the rest of a long stream."""
    async def send_dropping_body(message):
        scope.pop(BODY_SCOPE_KEY, None)
        await send(message)

    return send_dropping_body


class ScopeBodyMiddleware:
    """ASGI middleware of the replica's app: a request whose body WholeBodyMiddleware put in
    its scope gets that body from its first receive(); later receives (the disconnect
    watch) go on to Serve's, whose first message is the empty body the proxy relayed."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        body = scope.pop(BODY_SCOPE_KEY, None) if scope["type"] == "http" else None
        if body is None:
            return await self.app(scope, receive, send)
        first = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive_body_first():
            return first.pop() if first else await receive()

        await self.app(scope, receive_body_first, send)


def _declared_length(scope) -> int:
    """The request's Content-Length, or 0 (none, or not a number: chunked uploads)."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


def proxy_middlewares() -> list:
    """Serve's proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH), called in each
    HTTP proxy as it starts: WholeBodyMiddleware, and a uvicorn that reads a body without
    waiting for the app's turn (raise_body_buffer_limit)."""
    from starlette.middleware import Middleware

    raise_body_buffer_limit()
    return [Middleware(WholeBodyMiddleware)]


def raise_body_buffer_limit(limit: int = BODY_BUFFER_BYTES) -> None:
    """In a replica serving HTTP itself (the haproxy ingress): let uvicorn read up to
    `limit` bytes of a body before it waits for the app (see BODY_BUFFER_BYTES). Each of
    uvicorn's HTTP protocols reads the limit from its own module when data arrives."""
    import importlib

    for name in ("h11_impl", "httptools_impl"):
        try:
            module = importlib.import_module(f"uvicorn.protocols.http.{name}")
        except ImportError:  # httptools is optional
            continue
        if getattr(module, "HIGH_WATER_LIMIT", limit) < limit:
            module.HIGH_WATER_LIMIT = limit


def free_port(besides: int | None = None) -> int:
    """A port free now on every interface, below the ephemeral range and above Ray's worker
    ports (10002-19999), for a listener that binds it later. A local Ray started in between
    binds ports the OS hands out: an ephemeral port chosen before it was once taken by one
    of its processes before HAProxy bound it, and HAProxy then failed to start. (The tests
    choose their servers' and nodes' ports here too, for the same reason.)"""
    first, last = 20000, _ephemeral_range()[0] - 1
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(first, last)
        if port != besides and _is_free(port):
            return port
    with socket.socket() as sock:  # a crowded range: what the OS gives
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _ephemeral_range() -> tuple[int, int]:
    """The ports the OS hands out to sockets that ask for none (Linux's default if unreadable)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))  # every interface, as HAProxy binds
        except OSError:
            return False
    return True
