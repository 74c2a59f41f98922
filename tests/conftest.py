"""Session fixtures: one local Ray cluster, the built-in default model in a fresh cache
folder, tiny random Hugging Face checkpoints of every supported family."""

from __future__ import annotations

import os

import pytest
import torch


def _has_gpu() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (gpu marker); this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def shardserve_cache(tmp_path_factory):
    """The default model is built from scratch once per test session, as on first use."""
    path = tmp_path_factory.mktemp("shardserve-cache")
    os.environ["SHARDSERVE_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def ray_cluster(shardserve_cache):
    import ray

    from api.app import PROXY_ENV_VARS

    # Serve's proxy as `shardserve serve` starts it (the local Ray's processes inherit this
    # environment): its router on its own loop, bodies read whole before routing.
    for name, value in PROXY_ENV_VARS.items():
        os.environ.setdefault(name, value)
    # Logical CPUs: TP=8 engines and Serve replicas need more bundles than 2 cores.
    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"SHARDSERVE_CACHE_DIR": str(shardserve_cache)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """family -> folder of a tiny random checkpoint saved by Hugging Face transformers."""
    from tests.checkpoints import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    made: dict[str, object] = {}

    def get(family: str):
        if family not in made:
            made[family] = make_tiny_checkpoint(family, root / family)
        return made[family]

    return get
