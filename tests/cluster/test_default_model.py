"""The built-in tiny model (built in a temp cache: loadable by Hugging Face and ModelConfig,
deterministic, race-safe) and the real model shapes in configs/models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, LlamaForCausalLM

from cluster import default_model
from cluster.default_model import (
    build_default_model,
    default_model_path,
    model_shape_path,
    shape_names,
    train_tokenizer,
)
from cluster.tokenizer import load_tokenizer
from workers.config import EngineConfig, ModelConfig

MODULE_PATH = Path(default_model.__file__)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the session's tests, so the model is built once."""
    path = tmp_path_factory.getbasetemp() / "shardserve-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SHARDSERVE_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def model_dir(cache) -> Path:
    return default_model_path()


def test_folder_is_built_in_the_cache_and_reused(cache, model_dir):
    assert model_dir.parent == cache / "models"
    assert model_dir.name.startswith("shardserve-tiny-llama-v1-")
    names = sorted(p.name for p in model_dir.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"]
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert default_model_path() == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_model_config_reads_the_folder(model_dir):
    config = ModelConfig.from_pretrained(model_dir)
    assert (config.architecture, config.hidden_size, config.intermediate_size) == (
        "LlamaForCausalLM", 256, 688)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim) == (4, 8, 4, 32)
    assert (config.vocab_size, config.bos_token_id, config.eos_token_ids) == (1536, 0, (1, 4))
    assert (config.rope_theta, config.rms_norm_eps, config.rope_scaling) == (10000.0, 1e-5, None)
    assert not config.tie_word_embeddings and config.torch_dtype == "float32"
    EngineConfig(model=str(model_dir), model_config=config, tensor_parallel_size=2)


def test_hugging_face_loads_every_weight(model_dir):
    model, info = LlamaForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.vocab_size == len(load_tokenizer(model_dir))
    assert model.generation_config.eos_token_id == [1, 4]
    embed = model.model.embed_tokens.weight
    assert embed.dtype == torch.float32 and 0.95 < embed.std().item() < 1.05


