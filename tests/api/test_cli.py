"""`shardserve serve` arguments into ServerSettings (no Ray): model name aliases; the API
servers per engine and the app they build."""

from __future__ import annotations

import pytest

from api.cli import build_parser, settings_from_args
from api.settings import DEFAULT_MODEL_NAME, ServerSettings


def test_served_model_name_takes_aliases_the_first_primary():
    args = build_parser().parse_args(["serve", "--served-model-name", "llama-8b", "meta-llama/Llama-3.1-8B"])
    settings = settings_from_args(args)
    assert settings.model_names() == ["llama-8b", "meta-llama/Llama-3.1-8B"]
    assert settings.model_name() == "llama-8b"
    one = settings_from_args(build_parser().parse_args(["serve", "--served-model-name", "only"]))
    assert one.model_names() == ["only"]
    assert ServerSettings.from_dict({"served_model_name": "from-yaml"}).model_names() == ["from-yaml"]
    assert ServerSettings().model_names() == [DEFAULT_MODEL_NAME]


@pytest.mark.parametrize("bad", [[""], ["a", 5]])
def test_empty_or_non_string_aliases_are_refused(bad):
    with pytest.raises(ValueError, match="served_model_name must be"):
        ServerSettings(served_model_name=bad)


def test_api_server_count_splits_the_admission_bound_and_builds_two_deployments():
    """--api-server-count K (vLLM's flag): the engines in ShardServeEngine (their bundles),
    num_replicas x K CPU-only ShardServe replicas in front, each admitting its share."""
    from api.app import app_cpus, build_app, replicas_shortfall
    from api.deployment import ShardServeEngine, ShardServeServer

    args = build_parser().parse_args(["serve", "-tp", "2", "--num-replicas", "2", "--api-server-count", "3",
                                      "--device", "cpu", "--max-num-seqs", "8", "--max-waiting-requests", "8"])
    settings = settings_from_args(args)
    assert settings.api_server_count == 3
    assert settings.max_in_flight == 6  # ceil((8 + 8) / 3)
    assert ServerSettings(max_num_seqs=8, max_waiting_requests=8).max_in_flight == 16
    with pytest.raises(ValueError, match="api_server_count must be >= 1"):
        ServerSettings(api_server_count=0)
    ingress = build_app(settings)._bound_deployment
    engines = ingress.init_args[1]._bound_deployment  # the ShardServeEngine application bound in
    assert (ingress.name, engines.name) == (ShardServeServer.name, ShardServeEngine.name)
    assert ingress.num_replicas == 6 and not ingress._replica_config.placement_group_bundles
    assert engines.num_replicas == 2
    assert engines._replica_config.placement_group_bundles == [{"CPU": 2.0}, {"CPU": 1.0}]
    # Two engines of 3 CPUs (two shards and the engine's replica) and six API servers.
    assert app_cpus(settings) == 12.0
    assert replicas_shortfall(settings, nodes=[{"CPU": 12.0}]) is None
    assert replicas_shortfall(settings, nodes=[{"CPU": 11.0}]) == (
        "2 replicas and 6 API servers: this Ray cluster has 11 CPU in all, and 12 are needed")
    one = ServerSettings(tensor_parallel_size=2, device="cpu")
    assert build_app(one)._bound_deployment.name == ShardServeServer.name and app_cpus(one) == 3.0
