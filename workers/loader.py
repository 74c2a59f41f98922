"""Fills a model's parameters: from a Hugging Face safetensors folder (each parameter's
weight_loader reads only its own slice) or with seeded random weights. Runs in each shard."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from workers.layers import default_weight_loader

SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)  # old checkpoints saved RoPE buffers
DUMMY_STD = 0.02


def load_weights(model: nn.Module, model_dir: str, load_format: str, seed: int = 0) -> None:
    """load_format: auto | safetensors (read model_dir) | dummy (random, from `seed`)."""
    if load_format == "dummy":
        _fill_dummy(model, seed)
    elif load_format in ("auto", "safetensors"):
        _load_safetensors(model, Path(model_dir))
    else:
        raise ValueError(f"load_format must be one of auto, safetensors, dummy; got {load_format!r}")


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Checkpoint weight name -> the safetensors file holding it."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = {name: model_dir / file for name, file in weight_map.items()}
    else:
        paths = [model_dir / "model.safetensors"]
        if not paths[0].is_file():
            paths = sorted(model_dir.glob("*.safetensors"))
        if not paths:
            raise ValueError(
                f"no safetensors weights in {model_dir}: expected model.safetensors or "
                "model.safetensors.index.json (or use --load-format dummy)"
            )
        files = {name: path for path in paths for name in _names_in(path)}
    for path in set(files.values()):
        if not path.is_file():
            raise ValueError(f"{path} is listed in {index_path.name} but does not exist")
    return files


def _names_in(path: Path) -> list[str]:
    with safe_open(path, framework="pt", device="cpu") as f:
        return list(f.keys())


def expected_checkpoint_names(model: nn.Module) -> dict[str, tuple[str, object]]:
    """Checkpoint name -> (our parameter name, shard id) for every weight the model needs.
    A packed parameter (qkv_proj, gate_up_proj) expects one checkpoint name per shard."""
    packed: dict[str, list[tuple[str, object]]] = defaultdict(list)
    for checkpoint_module, (module, shard_id) in model.packed_modules_mapping.items():
        packed[module].append((checkpoint_module, shard_id))
    expected = {}
    for param_name, _ in model.named_parameters():  # a tied lm_head is deduplicated away
        parts = param_name.split(".")
        module = parts[-2] if len(parts) >= 2 else ""
        if module not in packed:
            expected[param_name] = (param_name, None)
            continue
        for checkpoint_module, shard_id in packed[module]:
            name = ".".join(parts[:-2] + [checkpoint_module, parts[-1]])
            expected[name] = (param_name, shard_id)
    return expected


def _load_safetensors(model: nn.Module, model_dir: Path) -> None:
    files = checkpoint_files(model_dir)
    expected = expected_checkpoint_names(model)
    names = {n for n in files if not n.endswith(SKIPPED_SUFFIXES)}
    if "lm_head.weight" not in expected:
        names.discard("lm_head.weight")  # tied: some checkpoints still store a copy
    _check_names(names, expected, model_dir)
    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in sorted(names):
        by_file[files[name]].append(name)
    for path, file_names in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in file_names:
                param_name, shard_id = expected[name]
                param = params[param_name]
                loader = getattr(param, "weight_loader", default_weight_loader)
                try:
                    loader(param, f.get_slice(name), shard_id)
                except ValueError as e:
                    raise ValueError(f"weight {name!r} in {path}: {e}") from None


def _check_names(names: set[str], expected: dict, model_dir: Path) -> None:
    missing = sorted(set(expected) - names)
    if missing:
        raise ValueError(f"checkpoint {model_dir} is missing weight {missing[0]!r} ({len(missing)} missing)")
    unexpected = sorted(names - set(expected))
    if unexpected:
        raise ValueError(
            f"checkpoint {model_dir} has weight {unexpected[0]!r} that the model does not use "
            f"({len(unexpected)} unexpected); is config.json's architecture right?"
        )


@torch.no_grad()
def _fill_dummy(model: nn.Module, seed: int) -> None:
    """Normal(0, 0.02) weights and biases, norms 1; drawn on the parameter's device with a
    generator seeded per parameter, so the result depends only on (seed, name, shape)."""
    for index, (name, param) in enumerate(model.named_parameters()):
        if "norm" in name.split(".")[-2]:
            param.fill_(1.0)
            continue
        generator = torch.Generator(device=param.device).manual_seed(seed * 100_003 + index)
        param.normal_(0.0, DUMMY_STD, generator=generator)
