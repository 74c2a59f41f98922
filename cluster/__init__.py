"""Driver side of shardserve: placement, the engine client and the offline LLM.

`from cluster import LLM, SamplingParams` imports what it names on first use: a process
that imports one submodule (an engine's hasher actor: cluster.embeds_hasher) does not
pay for torch and transformers, which cluster.llm brings (4.5 s of a 2-core machine's
CPU, while the engine's shards start beside it)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "LLM": "cluster.llm",
    "SamplingParams": "workers.sampling_params",
    "RequestOutput": "cluster.outputs",
    "RequestMetrics": "cluster.outputs",
    "CompletionOutput": "cluster.outputs",
    "Logprob": "cluster.outputs",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cluster' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from cluster.llm import LLM
    from cluster.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
    from workers.sampling_params import SamplingParams
