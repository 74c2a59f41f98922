"""The Serve application builder: `serve run api.app:build_app model=...`, or
`import_path: api.app:build_app` in a Serve config for `serve run` / `serve deploy`.
Runs wherever Serve builds applications (CLI process or the cluster)."""

from __future__ import annotations

import dataclasses

import ray
from ray.serve import Application

from api.deployment import ShardServeServer
from api.settings import ServerSettings
from cluster.placement import replica_bundles

REPLICA_CPUS = 1.0


def build_app(args: dict | None = None) -> Application:
    """One ingress deployment; each replica reserves its shards' bundles (with its own
    CPU merged into bundle 0) in a placement group of its own."""
    settings = args if isinstance(args, ServerSettings) else ServerSettings.from_dict(dict(args or {}))
    device = settings.device
    if device == "auto":
        device = "cuda" if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
    settings = dataclasses.replace(settings, device=device)
    return ShardServeServer.options(
        num_replicas=settings.num_replicas,
        ray_actor_options={"num_cpus": REPLICA_CPUS, "num_gpus": 0},
        graceful_shutdown_timeout_s=settings.graceful_shutdown_timeout_s,
        placement_group_bundles=replica_bundles(settings.tensor_parallel_size, device, REPLICA_CPUS),
        placement_group_strategy=settings.placement_strategy,
    ).bind(settings)
