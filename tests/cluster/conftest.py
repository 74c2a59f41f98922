"""The multi-node Ray cluster of the cluster tests: two `ray start` nodes on this machine
(node_a with the dashboard and job server, node_b), started once on first use."""

from __future__ import annotations

import pytest

from tests.cluster.local_cluster import LocalCluster

CLUSTER_ENV = {
    # Ray metrics reach each node's exporter every second instead of every ten.
    "RAY_metrics_report_interval_ms": "1000",
    # The proxy prefers replicas on its own node; here every node shares one host and
    # one proxy, so that preference would send every request to the head's replica.
    "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
}


@pytest.fixture(scope="session")
def multinode_cluster(tmp_path_factory, shardserve_cache):
    root = tmp_path_factory.mktemp("mn", numbered=True)
    cluster = LocalCluster(root, env={"SHARDSERVE_CACHE_DIR": str(shardserve_cache), **CLUSTER_ENV})
    cluster.start()
    yield cluster
    left = cluster.stop()
    assert not left, f"processes of the multi-node cluster outlived its shutdown: {sorted(left)}"