def test_greedy_generation_is_varied_and_decisive(model_dir):
    model = LlamaForCausalLM.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    continuations = []
    for text in ("The weather today is", "def add(a, b):"):
        ids = tokenizer(text, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
        continuations.append(out[0, ids.shape[1]:].tolist())
    assert all(len(set(c)) >= 16 for c in continuations), continuations
    assert continuations[0] != continuations[1]
    with torch.no_grad():
        logits = model(torch.arange(8, 72).unsqueeze(0)).logits[0]
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min().item() > 1e-3  # no near-ties for parity tests
    assert logits.argmax(-1).unique().numel() > 32


def test_two_builds_are_byte_identical(tmp_path, model_dir):
    build_default_model(tmp_path)
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        assert (tmp_path / name).read_bytes() == (model_dir / name).read_bytes(), name
    assert train_tokenizer().to_str() == train_tokenizer().to_str()


def test_tokenizer_prepends_bos_and_round_trips(model_dir):
    tokenizer = load_tokenizer(model_dir)
    text = "The café serves 42 croissants 😀, naïve!"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id == 0 and ids.count(0) == 1
    assert tokenizer.encode(text, add_special_tokens=False) == ids[1:]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.eos_token == "<|eot_id|>" and tokenizer.eos_token_id == 4
    assert len(tokenizer.encode(" the weather", add_special_tokens=False)) == 2


def test_chat_template_uses_llama3_headers(model_dir):
    tokenizer = load_tokenizer(model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi "}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids) == text


def test_load_tokenizer_returns_none_without_tokenizer_files(tmp_path, cache):
    assert load_tokenizer(model_shape_path("llama-3.2-1b")) is None
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


def test_racing_builders_in_threads_keep_one_folder(tmp_path):
    barrier = threading.Barrier(2)
    target = tmp_path / "models" / "tiny"
    results = []

    def build(folder: Path) -> None:
        (folder / "marker").write_text(threading.current_thread().name)
        barrier.wait(timeout=10)  # both builds finish before either renames

    def publish() -> None:
        results.append(default_model._publish(target, build))

    threads = [threading.Thread(target=publish) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [target, target]
    assert (target / "marker").is_file()
    assert [p.name for p in target.parent.iterdir()] == ["tiny"]  # temp folders removed


RACER = """
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("default_model", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
Path(sys.argv[2]).touch()
while not Path(sys.argv[3]).exists():
    time.sleep(0.005)
path = module.default_model_path()
print(path, "ray" in sys.modules, "transformers" in sys.modules)
"""


def test_two_processes_racing_yield_one_valid_folder(tmp_path):
    """Also checks that building imports neither Ray nor transformers."""
    cache, go = tmp_path / "cache", tmp_path / "go"
    readies = [tmp_path / "ready0", tmp_path / "ready1"]
    env = {**os.environ, "SHARDSERVE_CACHE_DIR": str(cache)}
    procs = [
        subprocess.Popen([sys.executable, "-c", RACER, str(MODULE_PATH), str(ready), str(go)],
                         env=env, stdout=subprocess.PIPE, text=True)
        for ready in readies
    ]
    deadline = time.monotonic() + 60
    while not all(ready.exists() for ready in readies) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    outputs = [proc.communicate(timeout=60)[0].split() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert outputs[0] == outputs[1] and outputs[0][1:] == ["False", "False"]
    folder = Path(outputs[0][0])
    assert [p.name for p in (cache / "models").iterdir()] == [folder.name]
    assert ModelConfig.from_pretrained(folder).vocab_size == 1536
    assert json.loads((folder / "tokenizer.json").read_text())["model"]["type"] == "BPE"


# Public parameter counts of the released checkpoints.
PARAMETER_COUNTS = {
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.1-70b": 70_553_706_496,
    "llama-3.1-405b": 405_853_388_800,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-8b": 8_190_735_360,
    "mistral-7b-v0.3": 7_248_023_552,
}


def _num_parameters(c: ModelConfig) -> int:
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = 2 * c.hidden_size * (q + kv) + 3 * c.hidden_size * c.intermediate_size
    per_layer += 2 * c.hidden_size  # the two RMSNorms
    per_layer += (q + 2 * kv) if c.attention_bias else 0
    per_layer += 2 * c.head_dim if c.qk_norm else 0
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return embeddings + c.num_hidden_layers * per_layer + c.hidden_size


def test_shape_names_cover_the_known_models():
    assert shape_names() == sorted(PARAMETER_COUNTS)


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_shape_configs_parse_and_match_parameter_counts(name, cache):
    folder = model_shape_path(name)
    assert folder == cache / "shapes" / name and model_shape_path(name) == folder
    config = ModelConfig.from_pretrained(folder)
    assert config == ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
    assert _num_parameters(config) == PARAMETER_COUNTS[name]
    assert config.torch_dtype == "bfloat16"
    hf_config = AutoConfig.from_pretrained(folder, local_files_only=True)
    assert hf_config.architectures == [config.architecture]


def test_shape_details_that_models_depend_on():
    llama = ModelConfig.from_pretrained(model_shape_path("llama-3.1-8b"))
    assert llama.rope_theta == 500000.0 and llama.rope_scaling == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    assert ModelConfig.from_pretrained(model_shape_path("llama-3.2-1b")).tie_word_embeddings
    qwen2 = ModelConfig.from_pretrained(model_shape_path("qwen2.5-7b"))
    assert qwen2.attention_bias and qwen2.sliding_window is None and qwen2.rms_norm_eps == 1e-6
    qwen3 = ModelConfig.from_pretrained(model_shape_path("qwen3-8b"))
    assert qwen3.qk_norm and qwen3.head_dim == 128 and qwen3.eos_token_ids == (151645,)


def test_unknown_shape_lists_the_known_names(cache):
    with pytest.raises(ValueError, match="llama-3.1-8b.*qwen3-8b"):
        model_shape_path("gpt-5")
