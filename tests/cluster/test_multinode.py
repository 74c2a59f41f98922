"""A real two-node Ray cluster on this machine: a tensor-parallel engine whose two shards
sit on different nodes gives the same greedy tokens as one whose shards share a node; and
a Serve application launched as a Ray job answers from two replicas, one per node, which
report their requests through each node's Ray metrics exporter."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
import yaml
from ray.job_submission import JobStatus

from tests.cluster.local_cluster import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
DRIVER_TIMEOUT_S = 240
SERVE_TIMEOUT_S = 150
NUM_REQUESTS = 20  # both replicas get some: all on one has odds 2**-19
RAY_SERIES = re.compile(r'^(ray_shardserve_[a-z0-9_]+)\{([^}]*)\} ([0-9.e+-]+)$', re.M)


def run_driver(cluster) -> dict:
    done = subprocess.run([sys.executable, "-m", "tests.cluster.multinode_driver",
                           cluster.address, cluster.dashboard_url],
                          cwd=REPO, env=cluster.env, capture_output=True, text=True,
                          timeout=DRIVER_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_shards_on_two_nodes_match_shards_on_one(multinode_cluster):
    result = run_driver(multinode_cluster)
    names = result["names"]
    assert sorted(names.values()) == ["node_a", "node_b"]
    pack, spread = result["pack"], result["spread"]
    assert len(pack["nodes"]) == 2 and len(set(pack["nodes"])) == 1
    assert sorted(names[node] for node in spread["nodes"]) == ["node_a", "node_b"]
    assert all(len(tokens) == 8 for tokens in pack["token_ids"])
    assert spread["token_ids"] == pack["token_ids"]


def two_replica_config(path: Path, port: int) -> Path:
    """configs/default.yaml with two one-shard replicas: a replica's bundle takes 2 of a
    node's 3 CPUs, so the two cannot share a node. One proxy: the nodes share a host."""
    config = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    config["proxy_location"] = "HeadOnly"
    config["http_options"]["port"] = port
    config["applications"][0]["args"].update(
        tensor_parallel_size=1, num_replicas=2, max_model_len=256, kv_cache_memory_bytes=16 << 20)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def serve_job(multinode_cluster):
    """`ray job submit --working-dir . -- serve run CONFIG`, through the SDK; afterwards
    the job is stopped and the application deleted (Serve outlives its `serve run`)."""
    client, port = multinode_cluster.job_client(), free_port()
    config = two_replica_config(multinode_cluster.root / "serve.yaml", port)
    job_id = client.submit_job(entrypoint=f"serve run {config}", runtime_env={"working_dir": str(REPO)})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _running_replicas(multinode_cluster, client, job_id) == 2,
                   SERVE_TIMEOUT_S, "two running replicas")
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        yield url
    finally:
        client.stop_job(job_id)
        httpx.delete(f"{multinode_cluster.dashboard_url}/api/serve/applications/",
                     headers=multinode_cluster.auth_headers, timeout=60).raise_for_status()
        wait_until(lambda: client.get_job_status(job_id).is_terminal(), 60, "the serve job to stop")


def _running_replicas(cluster, client, job_id: str) -> int:
    """RUNNING replicas of the ShardServe deployment, from Serve's REST API."""
    status = client.get_job_status(job_id)
    assert status in (JobStatus.PENDING, JobStatus.RUNNING), client.get_job_logs(job_id)[-3000:]
    details = httpx.get(f"{cluster.dashboard_url}/api/serve/applications/",
                        headers=cluster.auth_headers, timeout=10).json()
    application = details.get("applications", {}).get("shardserve")
    if application is None or "ShardServe" not in application["deployments"]:
        return 0
    replicas = application["deployments"]["ShardServe"]["replicas"]
    return sum(replica["state"] == "RUNNING" for replica in replicas)


def ray_series(metrics_port: int) -> dict[str, dict[str, float]]:
    """shardserve series on one node's Ray metrics exporter: name -> replica -> value
    (summed over other labels)."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    series: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for name, labels, value in RAY_SERIES.findall(text):
        replica = re.search(r'replica="([^"]+)"', labels)
        series[name][replica.group(1) if replica else ""] += float(value)
    return series


def complete_series(cluster) -> list | None:
    """Per node, once all NUM_REQUESTS are counted and both replicas' gauges arrived."""
    nodes = [ray_series(port) for port in cluster.metrics_ports]
    total = sum(sum(node["ray_shardserve_requests_total"].values()) for node in nodes)
    gauges = all(node["ray_shardserve_kv_cache_usage_perc"] for node in nodes)
    return nodes if total == NUM_REQUESTS and gauges else None


def test_two_replicas_on_two_nodes_behind_one_endpoint(multinode_cluster, serve_job):
    body = {"model": "shardserve-tiny-llama", "prompt": "Two nodes", "max_tokens": 4,
            "temperature": 0, "ignore_eos": True}
    texts = set()
    for _ in range(NUM_REQUESTS):
        response = httpx.post(f"{serve_job}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 4
        texts.add(response.json()["choices"][0]["text"])
    assert len(texts) == 1  # same weights (seeded default model) on both replicas

    node_a, node_b = wait_until(lambda: complete_series(multinode_cluster), 30,
                                f"{NUM_REQUESTS} requests in Ray's metrics")
    # Each node's exporter shows its own replica, and each replica answered.
    requests_a, requests_b = node_a["ray_shardserve_requests_total"], node_b["ray_shardserve_requests_total"]
    assert len(requests_a) == len(requests_b) == 1 and set(requests_a) != set(requests_b)
    assert min(*requests_a.values(), *requests_b.values()) > 0
    for node in (node_a, node_b):
        (replica,) = node["ray_shardserve_requests_total"]
        assert node["ray_shardserve_time_to_first_token_seconds_count"][replica] == node[
            "ray_shardserve_requests_total"][replica]
        assert node["ray_shardserve_generation_tokens_total"][replica] == 4 * node[
            "ray_shardserve_requests_total"][replica]
        assert set(node["ray_shardserve_kv_cache_usage_perc"]) == {replica}
