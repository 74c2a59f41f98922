"""How HTTP reaches the replicas. Two ingresses, as Ray Serve offers them:

- "proxy" (Serve's default): a proxy actor per node takes each request and hands it to a
  replica over Ray calls; the replica pulls the body back from it, message by message.
- "haproxy" (Ray Serve's high-throughput mode): HAProxy on the Serve port forwards each
  connection to a replica that serves HTTP itself ("direct ingress"). No Ray call carries
  the body or the streamed tokens. On the 8B shape at concurrency 1 it cut the serving
  overhead from 9.3 to 2.2 ms for token ids (BENCHMARKS.md, "Online serving", session 11).

Serve reads its ingress from the environment of the cluster's processes, when they start.
`shardserve serve --ingress haproxy` sets it for the local Ray it starts; on a cluster, set
RAY_SERVE_ENABLE_HA_PROXY=1 and RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in the environment of
`ray start` on every node."""

from __future__ import annotations

import random
import socket
from pathlib import Path

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
