"""The model options the offline benchmarks share: a model folder, or a shape from
configs/models (with --load-format dummy: random weights of the real shapes)."""

from __future__ import annotations

import argparse

from cluster.default_model import model_shape_path


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model folder (default: built-in tiny model)")
    parser.add_argument("--model-shape", default=None, help="a shape from configs/models, e.g. llama-3.1-8b")
    parser.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)


def model_path(args: argparse.Namespace) -> str | None:
    """The folder the engine loads: the shape's config folder, --model, or None (default model)."""
    return str(model_shape_path(args.model_shape)) if args.model_shape else args.model
