"""The Serve application builder: `serve run api.app:build_app model=...`, or
`import_path: api.app:build_app` in a Serve config for `serve run` / `serve deploy`.
Runs wherever Serve builds applications (CLI process or the cluster)."""

from __future__ import annotations

import dataclasses

from ray.serve import Application

from api.deployment import ShardServeEngine, ShardServeServer
from api.ingress import PROXY_CALLBACK
from api.settings import ServerSettings
from cluster.engine_args import resolve_device
from cluster.placement import placement_shortfall, replica_bundles

REPLICA_CPUS = 1.0
# Ray Serve settings that cut per-request latency (measured on the 2-core dev machine at
# concurrency 1: 3.5 ms of ~26 ms time to first token). The replica runs our async code on
# its own event loop instead of a second loop in a second thread (our code never blocks it
# for long: a large payload's decoding and ray.put go to a worker thread), and Serve's
# per-request logs go to its log files only, not also to the worker's stderr, which Ray's
# log monitor tails.
REPLICA_ENV_VARS = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_LOG_TO_STDERR": "0",
}
# The same for the HTTP proxy (its router on the proxy's own loop), and a request's body
# read whole in the proxy before it is routed (api/ingress.py, WholeBodyMiddleware). Serve
# starts the proxy from the cluster's environment: `shardserve serve` sets these before
# starting a local Ray; on an existing cluster, set them in the environment of `ray start`.
PROXY_ENV_VARS = {
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_LOG_TO_STDERR": "0",
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK,
}


def build_app(args: dict | None = None) -> Application:
    """With one API server per engine (the default): one ingress deployment, ShardServe,
    each replica an engine's owner that reserves its shards' bundles (with its own CPU merged
    into bundle 0) in a placement group of its own. With api_server_count K > 1: the engines
    in a deployment of their own, ShardServeEngine (num_replicas replicas, those bundles, no
    HTTP), and the ingress's num_replicas x K replicas (a CPU each) attach to them, K to an
    engine: each takes requests in on its own process and event loop, and talks to its
    engine's shards directly, as an owner does."""
    settings = args if isinstance(args, ServerSettings) else ServerSettings.from_dict(dict(args or {}))
    settings = with_resolved_device(settings)
    replica_options = {"num_cpus": REPLICA_CPUS, "num_gpus": 0, "runtime_env": {"env_vars": REPLICA_ENV_VARS}}
    engine_options = {
        "num_replicas": settings.num_replicas,
        "ray_actor_options": replica_options,
        "graceful_shutdown_timeout_s": settings.graceful_shutdown_timeout_s,
        "placement_group_bundles": _replica_bundles(settings),
        "placement_group_strategy": settings.placement_strategy,
    }
    if settings.api_server_count == 1:
        return ShardServeServer.options(**engine_options).bind(settings)
    engines = ShardServeEngine.options(**engine_options).bind(settings)
    return ShardServeServer.options(
        num_replicas=settings.num_replicas * settings.api_server_count,
        ray_actor_options=replica_options,
        graceful_shutdown_timeout_s=settings.graceful_shutdown_timeout_s,
    ).bind(settings, engines)


def app_cpus(settings: ServerSettings) -> float:
    """The CPUs the app's replicas reserve: each engine's bundles, and with more than one
    API server per engine, a CPU for each of those."""
    engines = settings.num_replicas * sum(bundle.get("CPU", 0.0) for bundle in _replica_bundles(settings))
    return engines + (len(_api_server_bundles(settings)) * REPLICA_CPUS)


def replicas_shortfall(settings: ServerSettings, nodes: list[dict[str, float]] | None = None) -> str | None:
    """Why the Ray cluster this process joined (or one of `nodes`, not started yet), as
    its nodes are, could never hold the app's replicas (each its shards' bundles under
    the placement strategy, and all of them together), or None. Serve would otherwise
    wait for them without end."""
    bundles = _replica_bundles(settings)
    shortfall = placement_shortfall(bundles, settings.placement_strategy, nodes)
    api_servers = _api_server_bundles(settings)
    if shortfall is None and (settings.num_replicas > 1 or api_servers):
        shortfall = placement_shortfall(bundles * settings.num_replicas + api_servers, "PACK", nodes)
        if shortfall:
            what = [f"{settings.num_replicas} replicas"] if settings.num_replicas > 1 else []
            what += [f"{len(api_servers)} API servers"] if api_servers else []
            shortfall = f"{' and '.join(what)}: {shortfall}"
    return shortfall


def with_resolved_device(settings: ServerSettings) -> ServerSettings:
    """The settings with device "auto" resolved against the Ray cluster this process joined."""
    return dataclasses.replace(settings, device=resolve_device(settings.device, settings.tensor_parallel_size))


def _api_server_bundles(settings: ServerSettings) -> list[dict[str, float]]:
    """What the API servers of api_server_count > 1 reserve, one entry each; none when each
    engine's own replica serves HTTP."""
    if settings.api_server_count == 1:
        return []
    return [{"CPU": REPLICA_CPUS}] * (settings.num_replicas * settings.api_server_count)


def _replica_bundles(settings: ServerSettings) -> list[dict[str, float]]:
    """One replica's placement-group bundles: its shards', its own CPU merged into bundle 0."""
    return replica_bundles(settings.tensor_parallel_size, with_resolved_device(settings).device, REPLICA_CPUS)
