"""EngineArgs' default step budget (max_num_batched_tokens): the context length within
[2048, 8192] on a GPU and 2048 on CPU, so a long prompt is prefilled in chunks between
decode steps; an explicit value wins."""

from __future__ import annotations

import pytest

from cluster.engine_args import EngineArgs, default_step_tokens


@pytest.mark.parametrize("device, max_model_len, expected", [
    ("cuda", 1024, 2048), ("cuda", 4096, 4096), ("cuda", 131072, 8192),
    ("cpu", 1024, 2048), ("cpu", 4096, 2048), ("cpu", 131072, 2048),
])
def test_default_step_tokens(device, max_model_len, expected):
    assert default_step_tokens(device, max_model_len) == expected


def test_resolved_config_chunks_long_contexts_unless_told():
    config, _ = EngineArgs(device="cpu", max_model_len=16384).resolve()
    assert config.max_num_batched_tokens == 2048 and config.max_model_len == 16384
    config, _ = EngineArgs(device="cuda", max_model_len=16384).resolve()
    assert config.max_num_batched_tokens == 8192
    config, _ = EngineArgs(device="cpu", max_model_len=16384, max_num_batched_tokens=16384).resolve()
    assert config.max_num_batched_tokens == 16384
