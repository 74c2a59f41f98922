"""At TP=2 on one host's GPUs, the engine's shards all-reduce through the one-shot path
(symmetric memory; decode-sized messages through the Lamport kernel), not NCCL alone:
each shard must see its peer's GPU for that. A bfloat16 model samples the same through
it as over NCCL (gpu marker: needs 2 GPUs)."""

from __future__ import annotations

import pytest
import ray
import torch

from cluster import LLM, SamplingParams
from tests.cluster.peer_checks import skip_unless_gpus_hold
from tests.comparisons import assert_same_samples


def _all_reduce_state(shard) -> tuple:
    """Which all-reduce the shard's group has, on which GPU; then one bfloat16 all-reduce
    of a decode-sized message through the group (every shard calls this at once): its
    sum, and whether program 0's Lamport slot moved on by one."""
    import torch

    pg = shard.runner.pg
    torch.cuda.set_device(shard.runner.device)  # Ray's call thread: the kernel runs on the current device
    fast = pg.fast_all_reduce
    lamport = getattr(fast, "_lamport", None)
    if lamport is None:
        return type(fast).__name__, shard.runner.device.index, None, None
    before = int(lamport.slots[0])
    x = torch.full((4096,), float(pg.rank + 1), dtype=torch.bfloat16, device=shard.runner.device)
    total = float(pg.all_reduce(x).float().sum())
    return type(fast).__name__, shard.runner.device.index, total, int(lamport.slots[0]) == (before + 1) % 3


def _generate(path, disable_custom_all_reduce: bool):
    """Greedy samples of bfloat16 prompts at TP=2 (decode rows through the Lamport kernel,
    prefill rows through the symmetric-memory one-shot, unless NCCL only), and the shards'
    all-reduce state after one more all-reduce of their own."""
    gen = torch.Generator().manual_seed(5)
    prompts = [{"prompt_token_ids": torch.randint(3, 300, (n,), generator=gen).tolist()} for n in (7, 37, 90)]
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=3, ignore_eos=True)
    with LLM(str(path), tensor_parallel_size=2, dtype="bfloat16", max_model_len=128, kv_cache_memory_bytes=16 << 20,
             disable_custom_all_reduce=disable_custom_all_reduce) as llm:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        states = ray.get([shard.__ray_call__.remote(_all_reduce_state) for shard in llm.engine.shards])
    return [o.outputs[0] for o in outputs], states


@pytest.mark.gpu
def test_tp2_shards_use_the_one_shot_all_reduce_and_sample_as_over_nccl(ray_cluster, tiny_checkpoints):
    skip_unless_gpus_hold(2)
    path = tiny_checkpoints("llama")
    fast, states = _generate(path, disable_custom_all_reduce=False)
    nccl, nccl_states = _generate(path, disable_custom_all_reduce=True)
    assert [name for name, *_ in states] == ["OneShotAllReduce"] * 2, states
    assert len({device for _, device, *_ in states}) == 2, f"both shards on one GPU: {states}"
    assert [(total, moved) for *_, total, moved in states] == [(3.0 * 4096, True)] * 2, states
    assert [name for name, *_ in nccl_states] == ["NoneType"] * 2, nccl_states
    # Two ranks' sums round once in every path, so the samples are the same bits.
    assert_same_samples(nccl, fast, atol=1e-6)
