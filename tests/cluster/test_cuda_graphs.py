"""CUDA-graph decode steps give the same greedy tokens and log-probabilities as eager
steps, across batch sizes that need padding to a bucket (gpu marker: needs CUDA)."""

from __future__ import annotations

import pytest
import ray
import torch

from cluster import LLM, SamplingParams
from tests.comparisons import assert_same_samples


def _run(path, enforce_eager: bool):
    gen = torch.Generator().manual_seed(3)
    prompts = [{"prompt_token_ids": torch.randint(3, 300, (n,), generator=gen).tolist()} for n in (3, 9, 17, 30, 5)]
    # Different lengths: the decode batch shrinks 5 -> 1 as requests finish (buckets 8, 4, 2, 1).
    params = [SamplingParams(temperature=0.0, max_tokens=m, logprobs=3, ignore_eos=True) for m in (4, 9, 13, 20, 24)]
    with LLM(str(path), enforce_eager=enforce_eager, max_model_len=128, kv_cache_memory_bytes=16 << 20) as llm:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        replays = ray.get(llm.engine.leader.__ray_call__.remote(
            lambda shard: dict(shard.runner.decode_graphs.replays) if shard.runner.decode_graphs else {}))
    return [o.outputs[0] for o in outputs], replays


@pytest.mark.gpu
def test_graph_decode_matches_eager(ray_cluster, tiny_checkpoints):
    path = tiny_checkpoints("llama")
    graphed, replays = _run(path, enforce_eager=False)
    eager, no_replays = _run(path, enforce_eager=True)
    assert no_replays == {} and all(replays.get(bucket, 0) > 0 for bucket in (1, 2, 4, 8)), replays
    assert_same_samples(eager, graphed, atol=1e-3)
