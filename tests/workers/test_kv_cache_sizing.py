"""KV-cache sizing: on CUDA from the memory the GPU reports free (gpu_memory_utilization,
as vLLM users know it), else from kv_cache_memory_bytes; a cache too small for one request
of max_model_len is an error that says where the memory went. The GPU's report is faked
here, so the arithmetic runs on CPU; the gpu-marked engine tests size real caches."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from workers.attention import kv_cache_bytes_per_block
from workers.config import EngineConfig, ModelConfig
from workers.model_runner import ModelRunner
from workers.parallel import ProcessGroup

GIB = 1 << 30


@pytest.fixture
def config(tiny_checkpoints):
    path = tiny_checkpoints("llama")
    return EngineConfig(model=str(path), model_config=ModelConfig.from_pretrained(path), max_model_len=64,
                        block_size=16, device="cuda", gpu_memory_utilization=0.5)


def blocks_that_fit(config: EngineConfig, device: str = "cuda") -> int:
    """ModelRunner's sizing alone, without loading a model onto a device."""
    runner = ModelRunner.__new__(ModelRunner)
    runner.config, runner.pg, runner.device = config, ProcessGroup(), torch.device(device)
    return runner._num_blocks_that_fit()


def per_block(config: EngineConfig) -> int:
    return kv_cache_bytes_per_block(config.model_config, 1, config.block_size, config.torch_dtype)


def test_the_cache_takes_the_utilized_share_of_the_gpu_less_what_is_in_use(config, monkeypatch):
    # 80 GiB GPU, 10 GiB in use (weights, other processes): half of it allowed leaves 30 GiB.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * GIB, 80 * GIB))
    assert blocks_that_fit(config) == 30 * GIB // per_block(config)


def test_kv_cache_memory_bytes_overrides_the_measurement(config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: pytest.fail("measured"))
    config = dataclasses.replace(config, kv_cache_memory_bytes=100 * per_block(config) + 1)
    assert blocks_that_fit(config) == 100


def test_a_gpu_already_past_the_utilization_is_an_error_naming_the_memory_in_use(config, monkeypatch):
    # 60 of 80 GiB in use, more than the 40 GiB gpu_memory_utilization=0.5 allows.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * GIB, 80 * GIB))
    with pytest.raises(ValueError) as error:
        blocks_that_fit(config)
    message = str(error.value)
    assert message.startswith("the KV cache holds 0 blocks of 16 tokens (gpu_memory_utilization=0.5 of the "
                              "GPU's 80.0 GiB, of which 60.0 GiB are in use already")
    assert "fewer than one request of max_model_len=64 needs" in message


def test_a_cpu_cache_too_small_for_one_request_is_an_error(config):
    config = dataclasses.replace(config, device="cpu", kv_cache_memory_bytes=3 * per_block(config))
    with pytest.raises(ValueError, match=r"^the KV cache holds 3 blocks of 16 tokens, fewer than one request of "
                                         r"max_model_len=64 needs"):
        blocks_that_fit(config, "cpu")
