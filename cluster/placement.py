"""Placement of a tensor-parallel engine's shards: one bundle per rank in a Ray
placement group, and the actor options that pin each shard to its bundle. Runs on the
driver or in a Serve replica."""

from __future__ import annotations

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

PLACEMENT_TIMEOUT_S = 120.0


def shard_bundles(tensor_parallel_size: int, device: str) -> list[dict[str, float]]:
    """One bundle per rank: a GPU each on CUDA, a CPU each otherwise."""
    bundle = {"GPU": 1.0} if device == "cuda" else {"CPU": 1.0}
    return [dict(bundle) for _ in range(tensor_parallel_size)]


def create_placement_group(
    tensor_parallel_size: int, device: str, strategy: str
) -> PlacementGroup:
    """Reserves the shards' bundles; ValueError naming what is missing if the cluster
    cannot hold them within PLACEMENT_TIMEOUT_S."""
    bundles = shard_bundles(tensor_parallel_size, device)
    group = placement_group(bundles, strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        ray.util.remove_placement_group(group)
        raise ValueError(
            f"the Ray cluster cannot place {tensor_parallel_size} shards as {bundles} with "
            f"strategy {strategy} (available: {ray.available_resources()}); lower "
            "tensor_parallel_size, add nodes, or choose PACK / SPREAD"
        )
    return group


def shard_actor_options(group: PlacementGroup, bundle_index: int, device: str) -> dict:
    """Ray actor options that put one shard in its bundle and use all of it."""
    resources = {"num_gpus": 1, "num_cpus": 0} if device == "cuda" else {"num_gpus": 0, "num_cpus": 1}
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
