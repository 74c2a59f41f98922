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
