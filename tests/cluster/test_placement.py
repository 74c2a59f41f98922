"""Placing an engine's shards on the Ray cluster: a cluster too small for them is named at
once (and again in the error once the wait is over); one whose resources others hold is
waited for, with a log line while it waits, then refused with what is available."""

from __future__ import annotations

import logging

import pytest
import ray

from cluster.placement import create_placement_group, placement_shortfall, shard_bundles


def test_shortfall_names_what_no_node_or_cluster_has(ray_cluster):
    cpus = ray.cluster_resources()["CPU"]  # one node here
    assert placement_shortfall(shard_bundles(2, "cpu"), "STRICT_PACK") is None
    assert placement_shortfall(shard_bundles(2, "cpu"), "SPREAD") is None
    too_many = int(cpus) + 1
    assert placement_shortfall(shard_bundles(too_many, "cpu"), "STRICT_PACK") == (
        f"no node of this Ray cluster has {too_many} CPU (the most on one node: {cpus:g})")
    assert placement_shortfall(shard_bundles(too_many, "cpu"), "PACK") == (
        f"this Ray cluster has {cpus:g} CPU in all, and {too_many} are needed")
    assert placement_shortfall(shard_bundles(2, "cpu"), "STRICT_SPREAD") == (
        "1 node(s) of this Ray cluster can hold a bundle of {'CPU': 1.0}, and STRICT_SPREAD puts 2 bundles on "
        "a node each")
    if not ray.cluster_resources().get("GPU"):
        assert placement_shortfall(shard_bundles(1, "cuda"), "STRICT_PACK") == (
            "no node of this Ray cluster has 1 GPU (the most on one node: 0)")


def test_shortfall_on_nodes_given_as_they_will_be():
    """As `shardserve serve` checks the local Ray it is about to start (no Ray needed)."""
    one_node, two_nodes = [{"CPU": 4.0}], [{"CPU": 4.0}, {"CPU": 1.0}]
    assert placement_shortfall(shard_bundles(2, "cpu"), "STRICT_SPREAD", one_node) == (
        "1 node(s) of this Ray cluster can hold a bundle of {'CPU': 1.0}, and STRICT_SPREAD puts 2 bundles on "
        "a node each")
    assert placement_shortfall(shard_bundles(2, "cpu"), "STRICT_SPREAD", two_nodes) is None
    assert placement_shortfall(shard_bundles(5, "cpu"), "PACK", two_nodes) is None
    assert placement_shortfall(shard_bundles(5, "cpu"), "STRICT_PACK", two_nodes) == (
        "no node of this Ray cluster has 5 CPU (the most on one node: 4)")


def test_a_cluster_too_small_is_said_at_once_and_in_the_error(ray_cluster, caplog):
    too_many = int(ray.cluster_resources()["CPU"]) + 1
    with caplog.at_level(logging.WARNING, logger="cluster.placement"):
        with pytest.raises(ValueError, match=rf"cannot place {too_many} shards .* within 0.5 s: no node of this "
                                             rf"Ray cluster has {too_many} CPU"):
            create_placement_group(too_many, "cpu", "STRICT_PACK", timeout_s=0.5)
    assert f"no node of this Ray cluster has {too_many} CPU" in caplog.text  # said before the wait
    assert "waiting up to 0.5 s in case the cluster grows" in caplog.text
    assert all(pg["state"] != "PENDING" for pg in ray.util.placement_group_table().values())  # removed


def test_resources_held_by_others_are_waited_for_then_refused_with_what_is_free(ray_cluster, caplog,
                                                                               monkeypatch):
    monkeypatch.setattr("cluster.placement.WAIT_LOG_INTERVAL_S", 0.2)
    free = int(ray.available_resources()["CPU"])
    held = [create_placement_group(free - 1, "cpu", "STRICT_PACK", timeout_s=30)]
    try:
        with pytest.raises(ValueError, match=r"within 0.5 s: other engines or replicas hold what it needs "
                                             r"\(available: .*'CPU': 1\.0"):
            with caplog.at_level(logging.WARNING, logger="cluster.placement"):
                create_placement_group(2, "cpu", "STRICT_PACK", timeout_s=0.5)
        assert "still waiting to place 2 shards" in caplog.text and "ray status" in caplog.text
        assert "in case the cluster grows" not in caplog.text  # the cluster is big enough
        held.append(create_placement_group(1, "cpu", "STRICT_PACK", timeout_s=30))  # what is free still places
    finally:
        for group in held:
            ray.util.remove_placement_group(group)


class _Context:
    def __init__(self, gpu_ids):
        self.gpu_ids = gpu_ids

    def get_accelerator_ids(self):
        return {"GPU": self.gpu_ids}


@pytest.mark.parametrize("visible, gpu_ids, index", [
    (None, ["1"], 1),  # every GPU of the host visible: Ray's id is the index
    ("2,3", ["3"], 1),  # the node started with some GPUs: the id's place in that list
    ("5", ["5"], 0),  # Ray narrowed the list to the actor's GPU after all
])
def test_a_gpu_shard_sees_its_hosts_gpus_and_takes_the_one_ray_assigned(monkeypatch, visible, gpu_ids, index):
    from cluster.placement import NOSET_CUDA_VISIBLE_DEVICES, shard_actor_options
    from workers.shard_worker import assigned_cuda_index

    options = shard_actor_options(None, 0, "cuda")
    assert options["num_gpus"] == 1 and options["runtime_env"] == {"env_vars": {NOSET_CUDA_VISIBLE_DEVICES: "1"}}
    assert "runtime_env" not in shard_actor_options(None, 0, "cpu")
    monkeypatch.setattr(ray, "get_runtime_context", lambda: _Context(gpu_ids))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert assigned_cuda_index() == index


def test_a_gpu_shard_refuses_an_assignment_it_cannot_find(monkeypatch):
    from workers.shard_worker import assigned_cuda_index

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(ray, "get_runtime_context", lambda: _Context(["4"]))
    with pytest.raises(RuntimeError, match="Ray assigned GPU 4, not in CUDA_VISIBLE_DEVICES"):
        assigned_cuda_index()
    monkeypatch.setattr(ray, "get_runtime_context", lambda: _Context([]))
    with pytest.raises(RuntimeError, match="exactly one GPU"):
        assigned_cuda_index()
