"""Every Serve config in configs/ is valid for Ray Serve and for shardserve (its args build
an engine config for the real model's shape), the GPU configs autoscale and shut down
gracefully, the KubeRay RayService carries the 8B config on GPU pods that fit it, and the
Grafana dashboard queries exactly the metrics api/metrics.py exports through Ray."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from api.app import build_app
from api.deployment import ShardServeServer
from api.metrics import METRICS
from api.settings import ServerSettings
from cluster.default_model import model_shape_path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# config -> (model shape in configs/models, tensor_parallel_size)
GPU_CONFIGS = {
    "llama-3.1-8b-tp2.yaml": ("llama-3.1-8b", 2),
    "llama-3.1-70b-tp4.yaml": ("llama-3.1-70b", 4),
    "llama-3.1-70b-tp8.yaml": ("llama-3.1-70b", 8),
}
RAYSERVICE = CONFIGS / "k8s" / "rayservice-llama-3.1-8b.yaml"


def application(config: dict) -> dict:
    (app,) = config["applications"]
    return app


def test_every_config_is_listed_and_valid_for_serve_and_shardserve():
    names = sorted(path.name for path in CONFIGS.glob("*.yaml"))
    assert names == sorted(["default.yaml", *GPU_CONFIGS])
    for name in names:
        config = yaml.safe_load((CONFIGS / name).read_text())
        ServeDeploySchema.model_validate(config)
        app = application(config)
        assert (app["import_path"], app["route_prefix"]) == ("api.app:build_app", "/")
        ServerSettings.from_dict(app["args"])
        for deployment in app.get("deployments", []):
            assert deployment["name"] == ShardServeServer.name


@pytest.mark.parametrize("name", sorted(GPU_CONFIGS))
def test_gpu_config_resolves_against_the_real_model_shape(name):
    shape, tensor_parallel_size = GPU_CONFIGS[name]
    args = application(yaml.safe_load((CONFIGS / name).read_text()))["args"]
    assert args["model"].startswith("/models/")  # the documented placeholder
    # The real checkpoint is not here: its config.json (dummy weights) stands in for it.
    settings = ServerSettings.from_dict({**args, "model": str(model_shape_path(shape)), "load_format": "dummy"})
    config, _ = settings.engine_args().resolve()
    assert (config.tensor_parallel_size, config.dtype, config.device) == (tensor_parallel_size, "bfloat16", "cuda")
    assert config.max_model_len <= config.model_config.max_position_embeddings
    assert config.placement_strategy == "STRICT_PACK"


@pytest.mark.parametrize("name", sorted(GPU_CONFIGS))
def test_gpu_config_autoscales_checks_health_and_drains(name):
    (deployment,) = application(yaml.safe_load((CONFIGS / name).read_text()))["deployments"]
    # "auto" lets the config's autoscaling replace the num_replicas build_app sets in code.
    assert deployment["num_replicas"] == "auto"
    scaling = deployment["autoscaling_config"]
    assert 1 <= scaling["min_replicas"] <= scaling["initial_replicas"] <= scaling["max_replicas"]
    assert 0 < scaling["target_ongoing_requests"] < deployment["max_ongoing_requests"]
    assert 0 < deployment["health_check_period_s"] < deployment["health_check_timeout_s"]
    assert deployment["graceful_shutdown_timeout_s"] >= 60
    assert deployment["graceful_shutdown_wait_loop_s"] > 0


@pytest.mark.parametrize("name", sorted(GPU_CONFIGS))
def test_serve_controller_merges_the_overrides_into_gpu_replicas(name):
    """What `serve deploy` runs: build_app's deployment with the config's `deployments:`
    merged by the controller's own function (Ray internals, no cluster needed)."""
    from ray.serve._private.application_state import override_deployment_info
    from ray.serve._private.deployment_info import DeploymentInfo

    app_schema = ServeDeploySchema.model_validate(yaml.safe_load((CONFIGS / name).read_text())).applications[0]
    deployment = build_app(app_schema.args)._bound_deployment
    info = DeploymentInfo(deployment_config=deployment._deployment_config,
                          replica_config=deployment._replica_config, start_time_ms=0, deployer_job_id="")
    merged = override_deployment_info({ShardServeServer.name: info}, app_schema)[ShardServeServer.name]
    config, replica = merged.deployment_config, merged.replica_config
    overrides = app_schema.deployments[0]
    assert config.num_replicas is None
    assert config.autoscaling_config.max_replicas == overrides.autoscaling_config["max_replicas"]
    assert config.health_check_period_s == overrides.health_check_period_s
    assert config.graceful_shutdown_timeout_s == overrides.graceful_shutdown_timeout_s
    # One GPU bundle per shard, the replica's CPU in bundle 0, all on one node.
    tensor_parallel_size = GPU_CONFIGS[name][1]
    assert [b.get("GPU") for b in replica.placement_group_bundles] == [1.0] * tensor_parallel_size
    assert replica.placement_group_strategy == "STRICT_PACK"


