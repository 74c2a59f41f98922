"""Placement of a tensor-parallel engine's shards: one bundle per rank in a Ray
placement group, and the actor options that pin each shard to its bundle. Runs on the
driver or in a Serve replica."""

from __future__ import annotations

import logging
import time

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

PLACEMENT_TIMEOUT_S = 120.0
WAIT_LOG_INTERVAL_S = 15.0  # how often a placement still waiting says so
logger = logging.getLogger(__name__)


def shard_bundles(tensor_parallel_size: int, device: str) -> list[dict[str, float]]:
    """One bundle per rank: a GPU each on CUDA, a CPU each otherwise."""
    bundle = {"GPU": 1.0} if device == "cuda" else {"CPU": 1.0}
    return [dict(bundle) for _ in range(tensor_parallel_size)]


def create_placement_group(
    tensor_parallel_size: int, device: str, strategy: str, timeout_s: float = PLACEMENT_TIMEOUT_S
) -> PlacementGroup:
    """Reserves the shards' bundles, or raises ValueError naming what is missing if the
    cluster cannot hold them within timeout_s. Like vLLM, it waits rather than failing at
    once when the cluster is too small (an autoscaler may add nodes), but says so at once,
    and every WAIT_LOG_INTERVAL_S while it waits."""
    bundles = shard_bundles(tensor_parallel_size, device)
    what = f"{tensor_parallel_size} shards as {bundles} with strategy {strategy}"
    shortfall = placement_shortfall(bundles, strategy)
    if shortfall:
        logger.warning("placing %s: %s; waiting up to %g s in case the cluster grows", what, shortfall, timeout_s)
    group = placement_group(bundles, strategy=strategy)
    started = time.monotonic()
    while (left := timeout_s - (time.monotonic() - started)) > 0:
        ready, _ = ray.wait([group.ready()], timeout=min(WAIT_LOG_INTERVAL_S, left))
        if ready:
            return group
        if left > WAIT_LOG_INTERVAL_S:  # the wait ended on the interval, not the timeout
            logger.warning("still waiting to place %s after %.0f s (available: %s); `ray status` shows "
                           "what holds the rest", what, time.monotonic() - started, ray.available_resources())
    ray.util.remove_placement_group(group)
    why = shortfall or f"other engines or replicas hold what it needs (available: {ray.available_resources()})"
    raise ValueError(
        f"the Ray cluster cannot place {what} within {timeout_s:g} s: {why}; lower tensor_parallel_size, "
        "add nodes, or choose PACK / SPREAD"
    )


def placement_shortfall(bundles: list[dict[str, float]], strategy: str,
                        nodes: list[dict[str, float]] | None = None) -> str | None:
    """Why the cluster's live nodes, as they are, could never hold `bundles` under
    `strategy` (all on one node for STRICT_PACK, one a node for STRICT_SPREAD, anywhere
    for PACK and SPREAD), or None if they could. Counts each node's total resources, not
    what is free now. For STRICT_SPREAD the bundles must nest (each at least the next in
    every resource, as shard_bundles and replica_bundles are). `nodes`: each node's
    resources, for a cluster not started yet (default: those of the one joined)."""
    need: dict[str, float] = {}
    for bundle in bundles:
        for key, amount in bundle.items():
            need[key] = need.get(key, 0.0) + amount
    if nodes is None:
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if strategy == "STRICT_PACK":
        if any(all(node.get(k, 0.0) >= v for k, v in need.items()) for node in nodes):
            return None
        key = next(k for k, v in need.items() if not any(node.get(k, 0.0) >= v for node in nodes))
        most = max((node.get(key, 0.0) for node in nodes), default=0.0)
        return f"no node of this Ray cluster has {need[key]:g} {key} (the most on one node: {most:g})"
    if strategy == "STRICT_SPREAD":  # a node each; the i-th largest bundle needs i + 1 nodes that hold it
        for i, bundle in enumerate(sorted(bundles, key=lambda b: sum(b.values()), reverse=True)):
            holders = sum(all(node.get(k, 0.0) >= v for k, v in bundle.items()) for node in nodes)
            if holders < i + 1:
                return (f"{holders} node(s) of this Ray cluster can hold a bundle of {bundle}, and "
                        f"STRICT_SPREAD puts {len(bundles)} bundles on a node each")
        return None
    totals = {k: sum(node.get(k, 0.0) for node in nodes) for k in need}
    for key, amount in need.items():
        if totals[key] < amount:
            return f"this Ray cluster has {totals[key]:g} {key} in all, and {amount:g} are needed"
    return None


# Ray narrows each GPU actor's CUDA_VISIBLE_DEVICES to its own GPU unless this is set. A
# shard must see its host's other GPUs: CUDA maps a peer's memory (the one-shot all-reduce's
# symmetric buffers) only from a device the process can see. The shard picks its own GPU
# by Ray's assignment (workers/shard_worker.py, ShardWorker._select_device), as vLLM's
# Ray workers do.
NOSET_CUDA_VISIBLE_DEVICES = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def shard_actor_options(group: PlacementGroup, bundle_index: int, device: str) -> dict:
    """Ray actor options that put one shard in its bundle and use all of it."""
    if device == "cuda":
        resources = {"num_gpus": 1, "num_cpus": 0,
                     "runtime_env": {"env_vars": {NOSET_CUDA_VISIBLE_DEVICES: "1"}}}
    else:
        resources = {"num_gpus": 0, "num_cpus": 1}
    return {
        **resources,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=group,
            placement_group_bundle_index=bundle_index,
            placement_group_capture_child_tasks=True,
        ),
    }


def replica_bundles(tensor_parallel_size: int, device: str, replica_cpus: float = 1.0) -> list[dict[str, float]]:
    """A Serve replica's placement group: the shards' bundles, with the replica's own CPU
    merged into bundle 0 (the replica takes no GPU, so nothing is counted twice)."""
    bundles = shard_bundles(tensor_parallel_size, device)
    bundles[0]["CPU"] = bundles[0].get("CPU", 0.0) + replica_cpus
    return bundles
