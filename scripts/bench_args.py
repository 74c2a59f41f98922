"""What the offline benchmarks share: the model options (a model folder, or a shape from
configs/models; with --load-format dummy, random weights of the real shapes), and how
they start Ray."""

from __future__ import annotations

import argparse
import os

import ray

from cluster.default_model import model_shape_path


# The benchmarks run the same prompts more than once (warm-ups, rounds, repeats), and each
# run must compute them: their engines keep no prefix cache. scripts/bench_prefix_caching.py
# measures the cache.
UNCACHED = {"enable_prefix_caching": False}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model folder (default: built-in tiny model)")
    parser.add_argument("--model-shape", default=None, help="a shape from configs/models, e.g. llama-3.1-8b")
    parser.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)


def model_path(args: argparse.Namespace) -> str | None:
    """The folder the engine loads: the shape's config folder, --model, or None (default model)."""
    return str(model_shape_path(args.model_shape)) if args.model_shape else args.model


def init_ray() -> None:
    """Joins the cluster RAY_ADDRESS names, else starts a local Ray without the dashboard:
    a benchmark has no use for it, and where its web assets are missing (a minimal Ray
    install) Ray waits about a minute for it to come up before giving up."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
