"""Async scheduling at tensor_parallel_size 2: when every token of a step was its row's
argmax of the raw logits (greedy, no penalties, no min_tokens mask still on), followers take
the next step's fed-back tokens from their own copy of the logits instead of a broadcast.
The tokens equal those of step-by-step planning, across batches where that holds, where it
holds only once min_tokens is met, and where it never does (penalties, sampling, a logit
bias)."""

from __future__ import annotations

import ray
import torch

from cluster import LLM, SamplingParams
from tests.cluster.peer_checks import skip_unless_gpus_hold

MAX_TOKENS = 24


def _workloads():
    gen = torch.Generator().manual_seed(11)
    prompts = [{"prompt_token_ids": torch.randint(3, 300, (n,), generator=gen).tolist()} for n in (5, 9, 14)]
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return {
        "greedy": (prompts, [greedy] * 3),
        # By argmax only from the step after the 8th token: the flag turns on mid-stream.
        "min_tokens": (prompts, [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=8)] * 3),
        # Never by argmax as a batch: one row has a penalty, one samples (seeded).
        "mixed": (prompts, [greedy, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                                   repetition_penalty=1.3),
                            SamplingParams(temperature=0.9, seed=5, max_tokens=MAX_TOKENS, ignore_eos=True)]),
        # Greedy on biased logits: never the argmax of the raw logits, so always broadcast.
        "logit_bias": (prompts, [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                                logit_bias={t: -5.0 for t in range(150)})] * 3),
    }


def _run(path, async_scheduling: bool):
    results, argmax_steps = {}, {}
    with LLM(str(path), tensor_parallel_size=2, max_model_len=128, kv_cache_memory_bytes=16 << 20,
             async_scheduling=async_scheduling) as llm:
        follower = llm.engine.shards[1]
        for name, (prompts, params) in _workloads().items():
            before = ray.get(follower.__ray_call__.remote(lambda shard: shard.runner.num_argmax_feedback_steps))
            outputs = llm.generate(prompts, params, use_tqdm=False)
            results[name] = [o.outputs[0].token_ids for o in outputs]
            after = ray.get(follower.__ray_call__.remote(lambda shard: shard.runner.num_argmax_feedback_steps))
            argmax_steps[name] = after - before
    return results, argmax_steps


def test_followers_take_greedy_feedback_from_their_own_logits(ray_cluster, tiny_checkpoints):
    skip_unless_gpus_hold(2)
    path = tiny_checkpoints("llama")
    sync, sync_steps = _run(path, async_scheduling=False)
    overlapped, steps = _run(path, async_scheduling=True)
    assert overlapped == sync
    assert all(len(t) == MAX_TOKENS for t in sync["greedy"] + sync["mixed"])
    assert set(sync_steps.values()) == {0}  # no step runs ahead without async scheduling
    assert steps["greedy"] > MAX_TOKENS // 2, steps
    assert 0 < steps["min_tokens"] < steps["greedy"], steps
    assert steps["mixed"] == 0 and steps["logit_bias"] == 0, steps
    assert sync["logit_bias"] != sync["greedy"]  # the bias changed the greedy path