def test_rayservice_matches_the_crd_schema_and_a_typo_does_not():
    """Checked against configs/k8s/rayservice.schema.json (the RayService CRD's fields the
    manifest uses); a misspelled field or a wrong type is a schema error."""
    schema = json.loads((CONFIGS / "k8s" / "rayservice.schema.json").read_text())
    manifest = yaml.safe_load(RAYSERVICE.read_text())
    jsonschema.validate(manifest, schema)
    typo = copy.deepcopy(manifest)
    typo["spec"]["rayClusterConfig"]["workerGroupSpec"] = typo["spec"]["rayClusterConfig"].pop("workerGroupSpecs")
    with pytest.raises(jsonschema.ValidationError, match="workerGroupSpec"):
        jsonschema.validate(typo, schema)
    wrong_type = copy.deepcopy(manifest)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "4"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wrong_type, schema)


def test_rayservice_serves_the_8b_config_on_gpu_pods_that_fit_it():
    manifest = yaml.safe_load(RAYSERVICE.read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    assert serve_config == yaml.safe_load((CONFIGS / "llama-3.1-8b-tp2.yaml").read_text())
    app = application(serve_config)
    cluster = manifest["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    (workers,) = cluster["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == int(container["resources"]["requests"]["nvidia.com/gpu"])
    assert gpus % app["args"]["tensor_parallel_size"] == 0
    max_replicas = app["deployments"][0]["autoscaling_config"]["max_replicas"]
    assert workers["maxReplicas"] * gpus >= max_replicas * app["args"]["tensor_parallel_size"]
    assert cluster["enableInTreeAutoscaling"] is True
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert any(app["args"]["model"].startswith(path + "/") for path in mounts)
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container["image"] == container["image"]
    assert {8000, 8265, 6379} <= {port["containerPort"] for port in head_container["ports"]}


# The Grafana dashboard -----------------------------------------------------------------

DASHBOARD = CONFIGS / "grafana" / "shardserve-dashboard.json"
# Ray exports a metric NAME as ray_NAME; counters as ray_NAME_total, histograms as _bucket etc.
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
QUERIED = re.compile(r"\bray_(shardserve_[a-z0-9_]+)")


def _metric_of(exported: str) -> str:
    """api.metrics name of an exported series name, checked against its kind."""
    for name, (kind, *_) in METRICS.items():
        if any(exported == name + suffix for suffix in SUFFIXES[kind]):
            return name
    raise AssertionError(f"the dashboard queries {exported!r}, which api/metrics.py does not export")


def test_dashboard_queries_only_metrics_that_exist_and_shows_them_all():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    queried = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = QUERIED.findall(target["expr"])
            assert names, target["expr"]
            queried |= {_metric_of(name) for name in names}
    for variable in ("application", "replica"):
        queried.add(_metric_of(QUERIED.search(variables[variable]["definition"]).group(1)))
    assert queried == set(METRICS)


def test_rayservice_pods_start_serves_proxy_as_shardserve_serve_does():
    """Every pod's Ray gets `shardserve serve`'s proxy settings (api.app.PROXY_ENV_VARS):
    Serve starts a proxy on every node from that node's environment."""
    from api.app import PROXY_ENV_VARS

    cluster = yaml.safe_load(RAYSERVICE.read_text())["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for container in (c for group in groups for c in group["template"]["spec"]["containers"]):
        env = {item["name"]: item["value"] for item in container["env"]}
        assert PROXY_ENV_VARS.items() <= env.items(), container["name"]
