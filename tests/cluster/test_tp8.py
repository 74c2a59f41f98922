"""An 8-shard engine of a tiny model gives the same greedy tokens and log-probabilities as
one shard (8 heads split one per rank, 2 KV heads replicated 4 ways, a vocabulary padded
to a multiple of 8), for token-id and embedding prompts: the CPU stand-in for the TP=8
runs of the largest shapes."""

from __future__ import annotations

import torch

from cluster import LLM, SamplingParams
from tests.comparisons import assert_same_samples
from tests.checkpoints import make_tiny_checkpoint
from tests.cluster.peer_checks import skip_unless_gpus_hold


def _generate(path, tp: int, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=2, ignore_eos=True)
    with LLM(str(path), tensor_parallel_size=tp, enable_prompt_embeds=True, max_model_len=64,
             kv_cache_memory_bytes=4 << 20) as llm:
        return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def test_eight_shards_match_one_shard(ray_cluster, tmp_path):
    skip_unless_gpus_hold(8)
    path = make_tiny_checkpoint("llama", tmp_path / "tp8", num_attention_heads=8, num_key_value_heads=2,
                                head_dim=8)
    gen = torch.Generator().manual_seed(11)
    prompts = [
        {"prompt_token_ids": torch.randint(3, 300, (5,), generator=gen).tolist()},
        {"prompt_token_ids": torch.randint(3, 300, (21,), generator=gen).tolist()},
        {"prompt_embeds": torch.randn(9, 64, generator=gen)},
    ]
    one, eight = _generate(path, 1, prompts), _generate(path, 8, prompts)
    assert_same_samples(one, eight, atol=1e-4)
