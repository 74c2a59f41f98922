"""Weight loading: every family, sharded checkpoints, name errors, a proof that a shard
reads only its slice of every split weight, and the seeded dummy format."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import workers.loader
from workers.config import ModelConfig
from workers.loader import load_weights
from workers.models import get_model_class
from workers.parallel import ProcessGroup

FAMILIES = ("llama", "llama-tied", "mistral", "qwen2", "qwen3")


def _model(path, pg=None):
    config = ModelConfig.from_pretrained(path)
    return get_model_class(config.architecture)(config, pg or ProcessGroup(), torch.float32, "cpu")


def _packed_checkpoint_tensor(tensors: dict, name: str, mapping: dict) -> torch.Tensor:
    """At world size 1 a packed parameter is its checkpoint parts concatenated in order."""
    *prefix, module, suffix = name.split(".")
    parts = [".".join([*prefix, hf, suffix]) for hf, (ours, _) in mapping.items() if ours == module]
    return torch.cat([tensors[p] for p in parts]) if parts else tensors[name]


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_every_family(family, tiny_checkpoints):
    path = tiny_checkpoints(family)
    model = _model(path)
    load_weights(model, str(path), "auto")
    tensors = load_file(path / "model.safetensors")
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, _packed_checkpoint_tensor(tensors, name, model.packed_modules_mapping), rtol=0, atol=0)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (family == "llama-tied")


def test_sharded_checkpoint_loads_like_the_single_file(tiny_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoints("qwen2")
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    single, sharded = _model(path), _model(tmp_path)
    load_weights(single, str(path), "safetensors")
    load_weights(sharded, str(tmp_path), "auto")
    for (name, a), (_, b) in zip(single.named_parameters(), sharded.named_parameters()):
        assert torch.equal(a, b), name


def _rewrite(src, dst, edit) -> None:
    """Copies a checkpoint folder with its tensors edited by `edit(dict)`."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))


def test_missing_and_unexpected_weights_are_named(tiny_checkpoints, tmp_path):
    path = tiny_checkpoints("llama")
    _rewrite(path, tmp_path / "missing", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match="model.layers.1.self_attn.k_proj.weight"):
        load_weights(_model(path), str(tmp_path / "missing"), "auto")
    _rewrite(path, tmp_path / "extra", lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="model.layers.0.mlp.extra.weight"):
        load_weights(_model(path), str(tmp_path / "extra"), "auto")
    _rewrite(path, tmp_path / "old", lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    load_weights(_model(path), str(tmp_path / "old"), "auto")  # old RoPE buffers are skipped


def test_missing_files_are_value_errors(tiny_checkpoints, tmp_path):
    path = tiny_checkpoints("llama")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no safetensors weights"):
        load_weights(_model(path), str(tmp_path / "empty"), "auto")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-1.safetensors"}}))
    with pytest.raises(ValueError, match="model-1.safetensors"):
        load_weights(_model(path), str(broken), "auto")
    with pytest.raises(ValueError, match="load_format"):
        load_weights(_model(path), str(path), "pt")


class _RecordingSlice:
    def __init__(self, name, inner, reads):
        self.name, self.inner, self.reads = name, inner, reads

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        out = self.inner[index]
        self.reads.append((self.name, index, tuple(out.shape)))
        return out


class _RecordingFile:
    """safe_open that records every read: (name, index or 'get_tensor', shape read)."""

    def __init__(self, reads, *args, **kwargs):
        self.inner, self.reads = safe_open(*args, **kwargs), reads

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def keys(self):
        return self.inner.keys()

    def get_tensor(self, name):
        out = self.inner.get_tensor(name)
        self.reads.append((name, "get_tensor", tuple(out.shape)))
        return out

    def get_slice(self, name):
        return _RecordingSlice(name, self.inner.get_slice(name), self.reads)


def _shard_shape(name: str, config: ModelConfig, rank: int, world_size: int) -> tuple[int, ...] | None:
    """The part of checkpoint tensor `name` that `rank` holds; None for replicated ones."""
    d, hidden, inter = config.head_dim, config.hidden_size, config.intermediate_size
    rows_per_rank = -(-config.vocab_size // world_size)
    q_rows = config.num_attention_heads // world_size * d
    kv_rows = max(1, config.num_key_value_heads // world_size) * d
    module, kind = name.split(".")[-2:]
    shapes = {
        "embed_tokens": (min(config.vocab_size, (rank + 1) * rows_per_rank) - rank * rows_per_rank, hidden),
        "lm_head": (min(config.vocab_size, (rank + 1) * rows_per_rank) - rank * rows_per_rank, hidden),
        "q_proj": (q_rows, hidden),
        "k_proj": (kv_rows, hidden),
        "v_proj": (kv_rows, hidden),
        "o_proj": (hidden, config.num_attention_heads * d // world_size),
        "gate_proj": (inter // world_size, hidden),
        "up_proj": (inter // world_size, hidden),
        "down_proj": (hidden, inter // world_size),
    }
    if module not in shapes:
        return None
    return shapes[module][:1] if kind == "bias" else shapes[module]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rank,world_size", [(1, 2), (3, 4)])
def test_a_shard_reads_only_its_slice_of_split_weights(family, rank, world_size, tiny_checkpoints, monkeypatch):
    path = tiny_checkpoints(family)
    reads = []
    monkeypatch.setattr(workers.loader, "safe_open", lambda *a, **k: _RecordingFile(reads, *a, **k))
    model = _model(path, ProcessGroup(rank, world_size))  # loading needs no collectives
    load_weights(model, str(path), "auto")
    full_shapes = {k: v.shape for k, v in load_file(path / "model.safetensors").items()}
    split = {n: _shard_shape(n, model.config, rank, world_size) for n in full_shapes}
    split = {n: s for n, s in split.items() if s is not None}
    assert "model.embed_tokens.weight" in split and "model.layers.0.self_attn.k_proj.weight" in split
    for name, index, shape in reads:
        if name not in split:
            continue
        assert index != "get_tensor" and index != slice(None), f"{name} read whole: {index}"
        assert shape == split[name], f"{name}: read {shape}, shard is {split[name]}"
        assert torch.Size(shape).numel() < full_shapes[name].numel()
    assert sorted(n for n, _, _ in reads if n in split) == sorted(split)  # each read once


def test_dummy_weights_are_seeded_and_complete(tiny_checkpoints):
    path = tiny_checkpoints("qwen3")
    models = [_model(path) for _ in range(3)]
    for model, seed in zip(models, (7, 7, 8)):
        load_weights(model, "/nonexistent", "dummy", seed=seed)
    same, other = dict(models[1].named_parameters()), dict(models[2].named_parameters())
    for name, param in models[0].named_parameters():
        assert torch.isfinite(param).all(), name
        assert torch.equal(param, same[name]), name
        if "norm" in name:
            assert (param == 1).all(), name
        else:
            assert not torch.equal(param, other[name]), name
            assert 0.015 < param.std().item() < 0.025, name
    qkv = models[0].model.layers[0].self_attn.qkv_proj.weight
    assert qkv.shape == ((4 + 2 + 2) * 16, 64)
