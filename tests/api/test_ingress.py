"""The haproxy ingress's set-up (no Ray cluster): the environment `shardserve serve
--ingress haproxy` gives its local Ray, the refusal on a cluster, and the replica's larger
uvicorn body buffer."""

from __future__ import annotations

import pytest
import uvicorn.protocols.http.h11_impl as h11_impl
import uvicorn.protocols.http.httptools_impl as httptools_impl

from api import cli
from api.ingress import BODY_BUFFER_BYTES, HAPROXY_ENV_VARS, local_haproxy_env, raise_body_buffer_limit


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
