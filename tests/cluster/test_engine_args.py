"""EngineArgs: the default step budget (max_num_batched_tokens) is the context length within
[2048, 8192] on a GPU and 2048 on CPU, so a long prompt is prefilled in chunks between
decode steps, and an explicit value wins; a max_model_len past the model's positions is an
error at start. A shipped shape's name with load_format "dummy" is that shape's folder.
device "auto" is CUDA only where the Ray cluster has a GPU for every shard."""

from __future__ import annotations

import pytest

from cluster.default_model import model_shape_path
from cluster import engine_args
from cluster.engine_args import EngineArgs, default_step_tokens, resolve_device


@pytest.mark.parametrize("device, max_model_len, expected", [
    ("cuda", 1024, 2048), ("cuda", 4096, 4096), ("cuda", 131072, 8192),
    ("cpu", 1024, 2048), ("cpu", 4096, 2048), ("cpu", 131072, 2048),
])
def test_default_step_tokens(device, max_model_len, expected):
    assert default_step_tokens(device, max_model_len) == expected


def test_resolved_config_chunks_long_contexts_unless_told():
    model = str(model_shape_path("llama-3.1-8b"))  # 131072 positions
    config, _ = EngineArgs(model, device="cpu", max_model_len=16384).resolve()
    assert config.max_num_batched_tokens == 2048 and config.max_model_len == 16384
    config, _ = EngineArgs(model, device="cuda", max_model_len=16384).resolve()
    assert config.max_num_batched_tokens == 8192
    config, _ = EngineArgs(model, device="cpu", max_model_len=16384, max_num_batched_tokens=16384).resolve()
    assert config.max_num_batched_tokens == 16384


def test_max_model_len_past_the_models_positions_is_refused():
    """The built-in model has 2048 positions (its RoPE table): 2049 would let a long
    request index past it."""
    assert EngineArgs(device="cpu").resolve()[0].max_model_len == 2048
    assert EngineArgs(device="cpu", max_model_len=2048).resolve()[0].max_model_len == 2048
    with pytest.raises(ValueError, match=r"max_model_len \(2049\) is greater than the model's "
                                         r"max_position_embeddings \(2048\)"):
        EngineArgs(device="cpu", max_model_len=2049).resolve()


def test_a_shape_name_with_dummy_weights_resolves_to_its_config_folder():
    config, tokenizer = EngineArgs("llama-3.1-8b", load_format="dummy", device="cpu", max_model_len=1024).resolve()
    assert config.model == str(model_shape_path("llama-3.1-8b"))
    assert config.model_config.hidden_size == 4096 and tokenizer is None


def test_a_shape_name_without_dummy_weights_is_not_a_folder():
    with pytest.raises(ValueError, match=r"'llama-3.1-8b' is not a folder.*load_format 'dummy'.*llama-3.2-1b"):
        EngineArgs("llama-3.1-8b", device="cpu").resolve()


def test_a_shape_without_a_tokenizer_refuses_text_and_says_what_to_send():
    from cluster.prompts import parse_prompt

    config, tokenizer = EngineArgs("llama-3.2-1b", load_format="dummy", device="cpu", max_model_len=64).resolve()
    kwargs = dict(tokenizer=tokenizer, vocab_size=config.model_config.vocab_size,
                  hidden_size=config.model_config.hidden_size, dtype=config.torch_dtype, enable_prompt_embeds=True)
    with pytest.raises(ValueError, match=r"no tokenizer.*a list of ids as the prompt over HTTP"):
        parse_prompt("hello", **kwargs)
    assert parse_prompt({"prompt_token_ids": [1, 2]}, **kwargs).prompt_token_ids == (1, 2)


@pytest.mark.parametrize("gpus, tensor_parallel_size, expected, warns", [
    (0, 1, "cpu", False), (1, 1, "cuda", False), (2, 2, "cuda", False), (8, 2, "cuda", False),
    (1, 2, "cpu", True), (4, 8, "cpu", True),
])
def test_auto_device_is_cuda_only_where_every_shard_gets_a_gpu(monkeypatch, caplog, gpus, tensor_parallel_size,
                                                                expected, warns):
    """An engine the cluster's GPUs cannot hold would wait for GPUs that may never come
    (one GPU, tensor_parallel_size 2): "auto" then runs it on CPU, and says so."""
    monkeypatch.setattr(engine_args.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(engine_args.ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": float(gpus)} if gpus
                        else {"CPU": 16.0})
    with caplog.at_level("WARNING", logger="cluster.engine_args"):
        assert resolve_device("auto", tensor_parallel_size) == expected
    assert ("fewer than tensor_parallel_size" in caplog.text) == warns
    assert resolve_device("cuda", tensor_parallel_size) == "cuda"  # an explicit device waits for its GPUs
    assert resolve_device("cpu", tensor_parallel_size) == "cpu"


def test_auto_device_without_ray_is_cpu(monkeypatch):
    monkeypatch.setattr(engine_args.ray, "is_initialized", lambda: False)
    assert resolve_device("auto", 1) == "cpu"
